"""A deliberately simple float64 reference for the EPO math (docs/spec.md).

Written independently of ``openrlhf_epo`` so tests can compare the optimized code against it.
Everything is plain Python loops over trajectories, turns and tokens; torch is used only for float64
scalars so that autograd gradients flow through the entropy values H (never through the reference).

Notation (spec "Notation"): B trajectories, T positions, m[j,i] in {0,1} the action mask, H[j,i] the
entropy in nats, a turn is a maximal run of consecutive positions with m = 1, numbered 1, 2, ...

Only the standard library and torch are imported on purpose.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

DTYPE = torch.float64

MaskLike = Union[Tensor, Sequence[Sequence[int]]]
TurnSums = Dict[int, Tuple[float, float]]


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _mask_rows(mask: MaskLike) -> List[List[int]]:
    """The mask as a list of rows of Python ints in {0, 1}; anything else is an error."""
    rows = mask.tolist() if isinstance(mask, Tensor) else [list(r) for r in mask]
    out: List[List[int]] = []
    for row in rows:
        clean = []
        for v in row:
            iv = int(v)
            if iv != v or iv not in (0, 1):
                raise ValueError(f"mask values must be 0 or 1, got {v!r}")
            clean.append(iv)
        out.append(clean)
    return out


def _zero_like_graph(values: Tensor) -> Tensor:
    """A 0-d float64 zero still attached to ``values``' graph (gradient 0, never None)."""
    return values.sum() * 0.0


def _scalar_reference(reference: Union[float, Tensor]) -> float:
    """A detached Python float from a float or a 0-d tensor."""
    if isinstance(reference, Tensor):
        return float(reference.detach().item())
    return float(reference)


# --------------------------------------------------------------------------------------------------
# Entropy of the next-token distribution (spec "Notation": H[j,i] in nats)
# --------------------------------------------------------------------------------------------------


def ref_token_entropy(logits: Tensor) -> Tensor:
    """H = -sum_v p_v log p_v over the last dim, in float64.

    logits: [..., V] (already temperature-scaled). Returns [...] float64, differentiable.
    A logit of -inf is a probability of exactly 0 and contributes 0 (not 0 * -inf = nan).
    A row whose logits are all -inf has no distribution; its entropy comes out nan.
    """
    x = logits.to(DTYPE)
    row_max = x.max(dim=-1, keepdim=True).values.detach()  # shift for stability only
    shifted = x - row_max
    exps = torch.exp(shifted)  # exp(-inf) = 0
    z = exps.sum(dim=-1, keepdim=True)
    p = exps / z
    log_p = shifted - torch.log(z)  # -inf where the logit is -inf
    finite = torch.isfinite(log_p)
    # Replace log p by 0 where p = 0 so that p * log p = 0 there and no nan reaches autograd.
    safe_log_p = torch.where(finite, log_p, torch.zeros_like(log_p))
    return -(p * safe_log_p).sum(dim=-1)


# --------------------------------------------------------------------------------------------------
# Turns (spec "Notation": turn(j,i) = 1, 2, ... counts the runs of m = 1; 0 where m = 0)
# --------------------------------------------------------------------------------------------------


def ref_turn_ids(mask: MaskLike) -> List[List[int]]:
    """turn(j,i) for every position: 0 off the action mask, else the 1-based index of its run."""
    result: List[List[int]] = []
    for row in _mask_rows(mask):
        ids = []
        turn = 0
        previous = 0
        for m in row:
            if m == 1 and previous == 0:
                turn += 1  # a new maximal run of m = 1 starts here
            ids.append(turn if m == 1 else 0)
            previous = m
        result.append(ids)
    return result


# --------------------------------------------------------------------------------------------------
# 1. Entropy term L_H (the two aggregations)
# --------------------------------------------------------------------------------------------------


def ref_aggregate(values: Tensor, mask: MaskLike, mode: str) -> Tensor:
    """Aggregate per-token values [B,T] over action tokens into a 0-d float64 tensor (spec section 1).

    mode "trajectory": mean over the tokens of each turn, then mean over the turns of a trajectory,
        then mean over trajectories; trajectories with no action token are left out of every mean.
    mode "token": sum(m * v) / sum(m) over the whole batch.
    Only positions with m = 1 are read, so values at m = 0 may be anything (even nan).
    With no action token in the whole batch the result is a 0 that is still on the graph.
    """
    rows = _mask_rows(mask)
    if len(rows) != values.shape[0] or any(len(r) != values.shape[1] for r in rows):
        raise ValueError(f"values {tuple(values.shape)} and mask shapes differ")
    turns = ref_turn_ids(rows)

    if mode == "trajectory":
        trajectory_means: List[Tensor] = []
        for j in range(len(rows)):
            # Group this trajectory's action tokens by turn.
            turn_sums: Dict[int, Tensor] = {}
            turn_counts: Dict[int, int] = {}
            for i in range(len(rows[j])):
                t = turns[j][i]
                if t == 0:
                    continue
                v = values[j, i].to(DTYPE)
                turn_sums[t] = turn_sums[t] + v if t in turn_sums else v
                turn_counts[t] = turn_counts.get(t, 0) + 1
            if not turn_sums:
                continue  # no action token: left out of the mean over trajectories
            turn_means = [turn_sums[t] / turn_counts[t] for t in sorted(turn_sums)]
            total = turn_means[0]
            for tm in turn_means[1:]:
                total = total + tm
            trajectory_means.append(total / len(turn_means))
        if not trajectory_means:
            return _zero_like_graph(values.to(DTYPE))
        total = trajectory_means[0]
        for tm in trajectory_means[1:]:
            total = total + tm
        return total / len(trajectory_means)

    if mode == "token":
        total: Optional[Tensor] = None
        count = 0
        for j in range(len(rows)):
            for i in range(len(rows[j])):
                if rows[j][i] == 1:
                    v = values[j, i].to(DTYPE)
                    total = v if total is None else total + v
                    count += 1
        if total is None:
            return _zero_like_graph(values.to(DTYPE))
        return total / count

    raise ValueError(f"aggregation must be 'trajectory' or 'token', got {mode!r}")


# --------------------------------------------------------------------------------------------------
# 4. Phase weight
# --------------------------------------------------------------------------------------------------


def ref_phase_weight(k: int, K: int, gamma: float, mid_fraction: float) -> float:
    """beta_k = 1 + exp(-gamma * k / k_mid), k_mid = max(1, round(mid_fraction * K)) (Python round)."""
    k_mid = max(1, round(mid_fraction * K))
    return 1.0 + math.exp(-gamma * k / k_mid)


# --------------------------------------------------------------------------------------------------
# 2. Reference entropy and the history
# --------------------------------------------------------------------------------------------------


def ref_global_reference(
    history: Sequence[float], window: Union[int, str, None], warmup: int
) -> Optional[float]:
    """Reference for step k from S_0 .. S_{k-1} (spec section 2).

    None (no smoothing penalty) while the history holds fewer than max(warmup, 1) entries.
    window: an int W -> mean of the last W entries; None or "cumulative" -> mean of all entries.
    """
    if len(history) < max(warmup, 1):
        return None
    if window is None or window == "cumulative":
        chosen = list(history)
    else:
        if int(window) < 1:
            raise ValueError(f"window must be >= 1 or cumulative, got {window!r}")
        chosen = list(history)[-int(window):]
    total = 0.0
    for s in chosen:
        total += float(s)
    return total / len(chosen)


def ref_step_turn_sums(entropy: Tensor, mask: MaskLike, cap: int = 64) -> TurnSums:
    """For one step's batch: turn bucket -> (sum of H*m, sum of m), detached (spec section 2, per_turn).

    Turn indices are per trajectory (turn 1 of every trajectory shares bucket 1); turns past ``cap``
    share bucket ``cap``. Only turns that occur in the batch appear as keys.
    """
    rows = _mask_rows(mask)
    turns = ref_turn_ids(rows)
    sums: Dict[int, List[float]] = {}
    for j in range(len(rows)):
        for i in range(len(rows[j])):
            t = turns[j][i]
            if t == 0:
                continue
            bucket = min(t, cap)
            if bucket not in sums:
                sums[bucket] = [0.0, 0.0]
            sums[bucket][0] += float(entropy[j, i].detach().item())
            sums[bucket][1] += 1.0
    return {t: (s[0], s[1]) for t, s in sums.items()}


def ref_per_turn_reference(
    step_turn_sums: Sequence[TurnSums],
    warmup: int,
    global_ref: Optional[float],
    cap: int = 64,
) -> Optional[Callable[[int], Optional[float]]]:
    """Per-turn reference for step k from the per-turn sums of steps 0 .. k-1 (spec section 2).

    Returns None while fewer than max(warmup, 1) past steps exist (same warm-up as the global
    reference). Otherwise returns lookup(turn) -> reference:
      - turn t (t > cap uses bucket cap): cumulative mean sum(H*m) / sum(m), pooled over all past
        steps in which that bucket occurred (steps without it add nothing: no zero-padding);
      - a bucket never seen yet (or turn 0): ``global_ref``.
    """
    if len(step_turn_sums) < max(warmup, 1):
        return None
    pooled: Dict[int, List[float]] = {}
    for step in step_turn_sums:
        for t, (h_sum, m_sum) in step.items():
            bucket = min(int(t), cap)
            if bucket not in pooled:
                pooled[bucket] = [0.0, 0.0]
            pooled[bucket][0] += float(h_sum)
            pooled[bucket][1] += float(m_sum)

    def lookup(turn: int) -> Optional[float]:
        if turn < 1:
            return global_ref
        bucket = min(int(turn), cap)
        if bucket not in pooled or pooled[bucket][1] <= 0.0:
            return global_ref  # never seen yet: fall back to the global reference
        return pooled[bucket][0] / pooled[bucket][1]

    return lookup


def ref_reference_tensor(
    lookup: Callable[[int], Optional[float]], mask: MaskLike, fill: float = 0.0
) -> Tensor:
    """Map a per-turn reference onto tokens: [B,T] float64, lookup(turn) on action tokens, ``fill`` elsewhere."""
    turns = ref_turn_ids(mask)
    out = torch.full((len(turns), len(turns[0]) if turns else 0), float(fill), dtype=DTYPE)
    for j in range(len(turns)):
        for i in range(len(turns[j])):
            t = turns[j][i]
            if t == 0:
                continue
            r = lookup(t)
            if r is None:
                raise ValueError(f"no reference for turn {t} (global reference is None)")
            out[j, i] = r
    return out


# --------------------------------------------------------------------------------------------------
# 3. Corridor and smoothing penalty, 5. the objective
# --------------------------------------------------------------------------------------------------


def _token_reference(reference: Union[float, Tensor], j: int, i: int) -> float:
    """The detached reference at token (j, i): the float itself or reference[j, i]."""
    if isinstance(reference, Tensor) and reference.dim() > 0:
        return float(reference[j, i].detach().item())
    return _scalar_reference(reference)


def ref_epo_loss(
    policy_loss: Tensor,
    entropy: Tensor,
    mask: MaskLike,
    reference: Union[None, float, Tensor],
    step: int,
    total_steps: int,
    cfg: dict,
) -> Tensor:
    """L_EPO = L_policy - lambda * (L_H - beta_k * alpha * P)   (spec section 5, minimized).

    entropy: [B,T] float64 H carrying gradient. mask: [B,T] in {0,1}.
    reference: None (no penalty term at all), a float, or a [B,T] float64 per-token reference.
    cfg keys: lambda_entropy, alpha, kappa_left, kappa_right, gamma, mid_fraction,
              aggregation ("trajectory" | "token"), penalty ("squared" | "hinge" | "indicator").
    """
    aggregation = cfg["aggregation"]
    lam = float(cfg["lambda_entropy"])

    # Section 1: the entropy bonus term, with gradient.
    l_h = ref_aggregate(entropy, mask, aggregation)

    if reference is None:
        # Section 2 warm-up: no smoothing penalty; P is absent.
        return policy_loss - lam * l_h

    rows = _mask_rows(mask)
    kappa_l = float(cfg["kappa_left"])
    kappa_r = float(cfg["kappa_right"])
    penalty = cfg["penalty"]
    per_token_ref = isinstance(reference, Tensor) and reference.dim() > 0

    if penalty == "squared":
        # Section 3, squared on the aggregated scalar. A per-token reference is first aggregated the
        # same way as L_H to give one scalar reference. The reference is detached.
        if per_token_ref:
            ref = float(ref_aggregate(reference.detach().to(DTYPE), rows, aggregation).item())
        else:
            ref = _scalar_reference(reference)
        lower = kappa_l * ref
        upper = kappa_r * ref
        if l_h.item() < lower:
            p_total = (lower - l_h) ** 2
        elif l_h.item() > upper:
            p_total = (l_h - upper) ** 2
        else:
            p_total = l_h * 0.0  # inside the corridor: 0, still on the graph
    elif penalty == "hinge":
        # Section 3, per-token hinge p = max(0, lower - H) + max(0, H - upper), then aggregated.
        p_tokens: List[List[Tensor]] = []
        for j in range(len(rows)):
            row: List[Tensor] = []
            for i in range(len(rows[j])):
                h = entropy[j, i].to(DTYPE)
                if rows[j][i] == 0:
                    row.append(h.detach() * 0.0)  # never read by the aggregation
                    continue
                ref = _token_reference(reference, j, i)
                lower = kappa_l * ref
                upper = kappa_r * ref
                p = h * 0.0
                if h.item() < lower:
                    p = p + (lower - h)
                if h.item() > upper:
                    p = p + (h - upper)
                row.append(p)
            p_tokens.append(row)
        p_tensor = torch.stack([torch.stack(r) for r in p_tokens]) if p_tokens else entropy * 0.0
        p_total = ref_aggregate(p_tensor, rows, aggregation)
    elif penalty == "indicator":
        # Section 3, released code: 1 outside the OPEN corridor (H <= lower or H >= upper), else 0.
        # Computed from detached H, so it contributes no gradient at all.
        p_tensor = torch.zeros(entropy.shape, dtype=DTYPE)
        for j in range(len(rows)):
            for i in range(len(rows[j])):
                if rows[j][i] == 0:
                    continue
                h = float(entropy[j, i].detach().item())
                ref = _token_reference(reference, j, i)
                lower = kappa_l * ref
                upper = kappa_r * ref
                p_tensor[j, i] = 1.0 if (h <= lower or h >= upper) else 0.0
        p_total = ref_aggregate(p_tensor, rows, aggregation)
    else:
        raise ValueError(f"penalty must be 'squared', 'hinge' or 'indicator', got {penalty!r}")

    # Section 4: phase weight for this step.
    beta = ref_phase_weight(step, total_steps, float(cfg["gamma"]), float(cfg["mid_fraction"]))
    alpha = float(cfg["alpha"])
    return policy_loss - lam * (l_h - beta * alpha * p_total)


def ref_in_corridor(
    entropy: Tensor,
    mask: MaskLike,
    reference: Union[float, Tensor],
    kappa_left: float,
    kappa_right: float,
) -> float:
    """Fraction of action tokens with lower <= H <= upper (closed corridor); nan with no action token.

    reference: a float or a [B,T] per-token reference; None is an error (no corridor exists).
    """
    if reference is None:
        raise ValueError("in-corridor fraction needs a reference, got None")
    rows = _mask_rows(mask)
    inside = 0
    total = 0
    for j in range(len(rows)):
        for i in range(len(rows[j])):
            if rows[j][i] == 0:
                continue
            h = float(entropy[j, i].detach().item())
            ref = _token_reference(reference, j, i)
            total += 1
            if kappa_left * ref <= h <= kappa_right * ref:
                inside += 1
    if total == 0:
        return float("nan")
    return inside / total
