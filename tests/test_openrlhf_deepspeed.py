"""EPO inside OpenRLHF 0.11.2's real training step, on two CPU ranks over gloo with real DeepSpeed.

tests/support/ds_worker.py runs the host's DeepspeedStrategy, Actor (a tiny Qwen2 in bf16, as the
host loads it), ZeRO engine, replay buffer and ActorPPOTrainer.ppo_train with the plugin installed by
openrlhf_hooks. The same global batch of 4 multi-turn trajectories is trained for 3 RL steps by one
process (micro-batch 4) and by two (micro-batch 2 each).

Tolerances: the step statistics and EPO metrics agree to 1e-4 relative; the host's policy loss and
the gradients to 2e-2 relative (Frobenius) -- the model computes in bf16 and the two runs multiply
matrices of different batch shapes. Both ranks agree with each other exactly.
"""

import math

import pytest

from ds_ranks import relative_difference, run_ranks, tiny_qwen2  # tests/support
from openrlhf_epo.core import phase_weight

STEPS = 3

CASES = {
    # seed preset (trajectory aggregation, squared penalty on the global L_H), a corridor narrow
    # enough that the penalty is active from step 1
    "zero2-seed": ["--ds.zero_stage", "2", "--loss_plugin", "epo", "--epo.preset", "seed", "--epo.warmup", "1", "--epo.window_size", "2",
                   "--epo.kappa_left", "0.99999", "--epo.kappa_right", "1.0", "--epo.alpha", "1000"],
    # released-code layout (token aggregation, per-turn reference) with the paper's hinge penalty
    "zero3-per-turn-hinge": ["--ds.zero_stage", "3", "--loss_plugin", "epo", "--epo.preset", "released-code",
                             "--epo.penalty", "hinge", "--epo.kappa_left", "0.999", "--epo.kappa_right", "1.0",
                             "--rollout.temperature", "0.7"],
}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="module", params=sorted(CASES))
def runs(request, tiny_model, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(request.param)
    flags = CASES[request.param]
    single = run_ranks(1, flags, tiny_model, out_dir, STEPS)[0]
    pair = run_ranks(2, flags, tiny_model, out_dir, STEPS, env={"EPO_TEST_CKPT": str(out_dir / "ckpt")})
    assert all(math.isfinite(loss) for run in (single, *pair) for loss in run["losses"])
    return request.param, single, pair


def test_loss_and_gradients_equal_one_process(runs):
    _, single, pair = runs
    for step in range(STEPS):
        # ppo_train's status is already reduced over the ranks: every rank reports the global value.
        # The host's PPO loss is a small difference of bf16 ratios: it agrees to 2e-2, like the gradients
        # (measured 7e-3); EPO's term, from float32 entropies, to 1e-4.
        for rank in (0, 1):
            assert pair[rank]["losses"][step] == pytest.approx(single["losses"][step], rel=2e-2, abs=1e-6)
            term, expected = pair[rank]["records"][step]["metrics"]["epo/loss_term"], single["records"][step]["metrics"]["epo/loss_term"]
            assert term == pytest.approx(expected, rel=1e-4)
        assert relative_difference(single["grads"][step], pair[0]["grads"][step]) < 2e-2
        assert relative_difference(pair[0]["grads"][step], pair[1]["grads"][step]) == 0.0
    # step 0 has zero advantages: the host's policy loss is 0 (EPO's term is not in that metric),
    # and its gradient is EPO's alone, and it is not zero
    assert single["losses"][0] == 0.0
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
