"""Corridor, smoothing penalty, phase weight and the EPO objective (docs/spec.md sections 3-5).

    L_EPO = L_policy - lambda * (L_H - beta_k * alpha * P)        (minimized)

Minimizing it raises entropy through the bonus L_H and pulls entropy back into the corridor
[kappa_l * ref, kappa_r * ref] through P. The reference is detached: no gradient flows through it.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional, Union

import torch

from .aggregation import aggregate_parts, aggregation_weights, turn_sums
from .history import MAX_TURNS

Reference = Union[None, float, torch.Tensor]


class IndicatorPenaltyWarning(UserWarning):
    """The released code's indicator penalty is constant in the parameters: it adds no gradient."""


_indicator_warned = False


def warn_indicator_once() -> None:
    global _indicator_warned
    if not _indicator_warned:
        _indicator_warned = True
        warnings.warn(
            "epo.penalty=indicator reproduces the released code: the penalty is piecewise constant, "
            "so it adds NO gradient and does not pull entropy back into the corridor",
            IndicatorPenaltyWarning,
            stacklevel=3,
        )


def phase_weight(step: int, total_steps: int, gamma: float, mid_fraction: float) -> float:
    """beta_k = 1 + exp(-gamma * k / k_mid), k_mid = max(1, round(mid_fraction * K)) (spec section 4)."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} is invalid: must be an integer >= 1")
    if step < 0:
        raise ValueError(f"step={step!r} is invalid: must be >= 0")
    k_mid = max(1, round(mid_fraction * total_steps))
    return 1.0 + math.exp(-gamma * step / k_mid)


def corridor(reference, kappa_left: float, kappa_right: float):
    """The corridor [kappa_l * ref, kappa_r * ref] around a reference (a float or a per-token tensor)."""
    return kappa_left * reference, kappa_right * reference


def corridor_strength(penalty: str, alpha: float, gamma: float, mid_fraction: float, total_steps: Optional[int]) -> dict:
    """Whether the penalty can hold entropy down from above the corridor over a run (spec section 8).

    Above `upper` a token's entropy feels -lambda * w * (1 - beta_k * alpha * p'), p' the penalty's
    slope there: the corridor pulls entropy down only where beta_k * alpha * p' > 1. Returns
    {"holds_from_above", "beta_alpha": [min, max] over the K steps} and, for the squared penalty,
    "holds_beyond": [1 / (2 max), 1 / (2 min)], the distance above `upper` from which it pulls down
    (None where beta_k * alpha is 0). K unknown (None): beta_k's whole range (1, 2] stands in."""
    if total_steps is None:
        beta_min, beta_max = 1.0, 2.0
    else:
        beta_max = phase_weight(0, total_steps, gamma, mid_fraction)
        beta_min = phase_weight(total_steps - 1, total_steps, gamma, mid_fraction)
    low, high = beta_min * alpha, beta_max * alpha
    report = {"holds_from_above": penalty == "hinge" and low > 1, "beta_alpha": [low, high]}
    if penalty == "squared":
        report["holds_beyond"] = [1 / (2 * high) if high else None, 1 / (2 * low) if low else None]
    return report


def net_bonus_above(lambda_entropy: float, alpha: float, beta: float, penalty: str, excess: float) -> float:
    """lambda * (1 - beta * alpha * p'): the weight that raises entropy above the corridor (negative:
    the penalty pulls it down there). excess: L_H - upper for the squared penalty (its slope is
    2 * excess there, 0 inside the corridor); hinge slope 1; the indicator has none."""
    if penalty == "squared" and not math.isfinite(excess):
        return math.nan
    slope = {"hinge": 1.0, "squared": 2.0 * max(0.0, excess), "indicator": 0.0}[penalty]
    return lambda_entropy * (1.0 - beta * alpha * slope)


def squared_penalty(value, lower, upper):
    """P = (lower - v)^2 below the corridor, (v - upper)^2 above it, 0 inside (spec section 3);
    v a tensor or a float (then a float)."""
    if not isinstance(value, torch.Tensor):
        return max(0.0, lower - value) ** 2 + max(0.0, value - upper) ** 2
    return torch.relu(lower - value) ** 2 + torch.relu(value - upper) ** 2


def epo_regularizer(
    entropy: torch.Tensor,
    action_mask: torch.Tensor,
    reference: Reference,
    beta: float,
    *,
    lambda_entropy: float,
    alpha: float,
    kappa_left: float,
    kappa_right: float,
    penalty: str,
    aggregation: str,
    denominator: Optional[torch.Tensor] = None,
    linearize_at: Optional[float] = None,
):
    """The term -lambda * (L_H - beta * alpha * P) to add to the policy loss, and detached statistics.

    entropy: [B, T] token entropies H (with gradient); action_mask: [B, T] 0/1.
    reference: None (warm-up: no penalty), a float, or a per-token float tensor [B, T] (per-turn).
    lambda_entropy, alpha, kappa_left, kappa_right, penalty, aggregation: the EPOConfig knobs of the
        same names (EPOConfig.regularizer_knobs() gives them as keywords).
    denominator: the global aggregation denominator when this batch is one share of a larger one
        (all ranks, all micro-batches); the shares' terms then sum to the global term. None: this
        batch is the whole batch.
    linearize_at: for the squared penalty with a `denominator`, the global detached L_H at which P is
        linearized, so that the shares' values and gradients sum to the global P and its gradient.
    Returns (term: 0-d tensor, stats: dict of detached 0-d tensors: entropy (this share of L_H),
    den (local denominator), tokens, in_corridor_tokens, above_corridor_tokens, penalty (this share of P) and, for the
    per-token penalties, penalty_num (the numerator of P, to add up across shares)).
    """
    if entropy.shape != action_mask.shape:
        raise ValueError(
            f"entropy shape {tuple(entropy.shape)} and action_mask shape {tuple(action_mask.shape)} disagree"
        )
    weights, local_den = aggregation_weights(action_mask, aggregation, entropy.dtype)
    den = local_den if denominator is None else torch.as_tensor(denominator, dtype=entropy.dtype)
    den = den.detach().clamp(min=1.0)  # no action token anywhere: every sum below is 0
    bonus = (weights * entropy).sum() / den
    stats = {"entropy": bonus.detach(), "den": local_den.detach(), "tokens": action_mask.sum().detach()}

    if reference is None:
        value = torch.zeros((), dtype=entropy.dtype, device=entropy.device)
        stats["in_corridor_tokens"] = torch.zeros((), dtype=entropy.dtype, device=entropy.device)
        stats["above_corridor_tokens"] = torch.zeros((), dtype=entropy.dtype, device=entropy.device)
    else:
        if isinstance(reference, torch.Tensor) and reference.dim() > 0:
            if reference.shape != entropy.shape:
                raise ValueError(
                    f"per-token reference shape {tuple(reference.shape)} and entropy shape "
                    f"{tuple(entropy.shape)} disagree"
                )
            if penalty == "squared":
                raise ValueError("a per-token reference needs a per-token penalty (hinge or indicator)")
            ref = reference.detach().to(entropy.dtype)
        else:
            ref = float(reference)
        lower, upper = corridor(ref, kappa_left, kappa_right)
        h = entropy.detach()
        on = action_mask.to(entropy.dtype)
        stats["in_corridor_tokens"] = (((h >= lower) & (h <= upper)).to(entropy.dtype) * on).sum()
        stats["above_corridor_tokens"] = ((h > upper).to(entropy.dtype) * on).sum()

        if penalty == "squared":
            if denominator is None:
                value = squared_penalty(bonus, lower, upper)
            elif linearize_at is None:
                raise ValueError("the squared penalty on a share of the batch needs linearize_at (the global L_H)")
            else:
                at = torch.tensor(float(linearize_at), dtype=entropy.dtype, device=entropy.device)
                slope = 2.0 * torch.relu(at - upper) - 2.0 * torch.relu(lower - at)
                share = local_den.detach() / den
                value = squared_penalty(at, lower, upper) * share + slope * (bonus - at * share)
        else:
            if penalty == "hinge":
                per_token = torch.relu(lower - entropy) + torch.relu(entropy - upper)
            else:
                warn_indicator_once()
                per_token = ((h <= lower) | (h >= upper)).to(entropy.dtype)
            penalty_num = (weights * per_token).sum()
            stats["penalty_num"] = penalty_num.detach()
            value = penalty_num / den
    stats["penalty"] = value.detach()
    term = -lambda_entropy * (bonus - beta * alpha * value)
    return term, stats


def _scalar_reference(reference: Reference, action_mask: torch.Tensor, mode: str) -> float:
    if reference is None:
        return float("nan")
    if isinstance(reference, torch.Tensor) and reference.dim() > 0:
        numerator, den = aggregate_parts(reference.detach().to(torch.float64), action_mask, mode)
        return float(numerator / den.clamp(min=1.0))
    return float(reference)


def epo_loss(
    policy_loss: torch.Tensor,
    entropy: torch.Tensor,
    action_mask: torch.Tensor,
    reference: Reference,
    step: int,
    total_steps: Optional[int],
    config,
):
    """L_EPO for one process holding the whole batch (spec section 5).

    policy_loss: 0-d tensor from the host; entropy: [B, T] with gradient; action_mask: [B, T].
    reference: None (no penalty), a float, or a per-token tensor [B, T]; step: k (0-based);
    total_steps: K (None: config.total_steps); config: an EPOConfig.
    Returns (loss, metrics) with metrics a dict of floats: entropy (L_H), reference, lower, upper,
    penalty (P), beta, in_corridor (fraction of action tokens with lower <= H <= upper), policy_loss,
    loss. Fields that do not apply (no reference yet) are nan.
    """
    total = config.total_steps if total_steps is None else total_steps
    if total is None:
        raise ValueError("total_steps is unknown: pass it or set epo.total_steps")
    beta = phase_weight(step, total, config.gamma, config.mid_fraction)
    term, stats = epo_regularizer(entropy, action_mask, reference, beta, **config.regularizer_knobs())
    loss = policy_loss + term
    ref = _scalar_reference(reference, action_mask, config.aggregation)
    tokens = float(stats["tokens"])
    lower, upper = corridor(ref, config.kappa_left, config.kappa_right)
    metrics = {
        "entropy": float(stats["entropy"]),
        "reference": ref,
        "lower": lower,
        "upper": upper,
        "penalty": float(stats["penalty"]),
        "beta": beta,
        "in_corridor": float(stats["in_corridor_tokens"]) / tokens if reference is not None and tokens else math.nan,
        "policy_loss": float(policy_loss.detach()),
        "loss": float(loss.detach()),
    }
    return loss, metrics


class StepStatistic(NamedTuple):
    """The global step statistic S_k and the per-turn sums, rebuilt from all-reduced partial sums."""

    value: Optional[float]  # None when the step had no action token
    turn_sums: torch.Tensor
    turn_counts: torch.Tensor
    den: float  # the aggregation's denominator: trajectories (trajectory mode) or action tokens (token mode)


def step_statistic_parts(
    entropy: torch.Tensor, action_mask: torch.Tensor, mode: str, max_turns: int = MAX_TURNS
) -> torch.Tensor:
    """float64 [2 + 2*max_turns]: [numerator, den, per-turn sums of H*m, per-turn sums of m].

    Add the vectors of every micro-batch, all-reduce them with SUM over the data-parallel group
    once per RL step, and pass the result to `step_statistic`.
    """
    numerator, den = aggregate_parts(entropy.detach().to(torch.float64), action_mask, mode)
    sums, counts = turn_sums(entropy, action_mask, max_turns)
    return torch.cat([numerator.reshape(1), den.reshape(1), sums, counts])


def step_statistic(reduced: torch.Tensor) -> StepStatistic:
    reduced = reduced.detach().to(torch.float64).cpu()
    max_turns = (reduced.numel() - 2) // 2
    numerator, den = float(reduced[0]), float(reduced[1])
    value = numerator / den if den > 0 else None
    return StepStatistic(value, reduced[2 : 2 + max_turns], reduced[2 + max_turns :], den)
