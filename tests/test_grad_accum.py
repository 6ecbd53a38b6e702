"""EPO's gradient for one optimizer step does not depend on how the host splits it.

The same global batch of 8 multi-turn trajectories goes through OpenRLHF 0.11.2's real replay buffer,
ActorPPOTrainer.ppo_train / training_step and DeepSpeed ZeRO-2 on 2 gloo ranks (tests/support/ds_worker.py),
split four ways: 4 samples per micro-batch (gas 1), 2 (gas 2), 1 (gas 4), and dynamic batching
(micro-batches cut by --train.max_tokens_per_gpu, several per optimizer step; on ZeRO-0, see SPLITS). The gradients DeepSpeed
is about to apply agree across the splits, for the `seed` preset (trajectory aggregation, squared
penalty on the step's L_H), `paper-sciworld` (per-token hinge) and a per-turn reference.

For `seed` the corridor is narrow and the batch fixed, so that from step 1 on the whole step's L_H
lies inside the corridor while single micro-batches fall on both sides of it: the penalty's gradient
must then be exactly zero, which a penalty taken per micro-batch would break by a wide margin
(alpha = 1000). The runs train in float32 (EPO_TEST_FP32), so the splits can be compared to 1e-5.
"""

import math

import pytest

from ds_ranks import relative_difference, run_ranks, tiny_qwen2  # tests/support

STEPS = 3
BASE = ["--ds.zero_stage", "2", "--rollout.batch_size", "4", "--rollout.n_samples_per_prompt", "2",
        "--train.batch_size", "8", "--loss_plugin", "epo"]  # fmt: skip
PRESETS = {
    "seed": ["--epo.preset", "seed", "--epo.warmup", "1", "--epo.window_size", "1", "--epo.kappa_left", "0.99", "--epo.kappa_right", "1.01",
             "--epo.alpha", "1000"],
    "paper-sciworld": ["--epo.preset", "paper-sciworld", "--epo.kappa_left", "0.99", "--epo.kappa_right", "1.01"],
    "per-turn": ["--epo.preset", "released-code", "--epo.penalty", "hinge", "--epo.kappa_left", "0.99",
                 "--epo.kappa_right", "1.01"],
}  # fmt: skip
SPLITS = {
    "gas1": ["--train.micro_batch_size", "4"],
    "gas2": ["--train.micro_batch_size", "2"],
    "gas4": ["--train.micro_batch_size", "1"],
    # 24-token samples, at most 2 per micro-batch: 2 or more micro-batches per rank and step. ZeRO-0:
    # under ZeRO-2, DeepSpeed 0.19.6 keeps only the last backward's gradient when the host steps once
    # after several backwards with gradient_accumulation_steps = 1, as dynamic batching does (the host's
    # own policy gradient, EPO off, then differs from gas 1 by 98%; ZeRO-0 agrees to 2e-7)
    "dynamic": ["--train.micro_batch_size", "1", "--train.dynamic_batch_enable", "--train.max_tokens_per_gpu", "48",
                "--vllm.num_engines", "1", "--ds.zero_stage", "0"],
}  # fmt: skip
# every split for the split-sensitive squared penalty; the per-token hinge presets with the extremes
SPLITS_OF = {"seed": list(SPLITS), "paper-sciworld": ["gas1", "gas4", "dynamic"], "per-turn": ["gas1", "gas4", "dynamic"]}
ENV = {"EPO_TEST_FP32": "1", "EPO_TEST_ZERO_ADVANTAGES": "1"}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_qwen2(tmp_path_factory.mktemp("sharp-qwen2"), initializer_range=0.3)


@pytest.fixture(scope="module", params=sorted(PRESETS))
def preset_runs(request, model, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp(request.param)
    runs = {
        split: run_ranks(2, [*BASE, *PRESETS[request.param], *SPLITS[split]], model, out_dir, STEPS, env=ENV, tag=split)
        for split in SPLITS_OF[request.param]
    }
    return request.param, runs


def test_the_splits_are_what_they_claim(preset_runs):
    _, runs = preset_runs
    expected = {"gas1": 1, "gas2": 2, "gas4": 4}
    micro_batches = {split: len(run[0]["micro_batch_entropies"]) // STEPS for split, run in runs.items()}
    for split, gas in expected.items():
        if split in runs:
            assert runs[split][0]["gas"] == gas and micro_batches[split] == gas
    assert micro_batches["dynamic"] >= 2
    for run in runs.values():  # one optimizer step per RL step, on both ranks
        assert len(run[0]["grads"]) == len(run[1]["grads"]) == STEPS


def test_gradient_and_metrics_do_not_depend_on_the_split(preset_runs):
    _, runs = preset_runs
    reference = runs["gas1"][0]
    assert sum(float(g.abs().sum()) for g in reference["grads"][0].values()) > 0
    for split, (rank0, rank1) in runs.items():
        for step in range(STEPS):
            assert relative_difference(rank0["grads"][step], rank1["grads"][step]) == 0.0
            difference = relative_difference(reference["grads"][step], rank0["grads"][step])
            assert difference < TOLERANCE, f"{split}, step {step}: gradient differs from gas 1 by {difference:.2e}"
            for key, expected in reference["records"][step]["metrics"].items():
                got = rank0["records"][step]["metrics"][key]
                assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected, rel=1e-5, abs=1e-9), (
                    split, step, key)  # fmt: skip


def test_host_policy_loss_is_its_own_and_epo_logs_its_term(preset_runs):
    name, runs = preset_runs
    for rank0, _ in runs.values():
        for step in range(STEPS):
            metrics = rank0["records"][step]["metrics"]
            # zero advantages: the host's loss is exactly 0, EPO's term is logged on its own
            assert rank0["losses"][step] == 0.0
            config = rank0["state"]["state"]["config"]
            penalty = 0.0 if math.isnan(metrics["epo/penalty"]) else metrics["epo/penalty"]
            expected = -config["lambda_entropy"] * (metrics["epo/entropy"] - metrics["epo/beta"] * config["alpha"] * penalty)
            assert metrics["epo/loss_term"] == pytest.approx(expected, rel=1e-5), (name, step)


def test_seed_micro_batches_straddle_the_corridor_while_the_step_is_inside(preset_runs):
    name, runs = preset_runs
    if name != "seed":
        pytest.skip("the squared penalty on the step's L_H is the split-sensitive case")
    for split in ("gas4", "dynamic"):
        rank0, rank1 = runs[split]
        per_step = len(rank0["micro_batch_entropies"]) // STEPS
        for step in (1, 2):
            metrics = rank0["records"][step]["metrics"]
            lower, upper = metrics["epo/lower"], metrics["epo/upper"]
            assert lower <= metrics["epo/entropy"] <= upper
            assert metrics["epo/penalty"] == 0.0  # the penalty whose gradient was applied
            seen = [h for rank in (rank0, rank1) for h in rank["micro_batch_entropies"][step * per_step : (step + 1) * per_step]]
            assert min(seen) < lower and max(seen) > upper, (split, step, seen, lower, upper)


def test_every_optimizer_step_of_an_rl_step_is_exact(model, tmp_path):
    """Two mini-batches per rollout batch and two epochs: four optimizer steps per RL step, each
    linearized at its own L_H (taken with the parameters it starts from), split as gas 1 or gas 2.
    The host's DataLoader shuffles with the same generator state in both runs, so both see the same
    mini-batches."""
    flags = [*BASE, *PRESETS["seed"], "--train.batch_size", "4", "--train.max_epochs", "2"]
    runs = {
        gas: run_ranks(2, [*flags, "--train.micro_batch_size", micro], model, tmp_path, STEPS, env=ENV, tag=f"gas{gas}")
        for gas, micro in ((1, "2"), (2, "1"))
    }
    assert runs[1][0]["gas"] == 1 and runs[2][0]["gas"] == 2
    one, two = runs[1][0], runs[2][0]
    assert len(one["grads"]) == len(two["grads"]) == 4 * STEPS
    for index, (a, b) in enumerate(zip(one["grads"], two["grads"])):
        assert relative_difference(a, b) < TOLERANCE, f"optimizer step {index}"
    penalties = [record["metrics"]["epo/penalty"] for record in one["records"]]
    assert math.isnan(penalties[0])  # warm-up
    for step in range(1, STEPS):
        assert two["records"][step]["metrics"]["epo/penalty"] == pytest.approx(penalties[step], rel=1e-5, abs=1e-12)
    # the penalty was on, so each optimizer step's own linearization point mattered
    assert any(penalty > 0 for penalty in penalties[1:])
