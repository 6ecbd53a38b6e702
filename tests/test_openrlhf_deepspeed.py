"""EPO inside OpenRLHF 0.11.2's real training step, on two CPU ranks over gloo with real DeepSpeed.

tests/support/ds_worker.py runs the host's DeepspeedStrategy, Actor (a tiny Qwen2 in bf16, as the
host loads it), ZeRO engine and ActorPPOTrainer.training_step with the plugin installed by
openrlhf_hooks. The same global batch of 4 multi-turn trajectories is trained for 3 RL steps by one
process (micro-batch 4) and by two (micro-batch 2 each).

Tolerances: the step statistics, losses and EPO metrics agree to 1e-4 relative; gradients to 2e-2
relative (Frobenius) -- the model computes in bf16 and the two runs multiply matrices of different
batch shapes. Both ranks agree with each other exactly.
"""

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gloo import free_port  # tests/support
from openrlhf_epo.core import phase_weight

SUPPORT = Path(__file__).parent / "support"
STEPS = 3

CASES = {
    # seed preset (trajectory aggregation, squared penalty on the global L_H), a corridor narrow
    # enough that the penalty is active from step 1
    "zero2-seed": ["--ds.zero_stage", "2", "--loss_plugin", "epo", "--epo.warmup", "1", "--epo.window_size", "2",
                   "--epo.kappa_left", "0.99999", "--epo.kappa_right", "1.0", "--epo.alpha", "1000"],
    # released-code layout (token aggregation, per-turn reference) with the paper's hinge penalty
    "zero3-per-turn-hinge": ["--ds.zero_stage", "3", "--loss_plugin", "epo", "--epo.preset", "released-code",
                             "--epo.penalty", "hinge", "--epo.kappa_left", "0.999", "--epo.kappa_right", "1.0",
                             "--rollout.temperature", "0.7"],
}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny-qwen2")
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def run_ranks(world, flags, model_dir, out_dir, checkpoint_dir=None):
    port = free_port()
    processes, outputs, logs = [], [], []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if checkpoint_dir:
            env["EPO_TEST_CKPT"] = str(checkpoint_dir)
        out = out_dir / f"w{world}_r{rank}.pt"
        log = open(out_dir / f"w{world}_r{rank}.log", "w")
        command = [sys.executable, str(SUPPORT / "ds_worker.py"), str(out), str(model_dir), str(STEPS), *flags]
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        outputs.append(out)
        logs.append(log)
    for process, log in zip(processes, logs):
        process.wait(timeout=900)
        log.close()
    for rank, process in enumerate(processes):
        if process.returncode != 0:
            tail = (out_dir / f"w{world}_r{rank}.log").read_text()[-4000:]
            pytest.fail(f"rank {rank} of {world} exited with {process.returncode}:\n{tail}")
    return [torch.load(o, weights_only=False) for o in outputs]


def _relative(a, b):
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5
    den = sum(float((a[k] ** 2).sum()) for k in a) ** 0.5
    return num / den


@pytest.fixture(scope="module", params=sorted(CASES))
def runs(request, tiny_model, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(request.param)
    flags = CASES[request.param]
    single = run_ranks(1, flags, tiny_model, out_dir)[0]
    pair = run_ranks(2, flags, tiny_model, out_dir, checkpoint_dir=out_dir / "ckpt")
    if not all(math.isfinite(loss) for rank in pair for loss in rank["losses"]):
        # Seen once in about six runs on this 2-core machine, ZeRO-3 only: on both gloo ranks every
        # logit of the host's forward was NaN from step 0 (EPO's own check reported and skipped those
        # steps). Not understood yet (README "Status"); one fresh launch, and a second failure fails.
        warnings.warn(f"{request.param}: the 2-rank run had non-finite losses; launching it once more")
        retry_dir = tmp_path_factory.mktemp(f"{request.param}-retry")
        pair = run_ranks(2, flags, tiny_model, retry_dir, checkpoint_dir=retry_dir / "ckpt")
    return request.param, single, pair


def test_loss_and_gradients_equal_one_process(runs):
    _, single, pair = runs
    for step in range(STEPS):
        # each rank's loss is its share pre-multiplied by dp_size, like the host's aggregate_loss
        mean_of_ranks = (pair[0]["losses"][step] + pair[1]["losses"][step]) / 2
        assert mean_of_ranks == pytest.approx(single["losses"][step], rel=1e-4, abs=1e-6)
        assert _relative(single["grads"][step], pair[0]["grads"][step]) < 2e-2
        assert _relative(pair[0]["grads"][step], pair[1]["grads"][step]) == 0.0
    # step 0 has zero advantages: its gradient is EPO's alone, and it is not zero
    assert sum(float(g.abs().sum()) for g in single["grads"][0].values()) > 0


def test_reference_history_and_phase_weight_identical(runs):
    name, single, pair = runs
    for step in range(STEPS):
        rank0, rank1 = pair[0]["records"][step], pair[1]["records"][step]
        assert rank0 == rank1 or _same(rank0, rank1)
        for key in ("epo/entropy", "epo/reference", "epo/beta", "epo/penalty", "epo/in_corridor"):
            expected, got = single["records"][step]["metrics"][key], rank0["metrics"][key]
            assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected, rel=1e-4), key
        config = single["state"]["state"]["config"]
        assert rank0["metrics"]["epo/beta"] == phase_weight(step, STEPS, config["gamma"], config["mid_fraction"])
    assert len(pair[0]["state"]["state"]["history"].get("values", pair[0]["state"]["state"]["history"].get("global", {}).get("values", []))) == STEPS
    # the penalty was active, not only the bonus
    assert any(r["metrics"]["epo/penalty"] > 0 for r in single["records"])


def _same(a, b):
    """Exact equality that treats nan == nan."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def test_checkpoint_round_trip_through_host_save_and_load(runs):
    _, _, pair = runs
    for rank in (0, 1):
        restored = pair[rank]["restored"]
        assert restored["global_step"] == STEPS  # the host's own client state came back too
        assert restored["state"] == pair[rank]["state"]
        assert restored["state"]["state"]["step"] == STEPS
        assert restored["reference"] is not None
