"""The host's real args for a CPU test: OpenRLHF's own parser and validation, through our launcher.

`host_args(argv)` (openrlhf_hooks.testing's) runs `python -m openrlhf_hooks.train_ppo_ray argv` up to
the point where train() would start Ray, and returns the host's hierarchized args with the plugin
settings attached, the plugin's check_host passed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import stand_ins  # noqa: E402

stand_ins.install()

from openrlhf_hooks.testing import host_args  # noqa: E402,F401  (re-exported for the tests)


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
