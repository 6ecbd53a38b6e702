"""EPO as an openrlhf_hooks loss plugin, registered through the `openrlhf_hooks` entry point `epo`
exactly as a third-party plugin would be."""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import yaml

from openrlhf_hooks.api import LossPlugin, PluginConfigError, RankContext, RolloutProcessor
from openrlhf_hooks.hookspecs import hookimpl

from . import __version__
from .config import DEFAULT_PRESET, PRESETS, EPOConfig, EPOConfigError, field_help, field_names, parse_field
from .core import corridor_strength, turn_ids
from .core.objective import IndicatorPenaltyWarning
from .rank import EPORankLoss

def load_config_file(path: str) -> dict:
    """The mapping in an --epo.config YAML file (may hold `preset:` and any EPOConfig field)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PluginConfigError(f"--epo.config={path!r}: cannot read the file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PluginConfigError(f"--epo.config={path!r}: not a UTF-8 text file; expected a YAML mapping") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None)
        detail = f": {problem}" if problem else ""
        raise PluginConfigError(f"--epo.config={path!r}: not valid YAML{line}{detail}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PluginConfigError(f"--epo.config={path!r}: expected a mapping of EPO fields, got {type(data).__name__}")
    allowed = ("preset",) + field_names()
    for key in data:
        if key not in allowed:
            raise PluginConfigError(
                f"--epo.config={path!r}: unknown key {key!r}; allowed keys are {', '.join(allowed)}"
            )
    return data


def resolve_epo_config(flags: Mapping[str, Any]) -> EPOConfig:
    """Preset < --epo.config file < explicit --epo.<field> flags.

    Errors name the flag, or the file and its key when the bad value came from the file.
    """
    path = flags.get("config")
    from_file = load_config_file(path) if path else {}
    file_preset = from_file.pop("preset", None)
    if flags.get("preset"):
        preset = flags["preset"]
        if preset not in PRESETS:
            raise PluginConfigError(f"--epo.preset={preset!r} is invalid: allowed presets are {', '.join(PRESETS)}")
    else:
        preset = file_preset or DEFAULT_PRESET
        if not isinstance(preset, str) or preset not in PRESETS:
            raise PluginConfigError(
                f"--epo.config={path!r}: preset={preset!r} is invalid: allowed presets are {', '.join(PRESETS)}"
            )
    overrides = dict(from_file)
    from_flags = set()
    for field in field_names():
        text = flags.get(field)
        if text is not None:
            try:
                overrides[field] = parse_field(field, text)
            except EPOConfigError as exc:
                raise PluginConfigError(f"--{exc}") from None
            from_flags.add(field)
    try:
        return EPOConfig.from_preset(preset, **overrides)
    except EPOConfigError as exc:
        if exc.field in from_file and exc.field not in from_flags:
            raise PluginConfigError(
                f"--epo.config={path!r}: {exc.field}={exc.value!r} is invalid: {exc.allowed}"
            ) from None
        raise PluginConfigError(f"--{exc}") from None


def _get(args: Any, path: str, default: Any = None) -> Any:
    for part in path.split("."):
        args = getattr(args, part, default) if args is not None else default
    return args


_HOST_FLAGS = (
    "actor.entropy_coef",
    "actor.policy_loss_type",
    "actor.loss_agg_mode",
    "algo.advantage.estimator",
    "algo.kl.init_coef",
    "algo.kl.use_loss",
    "rollout.temperature",
    "rollout.batch_size",
    "rollout.n_samples_per_prompt",
    "train.batch_size",
    "train.micro_batch_size",
    "train.max_epochs",
    "train.num_episodes",
    "train.agent_func_path",
    "ds.zero_stage",
    "ds.packing_samples",
    "ds.ring_attn_size",
    "ckpt.load_enable",
    "ckpt.save_steps",
)


class EPOLossPlugin(LossPlugin):
    name = "epo"
    version = __version__
    total_steps_knob = "total_steps"

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--epo.preset", metavar="NAME", help=f"preset: {', '.join(PRESETS)} (default: {DEFAULT_PRESET})")
        group.add_argument("--epo.config", metavar="FILE.yaml", help="YAML file with `preset:` and EPO fields")
        for field in field_names():
            group.add_argument(f"--epo.{field}", metavar="VALUE", help=field_help(field))

    def resolve_config(self, flags: Mapping[str, Any]) -> dict:
        config = resolve_epo_config(flags)
        if config.penalty == "indicator":
            warnings.warn(
                "--epo.penalty=indicator reproduces the released code: it adds NO gradient",
                IndicatorPenaltyWarning,
                stacklevel=2,
            )
        return config.to_dict()

    def check_host(self, host_args: Any, config: Mapping[str, Any]) -> None:
        coef = _get(host_args, "actor.entropy_coef")
        if coef not in (None, 0, 0.0):
            raise PluginConfigError(
                f"--actor.entropy_coef={coef!r} cannot be combined with --loss_plugin epo: EPO's entropy bonus "
                "replaces the host's (it would count twice); drop --actor.entropy_coef"
            )
        ring = _get(host_args, "ds.ring_attn_size", 1) or 1
        if ring > 1:
            raise PluginConfigError(
                f"--ds.ring_attn_size={ring} is not supported with --loss_plugin epo: ring attention splits "
                "sequences across ranks, so turns cannot be seen whole"
            )

    def host_summary(self, host_args: Any) -> dict:
        return {path: _get(host_args, path) for path in _HOST_FLAGS}

    def report(self, config: Mapping[str, Any], total_steps: Optional[int]) -> dict:
        return {"corridor": _corridor(config, total_steps)}

    def start_up_warnings(self, config: Mapping[str, Any], total_steps: Optional[int]) -> list[str]:
        strength = _corridor(config, total_steps)
        if strength["holds_from_above"]:
            return []
        low, high = strength["beta_alpha"]
        if high == 0:
            why = "alpha is 0: the bonus alone"
        elif config["penalty"] == "hinge":
            why = f"beta_k * alpha stays in [{low:.3g}, {high:.3g}], never above 1: above the corridor the hinge only scales the bonus by 1 - beta_k * alpha"
        elif config["penalty"] == "squared":
            nearest, farthest = strength["holds_beyond"]
            where = f"{nearest:.3g} nats" if farthest is None else f"{nearest:.3g} to {farthest:.3g} nats"
            why = f"the squared penalty's slope is 0 at the upper bound; it pulls entropy down only once L_H is {where} above it"
        else:
            why = "the indicator penalty has no gradient"
        return [
            f"the corridor does not hold entropy down from above ({why}), so at these settings EPO acts as an "
            "entropy bonus (docs/spec.md section 8; --epo.preset two-sided holds on both sides)"
        ]

    def build_rank_loss(self, host_args: Any, config: Mapping[str, Any], context: RankContext) -> EPORankLoss:
        epo = EPOConfig.from_dict(config)
        # K: --epo.total_steps when given, else the launcher's count
        total_steps = epo.total_steps if epo.total_steps is not None else context.total_steps
        if total_steps is None:
            raise PluginConfigError(
                f"loss plugin 'epo' needs the run's total RL steps and they are unknown ({context.total_steps_note}); "
                "set --epo.total_steps"
            )
        return EPORankLoss(epo, dataclasses.replace(context, total_steps=int(total_steps)))


def _corridor(config: Mapping[str, Any], total_steps: Optional[int]) -> dict:
    """corridor_strength for a resolved config; --epo.total_steps wins over the launcher's K."""
    if config.get("total_steps") is not None:
        total_steps = config["total_steps"]
    return corridor_strength(config["penalty"], config["alpha"], config["gamma"], config["mid_fraction"], total_steps)


class TurnStatsProcessor(RolloutProcessor):
    """Adds info['turns'] (number of agent turns per sample, from the action mask) to each experience."""

    name = "turn_stats"

    def process(self, experience: Any, host_args: Any) -> Any:
        mask = experience.action_mask
        if mask is not None and isinstance(experience.info, dict):
            experience.info["turns"] = turn_ids(mask).max(dim=-1).values.to(torch.float32)
        return experience


@hookimpl
def register_loss_plugins(register):
    register(EPOLossPlugin())


@hookimpl
def register_rollout_processors(register):
    register(TurnStatsProcessor())
