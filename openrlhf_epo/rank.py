"""EPO on one training rank: the loss term per micro-batch, the step statistic, the history.

Host-neutral glue between the pure core and a host adapter. Collectives come in through
RankContext.all_reduce_sum; one all-reduce closes each RL step (plus one tiny one per micro-batch
for the squared penalty, which needs the global L_H of the optimizer step).
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
    epo_regularizer,
    phase_weight,
    step_statistic,
    step_statistic_parts,
)

logger = logging.getLogger(__name__)

# Layout of the per-step vector: the core's step parts, then three metric sums.
_CORE_PARTS = 2 + 2 * MAX_TURNS
_PENALTY_NUM, _INSIDE, _TOKENS = range(_CORE_PARTS, _CORE_PARTS + 3)


class EPORankLoss(RankLoss):
    """L_EPO = L_policy - lambda * (L_H - beta_k * alpha * P) on one rank's share of each step.

    Shares: each micro-batch's term uses the optimizer step's global denominator from the host's
    loss_batch_info (batch_num_tokens for token aggregation, global_batch_size for trajectory),
    divided by dp_size, exactly like the host's aggregate_loss, so that after DeepSpeed's gradient
    averaging the shares add up to the one-process value and gradient.
    """

    needs_entropy = True

    def __init__(self, config: EPOConfig, context: RankContext):
        self.config = config
        self.context = context
        if config.reference == "per_turn":
            self.history = PerTurnEntropyHistory(config.window_size, config.warmup)
        else:
            self.history = EntropyHistory(config.window_size, config.warmup)
        self.step = 0
        self.skipped_steps = 0
        self._begin_state()

    def _begin_state(self) -> None:
        self._parts: Optional[torch.Tensor] = None
        self._window_info: Any = None
        self._window_sums: Optional[torch.Tensor] = None
        self.reference = self.history.reference()
        self.beta = phase_weight(self.step, self.context.total_steps, self.config.gamma, self.config.mid_fraction)

    def begin_step(self) -> None:
        self._begin_state()

    def _reference_for(self, action_mask: torch.Tensor):
        if self.reference is None:
            return None
        if isinstance(self.history, PerTurnEntropyHistory):
            return self.history.token_reference(action_mask)
        return self.reference

    def _denominator(self, loss_batch_info: Mapping[str, Any]) -> Optional[torch.Tensor]:
        key = "global_batch_size" if self.config.aggregation == "trajectory" else "batch_num_tokens"
        total = loss_batch_info.get(key) if loss_batch_info else None
        if total is None:
            return None
        return torch.as_tensor(total, dtype=torch.float64) / float(loss_batch_info.get("dp_size", 1))

    def _global_entropy(self, local_parts: torch.Tensor, loss_batch_info: Any) -> float:
        """L_H over the micro-batches of this optimizer step seen so far, on all ranks.

        The host gives every micro-batch of one optimizer step the same loss_batch_info object;
        with one micro-batch per optimizer step (gas = 1) this is exactly the step's global L_H.
        """
        if loss_batch_info is not self._window_info:
            self._window_info = loss_batch_info
            self._window_sums = torch.zeros(2, dtype=torch.float64)
        reduced = self.context.all_reduce_sum(local_parts[:2].clone())
        self._window_sums += reduced.cpu()
        numerator, den = self._window_sums.tolist()
        return numerator / den if den > 0 else 0.0

    def policy_loss(self, host_outputs, *, action_mask, entropy, loss_batch_info):
        if entropy is None:
            raise RuntimeError("EPO needs the per-token entropy of the policy; the host adapter did not provide it")
        parts = step_statistic_parts(entropy, action_mask, self.config.aggregation)
        reference = self._reference_for(action_mask)
        denominator = self._denominator(loss_batch_info)
        linearize_at = None
        if reference is not None and self.config.penalty == "squared" and denominator is not None:
            linearize_at = self._global_entropy(parts, loss_batch_info)
        term, stats = epo_regularizer(
            entropy,
            action_mask,
            reference,
            self.beta,
            self.config,
            denominator=None if denominator is None else denominator.to(entropy.device),
            linearize_at=linearize_at,
        )
        extras = torch.tensor(
            [
                float(stats.get("penalty_num", 0.0)),
                float(stats["in_corridor_tokens"]),
                float(stats["tokens"]),
            ],
            dtype=torch.float64,
        )
        step_parts = torch.cat([parts.cpu(), extras])
        self._parts = step_parts if self._parts is None else self._parts + step_parts
        loss = host_outputs[0] + term.to(host_outputs[0].dtype)
        return (loss, *host_outputs[1:])

    def end_step(self) -> dict[str, float]:
        parts = self._parts if self._parts is not None else torch.zeros(_CORE_PARTS + 3, dtype=torch.float64)
        parts = self.context.all_reduce_sum(parts)
        stat = step_statistic(parts[:_CORE_PARTS])
        metrics = self._metrics(stat, parts)
        if stat.value is None or not math.isfinite(stat.value):
            self.skipped_steps += 1
            logger.warning("EPO step %d: no finite entropy statistic (%r); the history is unchanged", self.step, stat.value)
        elif isinstance(self.history, PerTurnEntropyHistory):
            self.history.push(stat.value, stat.turn_sums, stat.turn_counts)
        else:
            self.history.push(stat.value)
        metrics["skipped_steps"] = float(self.skipped_steps)
        self.step += 1
        self._begin_state()
        return metrics

    def _metrics(self, stat, parts: torch.Tensor) -> dict[str, float]:
        nan = math.nan
        ref = self.reference
        entropy = stat.value if stat.value is not None else nan
        tokens = float(parts[_TOKENS])
        if ref is None:
            lower = upper = penalty = in_corridor = nan
        else:
            lower, upper = self.config.kappa_left * ref, self.config.kappa_right * ref
            in_corridor = float(parts[_INSIDE]) / tokens if tokens else nan
            if self.config.penalty == "squared":
                penalty = max(0.0, lower - entropy) ** 2 + max(0.0, entropy - upper) ** 2
            else:
                den = float(parts[1])
                penalty = float(parts[_PENALTY_NUM]) / den if den else nan
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
            "in_corridor": in_corridor,
            "step": float(self.step),
            "turn_entropy_first": float(turn_means[0]) if len(seen) else nan,
            "turn_entropy_last": float(turn_means[-1]) if len(seen) else nan,
            "turns_max": float(seen[-1] + 1) if len(seen) else 0.0,
        }

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "config": self.config.to_dict(),
            "history": self.history.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("config", {})
        for key in ("aggregation", "reference", "window_size", "warmup"):
            if saved.get(key) != getattr(self.config, key):
                raise ValueError(
                    f"the EPO state in this checkpoint was written with epo.{key}={saved.get(key)!r}, "
                    f"but this run uses epo.{key}={getattr(self.config, key)!r}"
                )
        self.history.load_state_dict(state["history"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self._begin_state()
