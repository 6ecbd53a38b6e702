"""Run the launcher (or OpenRLHF's own CLI with --host) in a CPU test process, with the
flash_attn/vllm stand-ins installed first (see stand_ins.py)."""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(__file__))
import stand_ins  # noqa: E402

stand_ins.install()

if __name__ == "__main__":
    if sys.argv[1:2] == ["--host"]:
        sys.argv = ["openrlhf.cli.train_ppo_ray", *sys.argv[2:]]
        runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)
    else:
        from openrlhf_hooks.train_ppo_ray import main

        sys.exit(main(sys.argv[1:]))
