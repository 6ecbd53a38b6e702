"""Launch tests/support/ds_worker.py on 1 or 2 CPU ranks (gloo) and collect what each rank saved."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gloo import free_port
from openrlhf_hooks.testing import relative_difference, tiny_qwen2  # noqa: F401  (re-exported for the tests)

WORKER = Path(__file__).parent / "ds_worker.py"


def run_ranks(world, flags, model_dir, out_dir, steps, env=None, tag=None):
    """Run `steps` RL steps on `world` ranks; returns the per-rank results (see ds_worker.main)."""
    port = free_port()
    tag = tag or f"w{world}"
    processes, outputs, logs = [], [], []
    for rank in range(world):
        rank_env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), **(env or {}))
        rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        out = out_dir / f"{tag}_r{rank}.pt"
        log = open(out_dir / f"{tag}_r{rank}.log", "w")
        command = [sys.executable, str(WORKER), str(out), str(model_dir), str(steps), *flags]
        processes.append(subprocess.Popen(command, env=rank_env, stdout=log, stderr=subprocess.STDOUT))
        outputs.append(out)
        logs.append(log)
    for process, log in zip(processes, logs):
        process.wait(timeout=900)
        log.close()
    for rank, process in enumerate(processes):
        if process.returncode != 0:
            tail = (out_dir / f"{tag}_r{rank}.log").read_text()[-4000:]
            pytest.fail(f"{tag}: rank {rank} of {world} exited with {process.returncode}:\n{tail}")
    return [torch.load(o, weights_only=False) for o in outputs]
