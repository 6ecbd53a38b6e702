"""Launch tests/support/ds_worker.py on 1 or 2 CPU ranks (gloo) and collect what each rank saved."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gloo import free_port

WORKER = Path(__file__).parent / "ds_worker.py"


def tiny_qwen2(path, initializer_range=0.02):
    """A 2-layer Qwen2 with a 128-token vocabulary, saved to `path`. A larger initializer_range
    gives sharper next-token distributions, so trajectories differ in entropy."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


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


def relative_difference(a, b):
    """Frobenius norm of a - b over all parameters, relative to that of a."""
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    den = sum(float((a[k] ** 2).sum()) for k in a) ** 0.5
    return num / den
