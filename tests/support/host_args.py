"""The host's real args for a CPU test: OpenRLHF's own parser and validation, through our launcher.

`host_args(argv)` runs `python -m openrlhf_hooks.train_ppo_ray argv` up to the point where train()
would start Ray, and returns the host's hierarchized args with the plugin settings attached.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import stand_ins  # noqa: E402

stand_ins.install()

from openrlhf_hooks.plugins import get_registry  # noqa: E402
from openrlhf_hooks.train_ppo_ray import ARGS_KEY, resolve, run_host  # noqa: E402


class _Stop(Exception):
    pass


def host_args(argv):
    settings, _, rest = resolve(argv, get_registry())
    captured = {}

    def on_args_ready(args):
        if settings is not None:
            setattr(args, ARGS_KEY, settings)
        captured["args"] = args
        raise _Stop

    try:
        run_host(rest, on_args_ready)
    except _Stop:
        pass
    return captured["args"]


def tiny_host_flags(model_dir, world_size, *extra):
    """Flags for a tiny CPU run: one micro-batch per rank per optimizer step (gas = 1)."""
    return [
        "--actor.model_name_or_path", str(model_dir),
        "--ds.attn_implementation", "eager",
        "--algo.advantage.estimator", "group_norm",
        "--rollout.n_samples_per_prompt", "2",
        "--rollout.batch_size", "2",
        "--train.batch_size", "4",
        "--train.micro_batch_size", str(4 // world_size),
        "--actor.num_gpus_per_node", str(world_size),
        "--train.agent_func_path", "agent.py",
        *extra,
    ]  # fmt: skip
