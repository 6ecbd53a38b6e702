"""What a loss plugin and a rollout post-processor provide. Host-neutral: no OpenRLHF import here.

A loss plugin lives in two places:
- the driver (launcher): its flags, their resolution into a plain config dict, and checks on the
  host's arguments, all before Ray starts;
- every training rank: a RankLoss built from the host's arguments and that plain config. Only the
  plugin's NAME and the config dict cross process boundaries; each worker resolves the plugin
  again through the entry points, so nothing depends on the driver's process state.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch


class PluginError(Exception):
    """A plugin could not be found, loaded or registered."""


class PluginConfigError(ValueError):
    """A bad plugin flag value; the message names the flag, the value and what is allowed."""


class RankStateMismatchError(RuntimeError):
    """The data-parallel ranks hold different loss-plugin state (their state_dict() checksums differ)."""


@dataclass
class RankContext:
    """What the host gives a RankLoss on one training rank.

    rank: this rank's index in the data-parallel group, 0 <= rank < dp_size.
    all_reduce_sum: returns the SUM of a tensor over the data-parallel group (identity with one rank);
        it may also overwrite its input, so pass a tensor you no longer need.
    total_steps: K, the run's RL steps as the launcher counted them from the host's arguments
        (hooks/openrlhf_hooks/steps.py), or None when they cannot be counted (total_steps_note says why). A plugin
        with its own setting for K (EPO: --epo.total_steps) applies it itself.
    """

    rank: int
    dp_size: int
    total_steps: Optional[int]
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    total_steps_note: str = ""


class RankLoss:
    """The rank-side part of a loss plugin; the host adapter drives it.

    Call order per RL step, on every rank of the data-parallel group (any method may run collectives
    through RankContext.all_reduce_sum):
        begin_step()
        for each optimizer step (a mini-batch; several per RL step with several mini-batches or epochs):
            begin_optimizer_step(entropies)
            for each micro-batch of that optimizer step: policy_loss(...)
        end_step()

    What policy_loss adds to the host's loss is optimised but not logged as the host's
    `policy_loss`: the host's metric stays its own, and the plugin reports its term in end_step.
    """

    #: ask the host for per-token entropy H [B, A] (with gradient) of the policy on every micro-batch
    needs_entropy: bool = False

    #: the hook layer compares a checksum of state_dict() across the data-parallel ranks at the start
    #: of every this many RL steps, and always on the first step after a resume (0: only then)
    check_every: int = 50

    def begin_step(self) -> None:
        """An RL step's training starts on this rank."""

    def needs_optimizer_step_entropy(self) -> bool:
        """True to receive, before each optimizer step, the entropy of all its micro-batches on this
        rank (begin_optimizer_step). Costs one extra no-grad forward of the step's samples; must give
        the same answer on every rank (decide from state the ranks share)."""
        return False

    def begin_optimizer_step(self, entropies: Optional[list]) -> None:
        """An optimizer step starts on this rank, before the backward of its first micro-batch.

        entropies: when needs_optimizer_step_entropy() was True, one (entropy [B, A], action_mask
        [B, A]) pair per micro-batch of this optimizer step on this rank, computed without gradient
        from the parameters the optimizer step starts from; else None.
        """

    def policy_loss(
        self,
        host_outputs: tuple,
        *,
        action_mask: torch.Tensor,
        entropy: Optional[torch.Tensor],
        loss_batch_info: Mapping[str, Any],
    ) -> tuple:
        """Return the host's loss tuple with its first element (the loss) replaced; same arity."""
        raise NotImplementedError

    def end_step(self) -> dict[str, float]:
        """An RL step's training ended on this rank; returns metrics (logged as train/<plugin>/<name>)."""
        return {}

    def state_dict(self) -> dict:
        """Plain state saved in the host's checkpoint (identical on every rank)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict returned."""


class LossPlugin:
    """A loss plugin. Subclass it, set `name` and `version`, and register an instance through
    the `register_loss_plugins` hook of a module listed under the `openrlhf_hooks` entry points."""

    name: str = ""
    version: str = "0"
    #: the knob of this plugin's config that sets K itself (EPO: "total_steps", i.e. --epo.total_steps);
    #: when the user gives it, the launcher does not count K; when K cannot be counted, it names the flag
    total_steps_knob: str = ""

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        """Add this plugin's flags, each spelled `--<name>.<knob>`, with help text."""

    def resolve_config(self, flags: Mapping[str, Any]) -> dict:
        """Turn this plugin's parsed flags (knob -> value, None when not given) into a validated,
        plain (JSON-serialisable) config; raise PluginConfigError naming the flag."""
        return {}

    def check_host(self, host_args: Any, config: Mapping[str, Any]) -> None:
        """Raise PluginConfigError when host flags contradict the plugin (runs before Ray starts)."""

    def host_summary(self, host_args: Any) -> dict:
        """The host flags that matter to this plugin, for the dry run's JSON."""
        return {}

    def report(self, config: Mapping[str, Any], total_steps: Optional[int]) -> dict:
        """Entries this plugin adds to the dry run's JSON object, by key (plain data; EPO: "corridor").
        total_steps: K as the launcher counted it (None when it did not or could not)."""
        return {}

    def start_up_warnings(self, config: Mapping[str, Any], total_steps: Optional[int]) -> list[str]:
        """Lines the launcher prints as warnings (dry run and real run alike) once K is counted,
        before Ray starts: what the user should know about this configuration."""
        return []

    def build_rank_loss(self, host_args: Any, config: Mapping[str, Any], context: RankContext) -> RankLoss:
        """Build the rank-side loss on one training rank."""
        raise NotImplementedError


class RolloutProcessor:
    """Per-rank processing of each experience batch before it enters the replay buffer
    (e.g. turn ids from the action mask, reward scaling or clipping)."""

    name: str = ""

    def process(self, experience: Any, host_args: Any) -> Any:
        """Return the (possibly modified) experience."""
        return experience
