"""Opt-in fixes of OpenRLHF 0.11.2 bugs: `--host_fixes NAME[,NAME]` on the launcher.

Off by default: without the flag the host runs unchanged. Every fix is listed in FIXES with the
host's file:line, what goes wrong, what the fix changes, and the test that shows the bug on the
unpatched host (hooks/tests/test_host_fixes.py). A fix is applied by `activate(names)` in every
process of the run: the driver (the launcher calls it), and every Ray worker, where the host's
PPOTrainer actor builds its experiences (the launcher passes OPENRLHF_HOOKS_HOST_FIXES to the
workers and runs `openrlhf_hooks.worker_setup.run` there).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

ENV = "OPENRLHF_HOOKS_HOST_FIXES"

# A group whose rewards differ by at most this much counts as all-equal: it carries no signal.
GROUP_SPREAD_FLOOR = 1e-6


class HostFixError(ValueError):
    """An unknown --host_fixes name (one line, naming it)."""


def zero_constant_groups(experiences: Sequence[Any], group_size: int, floor: float = GROUP_SPREAD_FLOOR) -> int:
    """Set the rewards of every prompt group whose spread is at most `floor` to exactly 0, in place;
    returns how many groups. Groups are laid out as the host lays them out (experience.index holds
    each sample's position in prompt order, group_size samples per prompt)."""
    if group_size < 2:
        return 0
    order = torch.tensor([i for experience in experiences for i in experience.index])
    rewards = torch.cat([experience.rewards for experience in experiences])
    by_prompt = torch.empty_like(rewards)
    by_prompt[order] = rewards
    groups = by_prompt.reshape(-1, group_size)
    constant = (groups.max(-1).values - groups.min(-1).values) <= floor
    if not bool(constant.any()):
        return 0
    per_sample = constant.repeat_interleave(group_size)[order]
    start = 0
    for experience in experiences:
        stop = start + len(experience.rewards)
        experience.rewards = torch.where(per_sample[start:stop], torch.zeros_like(experience.rewards), experience.rewards)
        start = stop
    return int(constant.sum())


def _group_norm_without_residue(original: Callable) -> Callable:
    def apply_length_penalties(experiences, args):
        original(experiences, args)  # the host's penalties, and its logged info["reward"], first
        if args.algo.advantage.estimator == "group_norm":
            zero_constant_groups(experiences, args.rollout.n_samples_per_prompt)

    return apply_length_penalties


@dataclass(frozen=True)
class HostFix:
    module: str  # the host module whose global is rebound
    name: str  # the global
    host: str  # where the bug is (file:line under openrlhf/)
    bug: str
    change: str
    test: str  # the test that shows the bug on the unpatched host
    make: Callable[[Any], Any]  # original -> replacement


FIXES: dict[str, HostFix] = {
    "group_norm": HostFix(
        module="openrlhf.trainer.ppo_utils.experience_maker",
        name="apply_length_penalties",
        host="trainer/ppo_utils/experience_maker.py:273-274 (rewards from samples_generator.py:304, float32)",
        bug="group_norm computes (r - mean) / (std + 1e-9) in float32; for a group of equal rewards that are "
        "not exact binary fractions (0.3, 0.1, 0.7: partial credit, format rewards) mean and std keep rounding "
        "residue, so the group gets advantages of about +-1 or, where std rounds to 0, up to 1e-9 / residue "
        "(clipped to --reward.clip_range): the host reinforces whatever an all-equal group did",
        change="after the host's length penalties (experience_maker.py:247), the rewards of a group whose spread "
        f"is at most {GROUP_SPREAD_FLOOR:g} are set to 0 (group_norm is shift-invariant, so only the residue "
        "goes): such a group gets advantage 0; every other group, and binary rewards, get exactly the host's "
        "advantages; the logged reward is unchanged",
        test="hooks/tests/test_host_fixes.py::test_unpatched_group_norm_gives_equal_groups_spurious_advantages",
        make=_group_norm_without_residue,
    ),
}

_applied: dict[str, tuple[Any, Any]] = {}  # name -> (module, original)


def check(names: Sequence[str]) -> list[str]:
    """The names, validated; HostFixError names an unknown one."""
    unknown = [name for name in names if name not in FIXES]
    if unknown:
        raise HostFixError(f"--host_fixes: unknown fix {unknown[0]!r}; known fixes: {', '.join(sorted(FIXES))}")
    return list(names)


def parse(text: str) -> list[str]:
    return check([name.strip() for name in text.split(",") if name.strip()])


def activate(names: Sequence[str]) -> None:
    """Apply these fixes in this process (idempotent)."""
    for name in check(names):
        if name in _applied:
            continue
        fix = FIXES[name]
        module = importlib.import_module(fix.module)
        original = getattr(module, fix.name)
        _applied[name] = (module, original)
        setattr(module, fix.name, fix.make(original))
        # one line per process, so a run's log shows where the fix is on (Ray prefixes each worker's)
        print(f"openrlhf_hooks: host fix {name} active in pid {os.getpid()}", file=sys.stderr, flush=True)


def activate_requested() -> None:
    """Apply the fixes OPENRLHF_HOOKS_HOST_FIXES names (what the launcher passes to every worker)."""
    activate(parse(os.environ.get(ENV, "")))


def deactivate() -> None:
    """Undo activate() in this process (tests)."""
    while _applied:
        name, (module, original) = _applied.popitem()
        setattr(module, FIXES[name].name, original)
