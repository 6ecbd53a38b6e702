"""EPO on one training rank: the loss term per micro-batch, the step statistic, the history.

Host-neutral glue between the pure core and a host adapter. Collectives come in through
RankContext.all_reduce_sum: one closes each RL step (the step statistic), plus, for the squared
penalty, one tiny one before each optimizer step: P and its slope are taken at that optimizer step's global L_H, which the host adapter measures
with a no-grad pass over the step's micro-batches at the parameters the step starts from
(begin_optimizer_step). So every micro-batch, whatever the split into micro-batches and ranks, is
linearized at the same point, and the shares add up to the one-process value and gradient.

Run safety (docs/bad-inputs.md):
- a micro-batch whose entropy is not finite on some action token is dropped from EPO: its term is
  a detached zero (so EPO adds no gradient, and no NaN, through it) and it does not enter the step
  statistic; the other micro-batches still define it;
- a step whose statistic is not a finite number (no action token, or every micro-batch dropped)
  is skipped: nothing is pushed, `skipped_steps` counts it, a warning is logged; after
  `max_bad_steps` such steps in a row, EPOHealthError stops the run;
- the ranks compare a checksum of this state (the history the step's reference comes from) every
  `check_every` steps and after a resume: the hook layer's check (openrlhf_hooks.agreement).
Every decision is taken from an all-reduced vector, so all ranks take it together and none is
left waiting in a collective.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional

import torch

from openrlhf_hooks.api import RankContext, RankLoss

from .config import EPOConfig
from .core import (
    MAX_TURNS,
    EntropyHistory,
    PerTurnEntropyHistory,
    corridor,
    epo_regularizer,
    net_bonus_above,
    phase_weight,
    squared_penalty,
    step_statistic,
    step_statistic_parts,
)

logger = logging.getLogger(__name__)

_CORE_PARTS = 2 + 2 * MAX_TURNS
# Sums over a step's micro-batches, all-reduced after the core's step parts in end_step:
# penalty_num: numerator of the per-token penalty; inside/above/tokens: action tokens in the corridor /
# above it / all;
# dropped: micro-batches with non-finite entropy; term/term_weight: the EPO term added to the loss and
# each micro-batch's share of its optimizer step's denominator (their ratio: the term per optimizer step).
_SUM_NAMES = ("penalty_num", "inside", "above", "tokens", "dropped", "term", "term_weight")


class EPOHealthError(RuntimeError):
    """The run cannot go on safely: too many steps without a finite entropy statistic."""


class EPORankLoss(RankLoss):
    """L_EPO = L_policy - lambda * (L_H - beta_k * alpha * P) on one rank's share of each step.

    Shares: each micro-batch's term uses the optimizer step's global denominator from the host's
    loss_batch_info (batch_num_tokens for token aggregation, global_batch_size for trajectory),
    divided by dp_size, exactly like the host's aggregate_loss, so that after DeepSpeed's gradient
    averaging the shares add up to the one-process value and gradient.
    """

    needs_entropy = True

    def __init__(self, config: EPOConfig, context: RankContext):
        if not 0 <= context.rank < context.dp_size:
            raise ValueError(
                f"RankContext.rank={context.rank!r} is invalid: must be the rank inside the data-parallel "
                f"group, 0 <= rank < dp_size={context.dp_size!r}"
            )
        self.config = config
        self.context = context
        self.check_every = config.check_every  # the hook layer's rank-agreement check
        history = PerTurnEntropyHistory if config.reference == "per_turn" else EntropyHistory
        self.history = history(config.window_size, config.warmup)
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_bad_steps = 0
        self._begin_state()

    def _begin_state(self) -> None:
        self._parts = torch.zeros(_CORE_PARTS, dtype=torch.float64)
        self._sums = dict.fromkeys(_SUM_NAMES, 0.0)
        self._linearize_at: Optional[float] = None
        self._applied_penalties: list[float] = []
        self.reference = self.history.reference()
        self.beta = phase_weight(self.step, self.context.total_steps, self.config.gamma, self.config.mid_fraction)

    def begin_step(self) -> None:
        self._begin_state()

    def _denominator(self, loss_batch_info: Mapping[str, Any]) -> Optional[torch.Tensor]:
        key = "global_batch_size" if self.config.aggregation == "trajectory" else "batch_num_tokens"
        total = loss_batch_info.get(key) if loss_batch_info else None
        if total is None:
            return None
        return torch.as_tensor(total, dtype=torch.float64) / float(loss_batch_info.get("dp_size", 1))

    def needs_optimizer_step_entropy(self) -> bool:
        return self.config.penalty == "squared" and self.reference is not None

    def begin_optimizer_step(self, entropies) -> None:
        """For the squared penalty: the optimizer step's global L_H, at which P is linearized."""
        self._linearize_at = None
        if entropies is None:
            return
        local = torch.zeros(2, dtype=torch.float64)
        for entropy, action_mask in entropies:
            on = action_mask.bool()
            if bool(torch.isfinite(entropy[on]).all()):  # as in policy_loss: non-finite micro-batches drop out
                local += step_statistic_parts(entropy, action_mask, self.config.aggregation)[:2].cpu()
        numerator, den = self.context.all_reduce_sum(local).cpu().tolist()
        # no action token in the whole optimizer step: every share is 0 whatever the point
        self._linearize_at = numerator / den if den > 0 else 0.0
        if den > 0:
            lower, upper = corridor(self.reference, self.config.kappa_left, self.config.kappa_right)
            self._applied_penalties.append(squared_penalty(self._linearize_at, lower, upper))

    def policy_loss(self, host_outputs, *, action_mask, entropy, loss_batch_info):
        if entropy is None:
            raise RuntimeError("EPO needs the per-token entropy of the policy; the host adapter did not provide it")
        if entropy.shape != action_mask.shape:
            raise ValueError(
                f"EPO: entropy shape {tuple(entropy.shape)} and action_mask shape {tuple(action_mask.shape)} "
                "disagree; the host adapter must give one entropy value per action-mask position"
            )
        on = action_mask.bool()
        # Off the mask the entropy is never used: zero it so a stray nan there cannot reach a sum.
        entropy = torch.where(on, entropy, torch.zeros((), dtype=entropy.dtype, device=entropy.device))
        finite = bool(torch.isfinite(entropy.detach()).all())
        if finite:
            parts = step_statistic_parts(entropy, action_mask, self.config.aggregation)
        else:
            parts = torch.zeros(_CORE_PARTS, dtype=torch.float64, device=entropy.device)
        reference = None if self.reference is None else self.history.token_reference(action_mask)
        denominator = self._denominator(loss_batch_info)
        squared_share = reference is not None and self.config.penalty == "squared" and denominator is not None
        if squared_share and self._linearize_at is None:
            raise RuntimeError(
                "EPO's squared penalty needs the optimizer step's global entropy before its first micro-batch; "
                "the host adapter did not call begin_optimizer_step with the step's entropies"
            )
        self._parts += parts.cpu()
        if not finite:
            self._sums["dropped"] += 1.0
            return tuple(host_outputs)
        term, stats = epo_regularizer(
            entropy,
            action_mask,
            reference,
            self.beta,
            **self.config.regularizer_knobs(),
            denominator=None if denominator is None else denominator.to(entropy.device),
            linearize_at=self._linearize_at if squared_share else None,
        )
        self._sums["penalty_num"] += float(stats.get("penalty_num", 0.0))
        self._sums["inside"] += float(stats["in_corridor_tokens"])
        self._sums["above"] += float(stats["above_corridor_tokens"])
        self._sums["tokens"] += float(stats["tokens"])
        self._sums["term"] += float(term.detach())
        self._sums["term_weight"] += float(stats["den"]) / float(denominator) if denominator is not None else 1.0
        loss = host_outputs[0] + term.to(host_outputs[0].dtype)
        return (loss, *host_outputs[1:])

    def end_step(self) -> dict[str, float]:
        local = torch.cat([self._parts, torch.tensor([self._sums[name] for name in _SUM_NAMES], dtype=torch.float64)])
        vector = self.context.all_reduce_sum(local).cpu()
        stat = step_statistic(vector[:_CORE_PARTS])
        sums = dict(zip(_SUM_NAMES, vector[_CORE_PARTS:].tolist()))
        metrics = self._metrics(stat, sums)
        dropped = int(sums["dropped"])
        if dropped:
            logger.warning(
                "EPO step %d: %d micro-batch(es) had non-finite entropy on action tokens; their EPO term was "
                "dropped and the step statistic uses the others",
                self.step,
                dropped,
            )
        if stat.value is None or not math.isfinite(stat.value):
            self._skip(stat.value, dropped)
        else:
            self.history.push_step(stat)
            self.consecutive_bad_steps = 0
        metrics["skipped_steps"] = float(self.skipped_steps)
        metrics["nonfinite_micro_batches"] = float(dropped)
        self.step += 1
        self._begin_state()
        return metrics

    def _skip(self, value: Optional[float], dropped: int) -> None:
        if value is not None:
            reason = f"the statistic is {value!r}"
        elif dropped:
            reason = "every micro-batch had non-finite entropy"
        else:
            reason = "no action token in the whole step"
        self.skipped_steps += 1
        self.consecutive_bad_steps += 1
        logger.warning(
            "EPO step %d skipped (%s): the history is unchanged; %d step(s) in a row, the run stops at "
            "--epo.max_bad_steps=%d",
            self.step,
            reason,
            self.consecutive_bad_steps,
            self.config.max_bad_steps,
        )
        if self.consecutive_bad_steps >= self.config.max_bad_steps:
            first = self.step - self.consecutive_bad_steps + 1
            raise EPOHealthError(
                f"EPO: {self.consecutive_bad_steps} consecutive RL steps ({first} to {self.step}) had no finite "
                f"entropy statistic (last: {reason}); stopping instead of training on garbage; "
                f"--epo.max_bad_steps={self.config.max_bad_steps} sets how many in a row are tolerated"
            )

    def _metrics(self, stat, sums: dict) -> dict[str, float]:
        """The step's metrics. penalty: the P whose gradient was applied (squared: the mean over the
        step's optimizer steps of P at their L_H); loss_term: the term EPO added to the optimised loss,
        per optimizer step (the host's own policy_loss metric does not include it)."""
        nan = math.nan
        ref = self.reference
        entropy = stat.value if stat.value is not None else nan
        tokens = sums["tokens"]
        config = self.config
        if ref is None:
            lower = upper = penalty = in_corridor = above = net_above = nan
        else:
            lower, upper = corridor(ref, config.kappa_left, config.kappa_right)
            in_corridor = sums["inside"] / tokens if tokens else nan
            # the squared penalty acts on the step's L_H, so "above" is that one scalar
            excess = entropy - upper
            if config.penalty == "squared":
                applied = self._applied_penalties
                penalty = sum(applied) / len(applied) if applied else nan
                above = float(excess > 0) if math.isfinite(excess) else nan
            else:
                penalty = sums["penalty_num"] / stat.den if stat.den else nan
                above = sums["above"] / tokens if tokens else nan
            net_above = net_bonus_above(config.lambda_entropy, config.alpha, self.beta, config.penalty, excess)
        counts = stat.turn_counts
        seen = torch.nonzero(counts > 0).flatten()
        turn_means = stat.turn_sums[seen] / counts[seen]
        return {
            "entropy": entropy,
            "reference": nan if ref is None else ref,
            "lower": lower,
            "upper": upper,
            "penalty": penalty,
            "beta": self.beta,
            "loss_term": sums["term"] / sums["term_weight"] if sums["term_weight"] else nan,
            "in_corridor": in_corridor,
            "above_corridor": above,
            "net_bonus_above": net_above,
            "step": float(self.step),
            "turn_entropy_first": float(turn_means[0]) if len(seen) else nan,
            "turn_entropy_last": float(turn_means[-1]) if len(seen) else nan,
            "turns_max": float(seen[-1] + 1) if len(seen) else 0.0,
        }

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "consecutive_bad_steps": self.consecutive_bad_steps,
            "config": self.config.to_dict(),
            "history": self.history.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, Mapping) or not isinstance(state.get("history"), Mapping) or "step" not in state:
            raise ValueError(
                "the EPO state in this checkpoint is incomplete: expected a mapping with 'step' and 'history' "
                "as written by EPORankLoss.state_dict"
            )
        saved = state.get("config", {})
        for key in ("aggregation", "reference", "window_size", "warmup"):
            if saved.get(key) != getattr(self.config, key):
                raise ValueError(
                    f"the EPO state in this checkpoint was written with epo.{key}={saved.get(key)!r}, "
                    f"but this run uses epo.{key}={getattr(self.config, key)!r}; resume with the same "
                    f"--epo.{key} (the history means something else under another setting)"
                )
        self.history.load_state_dict(state["history"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.consecutive_bad_steps = int(state.get("consecutive_bad_steps", 0))
        self._begin_state()
