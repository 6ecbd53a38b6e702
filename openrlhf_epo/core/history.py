"""The entropy history and its detached reference (docs/spec.md section 2).

Step k's reference is built from the statistics S_0 .. S_{k-1} only: push S_k after step k.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch

from .aggregation import turn_ids

STATE_VERSION = 1
MAX_TURNS = 64


def _finite(value, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}; a non-finite statistic is never pushed")
    return value


def _check_state(state: dict, kind: str, settings: dict) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"entropy history state is of kind {state.get('kind')!r}, expected {kind!r}")
    if state.get("version") != STATE_VERSION:
        raise ValueError(
            f"entropy history state has version {state.get('version')!r}; this build reads version {STATE_VERSION} "
            "only (the checkpoint was written by another openrlhf-epo release)"
        )
    for name, expected in settings.items():
        if state.get(name) != expected:
            raise ValueError(
                f"entropy history was saved with {name}={state.get(name)!r} but this run uses {name}={expected!r}"
            )


class EntropyHistory:
    """Step statistics S_0, S_1, ...; reference = mean of the last `window_size` (None: all of them).

    reference() is None until the history holds `warmup` entries (and always while it is empty).
    """

    def __init__(self, window_size: Optional[int], warmup: int):
        if window_size is not None and window_size < 1:
            raise ValueError(f"window_size={window_size!r} is invalid: must be >= 1 or None")
        if warmup < 0:
            raise ValueError(f"warmup={warmup!r} is invalid: must be >= 0")
        self.window_size = window_size
        self.warmup = warmup
        self._values: list[float] = []

    def push(self, value: float) -> None:
        self._values.append(_finite(value, "step entropy statistic"))

    def push_step(self, stat) -> None:
        """Append a step's StepStatistic (its value; this history keeps no turns)."""
        self.push(stat.value)

    def reference(self) -> Optional[float]:
        if len(self._values) < max(self.warmup, 1):
            return None
        used = self._values if self.window_size is None else self._values[-self.window_size :]
        return math.fsum(used) / len(used)

    def token_reference(self, action_mask: torch.Tensor) -> Optional[float]:
        """The reference every action token of `action_mask` is compared with: here one scalar."""
        return self.reference()

    def values(self) -> list[float]:
        return list(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def state_dict(self) -> dict:
        return {
            "kind": "global",
            "version": STATE_VERSION,
            "window_size": self.window_size,
            "warmup": self.warmup,
            "values": list(self._values),
        }

    def load_state_dict(self, state: dict) -> None:
        _check_state(state, "global", {"window_size": self.window_size, "warmup": self.warmup})
        self._values = [_finite(v, "saved step statistic") for v in state["values"]]


class PerTurnEntropyHistory:
    """Per-turn reference (spec section 2, `reference="per_turn"`).

    Keeps, per turn index t (turns past `max_turns` share the last bucket), the sums of H*m and of m
    over the steps in which turn t occurred, over the last `window_size` steps (None: all steps).
    A turn's reference is its mean entropy; a turn never seen falls back to the global reference,
    which a plain EntropyHistory of the step statistics provides. No zero-padding.
    """

    def __init__(self, window_size: Optional[int], warmup: int, max_turns: int = MAX_TURNS):
        if max_turns < 1:
            raise ValueError(f"max_turns={max_turns!r} is invalid: must be >= 1")
        self.max_turns = max_turns
        self.global_history = EntropyHistory(window_size, warmup)
        self._steps: deque = deque(maxlen=window_size)  # (sums, counts) per step, windowed only
        self._sums = [0.0] * max_turns  # running totals, cumulative only
        self._counts = [0.0] * max_turns

    @property
    def window_size(self) -> Optional[int]:
        return self.global_history.window_size

    @property
    def warmup(self) -> int:
        return self.global_history.warmup

    def push(self, value: float, turn_sums, turn_counts) -> None:
        """Append step statistic `value` and the step's per-turn sums of H*m and of m ([max_turns])."""
        sums = [_finite(v, "per-turn entropy sum") for v in torch.as_tensor(turn_sums).tolist()]
        counts = [_finite(v, "per-turn token count") for v in torch.as_tensor(turn_counts).tolist()]
        if len(sums) != self.max_turns or len(counts) != self.max_turns:
            raise ValueError(f"per-turn sums must have {self.max_turns} entries, got {len(sums)} and {len(counts)}")
        self.global_history.push(value)
        if self.window_size is None:
            self._sums = [a + b for a, b in zip(self._sums, sums)]
            self._counts = [a + b for a, b in zip(self._counts, counts)]
        else:
            self._steps.append((sums, counts))

    def push_step(self, stat) -> None:
        """Append a step's StepStatistic: its value and its per-turn sums."""
        self.push(stat.value, stat.turn_sums, stat.turn_counts)

    def reference(self) -> Optional[float]:
        return self.global_history.reference()

    def _totals(self):
        if self.window_size is None:
            return self._sums, self._counts
        sums = [math.fsum(step[0][t] for step in self._steps) for t in range(self.max_turns)]
        counts = [math.fsum(step[1][t] for step in self._steps) for t in range(self.max_turns)]
        return sums, counts

    def turn_reference(self) -> Optional[torch.Tensor]:
        """float64 [max_turns]: reference of turn t at index t-1; None during warm-up."""
        fallback = self.reference()
        if fallback is None:
            return None
        sums, counts = self._totals()
        return torch.tensor([s / c if c > 0 else fallback for s, c in zip(sums, counts)], dtype=torch.float64)

    def token_reference(self, action_mask: torch.Tensor) -> Optional[torch.Tensor]:
        """float64 [B, T]: each action token's turn reference (0 off the mask); None during warm-up."""
        per_turn = self.turn_reference()
        if per_turn is None:
            return None
        ids = turn_ids(action_mask).clamp(max=self.max_turns)
        per_turn = per_turn.to(action_mask.device)
        return torch.where(ids > 0, per_turn[(ids - 1).clamp(min=0)], torch.zeros((), dtype=torch.float64))

    def __len__(self) -> int:
        return len(self.global_history)

    def state_dict(self) -> dict:
        return {
            "kind": "per_turn",
            "version": STATE_VERSION,
            "window_size": self.window_size,
            "warmup": self.warmup,
            "max_turns": self.max_turns,
            "global": self.global_history.state_dict(),
            "steps": [[list(s), list(c)] for s, c in self._steps],
            "sums": list(self._sums),
            "counts": list(self._counts),
        }

    def load_state_dict(self, state: dict) -> None:
        _check_state(
            state,
            "per_turn",
            {"window_size": self.window_size, "warmup": self.warmup, "max_turns": self.max_turns},
        )
        self.global_history.load_state_dict(state["global"])
        self._steps = deque(
            (([_finite(v, "saved per-turn sum") for v in s], [_finite(v, "saved per-turn count") for v in c])
             for s, c in state["steps"]),
            maxlen=self.window_size,
        )  # fmt: skip
        self._sums = [_finite(v, "saved per-turn sum") for v in state["sums"]]
        self._counts = [_finite(v, "saved per-turn count") for v in state["counts"]]
