"""Rank agreement: the data-parallel ranks compare a checksum of a loss plugin's state_dict().

A plugin's state (EPO: its entropy history) must be identical on every rank, or the ranks train on
different references without anyone noticing. At the start of an RL step, every rank all-reduces one
small vector: [ranks asking for a check, one checksum slot per rank]. A check is due every
`RankLoss.check_every` steps, and always on the first step after a resume (the ranks compare what
they loaded before anything trains on it). The all-reduce runs every step, due or not, because ranks
that disagree may also disagree about whether a check is due; if any rank asked and the slots
differ, every rank raises RankStateMismatchError naming the ranks, together.

Host-neutral: the collective comes in through RankContext.all_reduce_sum.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import torch

from .api import PluginError, RankContext, RankLoss, RankStateMismatchError


def tensor_as_list(value: Any) -> Any:
    """json.dumps' default for plain state: tensors count by their values; anything else is refused."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not plain data")


def state_checksum(state: Mapping[str, Any]) -> int:
    """A 52-bit hash of a plain state (exact in float64, so it survives an all-reduce); never 0.

    JSON writes floats with repr, which round-trips exactly, so equal states give equal checksums;
    tensors count by their values.
    """
    text = json.dumps(state, sort_keys=True, default=tensor_as_list)
    digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
    return (digest >> 12) | 1


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


class RankAgreement:
    """The check for one rank's RankLoss; `step` counts RL steps (kept in the hook layer's checkpoint)."""

    def __init__(self, rank_loss: RankLoss, context: RankContext, plugin_name: str):
        self.rank_loss = rank_loss
        self.context = context
        self.plugin_name = plugin_name
        self.step = 0
        self.resumed = False

    def restored(self, step: int) -> None:
        """The plugin's state was loaded from a checkpoint written after `step` RL steps."""
        self.step = step
        self.resumed = True

    def check(self) -> None:
        """At the start of every RL step, on every rank (one all-reduce of dp_size + 1 numbers)."""
        every = self.rank_loss.check_every
        due = self.resumed or (every > 0 and self.step % every == 0)
        vector = torch.zeros(1 + self.context.dp_size, dtype=torch.float64)
        if due:
            try:
                checksum = state_checksum(self.rank_loss.state_dict())
            except TypeError as exc:
                raise PluginError(
                    f"loss plugin {self.plugin_name!r}: state_dict() must return plain data (numbers, strings, lists, "
                    f"dicts with string keys, tensors) to be checkpointed and compared across ranks: {exc}"
                ) from None
            vector[0] = 1.0
            vector[1 + self.context.rank] = float(checksum)
        vector = self.context.all_reduce_sum(vector).cpu()
        step, resumed = self.step, self.resumed
        self.step, self.resumed = step + 1, False
        if vector[0] == 0:
            return
        groups: dict[int, list[int]] = {}
        for rank, value in enumerate(vector[1:].tolist()):
            groups.setdefault(int(value), []).append(rank)
        if len(groups) == 1:
            return
        held = "; ".join(
            f"{_ranks(ranks)}: " + ("no check (at another step, or not resumed)" if value == 0 else f"{value:013x}")
            for value, ranks in sorted(groups.items(), key=lambda item: item[1])
        )
        when = " (after a resume)" if resumed else ""
        raise RankStateMismatchError(
            f"loss plugin {self.plugin_name!r}: the data-parallel ranks disagree about its state at step {step}{when}: "
            f"checksums {held}; every rank must hold the same state (resume all ranks from one checkpoint)"
        )
