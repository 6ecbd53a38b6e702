"""Turns and the entropy aggregation L_H of docs/spec.md section 1.

Both aggregation modes are written as a weighted sum divided by a count:

    aggregate(v) = sum_{j,i} w[j,i] * v[j,i] / den

- token:      w = m,                               den = sum(m)
- trajectory: w = m / (len(turn) * turns(j)),      den = number of trajectories with an action token

so a data-parallel caller all-reduces (numerator, den) with SUM and divides: the global value is
rebuilt exactly, and the gradient of a rank's numerator / global den is its share of the global one.
"""

from __future__ import annotations

import torch

MODES = ("trajectory", "token")


def turn_ids(action_mask: torch.Tensor) -> torch.Tensor:
    """Number the runs of 1s along the last dim: 1, 2, ... on action tokens, 0 where the mask is 0.

    action_mask: [..., T] of 0/1 (bool or integer). Returns a LongTensor of the same shape.
    """
    m = action_mask.to(torch.bool)
    previous = torch.zeros_like(m)
    previous[..., 1:] = m[..., :-1]
    starts = m & ~previous
    return torch.cumsum(starts.long(), dim=-1) * m.long()


def _check(values: torch.Tensor, action_mask: torch.Tensor, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"aggregation mode {mode!r} is invalid: allowed values are {', '.join(MODES)}")
    if values.shape != action_mask.shape:
        raise ValueError(
            f"values shape {tuple(values.shape)} and action_mask shape {tuple(action_mask.shape)} disagree"
        )
    if values.dim() != 2:
        raise ValueError(f"expected [batch, time] tensors, got {values.dim()}-d")


def aggregation_weights(action_mask: torch.Tensor, mode: str, dtype: torch.dtype = torch.float32):
    """Per-token weights w [B, T] and the local denominator den (0-d) of the module docstring."""
    _check(action_mask, action_mask, mode)
    m = action_mask.to(dtype)
    if mode == "token":
        return m, m.sum()
    ids = turn_ids(action_mask)
    batch, _ = ids.shape
    n_turns = ids.max(dim=-1).values  # [B]; turns are numbered consecutively from 1
    width = int(n_turns.max().item()) + 1 if batch else 1
    flat = ids + torch.arange(batch, device=ids.device)[:, None] * width
    lengths = torch.bincount(flat.reshape(-1), minlength=batch * width).to(dtype)
    token_turn_len = lengths[flat]
    per_token = token_turn_len * n_turns[:, None].to(dtype)
    weights = torch.where(ids > 0, 1.0 / per_token.clamp(min=1.0), torch.zeros_like(per_token))
    return weights, (n_turns > 0).sum().to(dtype)


def aggregate_parts(values: torch.Tensor, action_mask: torch.Tensor, mode: str):
    """(numerator, den) with aggregate = numerator / den; numerator carries gradient, den does not."""
    _check(values, action_mask, mode)
    weights, den = aggregation_weights(action_mask, mode, values.dtype)
    return (weights * values).sum(), den


def aggregate(values: torch.Tensor, action_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """L_H-style aggregate of values [B, T] over action tokens (spec section 1), a 0-d tensor.

    Trajectories without action tokens are left out. With no action token at all the result is a
    gradient-connected 0 (there is nothing to average).
    """
    numerator, den = aggregate_parts(values, action_mask, mode)
    return numerator / den.clamp(min=1.0)


def turn_sums(values: torch.Tensor, action_mask: torch.Tensor, max_turns: int):
    """Per turn index t = 1..max_turns: (sum of v*m, sum of m) over the batch, as float64 [max_turns].

    Turns past max_turns share the last bucket (spec section 2, per-turn reference).
    """
    _check(values, action_mask, "token")
    ids = turn_ids(action_mask).clamp(max=max_turns)
    on = ids > 0
    bucket = ids[on] - 1
    sums = torch.zeros(max_turns, dtype=torch.float64, device=values.device)
    counts = torch.zeros(max_turns, dtype=torch.float64, device=values.device)
    sums.index_add_(0, bucket, values.detach()[on].to(torch.float64))
    counts.index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float64))
    return sums, counts
