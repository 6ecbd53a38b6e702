"""OpenRLHF 0.11.2's whole loop on CPU, started as a user starts it: the example scripts with --cpu,
and the launcher's command line. Real Ray, vLLM (CPU build), DeepSpeed on gloo, the host's
MultiTurnAgentExecutor playing TextWorld-Express and ScienceWorld, a tiny model built offline.

Each run takes one to four minutes on 2 cores, most of it Ray and vLLM starting.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AGENTS = ROOT / "examples" / "agents"
RUN_TIMEOUT = 900

# The example scripts' sizes, shrunk to 2 training ranks and one vLLM engine (they are env variables
# of the scripts; everything else in the scripts runs as written).
SMALL = {
    "ACTOR_GPUS": "2",
    "VLLM_ENGINES": "1",
    "VLLM_TP": "1",
    "ROLLOUT_MICRO_BATCH": "2",
    "MICRO_BATCH": "1",
    "MAX_LEN": "768",
    "EPISODES": "1",
    "SAVE_STEPS": "1",
    "ATTN": "eager",
}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    subprocess.run([sys.executable, "-m", "openrlhf_hooks.testing.tiny_model", str(path)], check=True, capture_output=True)
    return path


def coin_prompts(path: Path, count: int) -> Path:
    """The first `count` rows of the README's smoke-run prompts (TextWorld-Express coin, 2 rooms, 3 turns)."""
    rows = (AGENTS / "coin_smoke.jsonl").read_text().splitlines(keepends=True)
    assert len(rows) >= count
    path.write_text("".join(rows[:count]))
    return path


def sciworld_prompts(path: Path, count: int, max_turns: int = 3) -> Path:
    rows = [{"prompt": "", "label": {"task": "find-non-living-thing", "variation": v, "max_turns": max_turns}} for v in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(command: list, log: Path, env: dict) -> None:
    full_env = {**os.environ, "PYTHON": sys.executable, "RAY_DEDUP_LOGS": "0", **env}
    with open(log, "w") as out:
        result = subprocess.run(command, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(map(str, command[:3]))} ... exited with {result.returncode}:\n{log.read_text()[-6000:]}")


def run_example(script: str, log: Path, env: dict, *extra: str) -> None:
    run(["bash", str(ROOT / "examples" / script), "--cpu", *extra], log, env)


def launcher(*flags: str) -> list:
    return [sys.executable, "-m", "openrlhf_hooks.train_ppo_ray", "--cpu", *flags]


def scalars(tensorboard_dir: Path) -> dict:
    """{tag: [(step, value), ...]} from the host's TensorBoard files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(tensorboard_dir.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard files under {tensorboard_dir}"
    merged: dict = {}
    for file in files:
        events = EventAccumulator(str(file))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            merged.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return {tag: sorted(values) for tag, values in merged.items()}


def state_log(folder: Path) -> dict:
    """{rank: [records]} written by OPENRLHF_HOOKS_STATE_LOG."""
    logs = {}
    for file in sorted(folder.glob("rank*.jsonl")):
        records = [json.loads(line) for line in file.read_text().splitlines()]
        logs[records[0]["rank"]] = records
    return logs


def values(tb: dict, tag: str) -> list:
    assert tag in tb, f"{tag} not logged; logged: {sorted(tb)}"
    return [value for _, value in tb[tag]]


def grpo_env(tiny_model: Path, tmp_path: Path) -> dict:
    return {
        **SMALL,
        "MODEL": str(tiny_model), "AGENT_FUNC_PATH": str(AGENTS / "textworld_express_agent.py"),
        "PROMPT_DATA": str(coin_prompts(tmp_path / "coin.jsonl", 6)), "SAVE": str(tmp_path / "ckpt"), "PRESET": "seed",
        "N_SAMPLES": "2", "ROLLOUT_BATCH": "2", "TRAIN_BATCH": "4", "ZERO_STAGE": "2",
        "VLLM_ENGINES": "2",  # --train.colocate_all: as many engines x TP as training ranks
    }  # fmt: skip


# K fixed (a resumed run with --train.num_episodes 2 would count 6 steps anyway). A large learning
# rate: the host's warm-up makes step 1's lr 0, and step 2's update, driven by EPO's entropy bonus
# alone (no game is won), flattens the policy.
GRPO_FLAGS = ["--epo.total_steps", "6", "--logger.logging_steps", "1", "--actor.adam.lr", "2e-3"]


@pytest.mark.e2e
def test_grpo_example_two_ranks_zero2_then_resume(tiny_model, tmp_path):
    """examples/train_grpo_epo_agent_ray.sh --cpu on TextWorld-Express: 2 DeepSpeed ranks (ZeRO-2),
    a reference model, 2 vLLM engines, all colocated, EPO and the turn_stats rollout processor; 3 RL
    steps, then the same command resumed for 3 more."""
    env = {**grpo_env(tiny_model, tmp_path), "OPENRLHF_HOOKS_STATE_LOG": str(tmp_path / "state1")}
    common = GRPO_FLAGS
    run_example("train_grpo_epo_agent_ray.sh", tmp_path / "run1.log", env, *common,
                "--logger.tensorboard_dir", str(tmp_path / "tb1"))  # fmt: skip
    tb = scalars(tmp_path / "tb1")

    # train/epo/* at every step, EPO's step counter 0, 1, 2
    assert values(tb, "train/epo/step") == [0.0, 1.0, 2.0]
    for tag in ("entropy", "beta", "loss_term", "turn_entropy_first", "turns_max"):
        assert len(values(tb, f"train/epo/{tag}")) == 3 and all(map(math.isfinite, values(tb, f"train/epo/{tag}")))
    assert values(tb, "train/epo/turns_max")[0] > 1  # multi-turn episodes

    # the rollout processor ran in the real loop: the example passes --rollout_processors turn_stats,
    # whose process() adds info["turns"] (agent turns per sample, from the action mask) on each rank
    # before the replay buffer; the host logs every info entry as train/<key>. Neither the host nor
    # the agent (it logs env_turns) writes "turns": without process() the tag is missing.
    turns = values(tb, "train/turns")
    assert len(turns) == 3 and all(1 <= t <= most for t, most in zip(turns, values(tb, "train/epo/turns_max"))), turns
    # one action run per agent step: the same mean as the agent's own count (measured: 3, 3, 1.25)
    assert turns == pytest.approx(values(tb, "train/env_turns"), abs=1e-6)

    # every rank holds the same EPO state after every step
    logs = state_log(tmp_path / "state1")
    assert sorted(logs) == [0, 1]
    assert [r["event"] for r in logs[0]] == ["start", "step", "step", "step"]
    assert logs[0] == [{**r, "rank": 0} for r in logs[1]]
    history = logs[0][-1]["state"]["history"]["values"]
    assert len(history) == 3 and history == pytest.approx(values(tb, "train/epo/entropy"), rel=1e-5)

    # no game won: all advantages are 0, so the host's policy loss is 0 and the step's gradient
    # comes from EPO's term (the reference-KL gradient is 0 at step 1, where actor = reference)
    assert values(tb, "train/reward") == [0.0, 0.0, 0.0]
    assert values(tb, "train/policy_loss") == [0.0, 0.0, 0.0]
    assert values(tb, "train/actor_grad_norm")[0] > 0.1
    assert all(term < 0 for term in values(tb, "train/epo/loss_term"))

    # the weights reach vLLM. The tiny model's start weights end a turn often; step 2's update
    # flattens the policy (entropy near log 512), and vLLM then samples turns that run to
    # --data.max_len: step 3's rollouts come from the trained weights. With the sync off, vLLM keeps
    # the start weights and step 3 looks like steps 1 and 2 (test_the_sync_check_fails_without_the_sync).
    entropy, truncated = values(tb, "train/epo/entropy"), values(tb, "train/rollout/truncated_rate")
    assert entropy[0] == pytest.approx(entropy[1], abs=0.1) and entropy[2] > entropy[0] + 0.5, entropy
    assert truncated[0] == truncated[1] == 0.0 and truncated[2] >= 0.5, truncated

    # resume: the same command with 2 episodes loads the step-3 checkpoint and runs steps 4-6
    env["OPENRLHF_HOOKS_STATE_LOG"] = str(tmp_path / "state2")
    env["EPISODES"] = "2"
    run_example("train_grpo_epo_agent_ray.sh", tmp_path / "run2.log", env, *common,
                "--logger.tensorboard_dir", str(tmp_path / "tb2"))  # fmt: skip
    resumed = state_log(tmp_path / "state2")
    for rank in (0, 1):
        assert resumed[rank][0]["event"] == "start"
        assert resumed[rank][0]["state"] == logs[rank][-1]["state"]  # step, history: as saved
    tb2 = scalars(tmp_path / "tb2")
    assert values(tb2, "train/epo/step") == [3.0, 4.0, 5.0]
    final = resumed[0][-1]["state"]
    assert final["step"] == 6 and final["history"]["values"][:3] == history
    assert resumed[0] == [{**r, "rank": 0} for r in resumed[1]]


@pytest.mark.e2e
def test_ppo_example_critic_reference_zero3_sciworld(tiny_model, tmp_path):
    """examples/train_ppo_epo_agent_ray.sh --cpu: GAE critic, reference model, ZeRO-3, chat template,
    on ScienceWorld, 2 RL steps."""
    env = {
        **SMALL,
        "MODEL": str(tiny_model), "AGENT_FUNC_PATH": str(AGENTS / "scienceworld_agent.py"),
        "PROMPT_DATA": str(sciworld_prompts(tmp_path / "sciworld.jsonl", 4)), "SAVE": str(tmp_path / "ckpt"),
        "CRITIC_GPUS": "1", "REF_GPUS": "1", "ROLLOUT_BATCH": "2", "ROLLOUT_MICRO_BATCH": "1", "TRAIN_BATCH": "2",
        "OPENRLHF_HOOKS_STATE_LOG": str(tmp_path / "state"),
    }  # fmt: skip
    run_example("train_ppo_epo_agent_ray.sh", tmp_path / "run.log", env,
                "--logger.logging_steps", "1", "--logger.tensorboard_dir", str(tmp_path / "tb"))  # fmt: skip
    tb = scalars(tmp_path / "tb")
    assert values(tb, "train/epo/step") == [0.0, 1.0]
    assert all(map(math.isfinite, values(tb, "train/epo/entropy") + values(tb, "train/critic_loss")))
    assert len(values(tb, "train/critic_loss")) == 2
    logs = state_log(tmp_path / "state")
    assert sorted(logs) == [0, 1] and logs[0] == [{**r, "rank": 0} for r in logs[1]]


def host_alone_flags(tiny_model: Path, prompts: Path, tensorboard_dir: Path) -> list:
    return [
        "--actor.model_name_or_path", str(tiny_model), "--actor.num_nodes", "1", "--actor.num_gpus_per_node", "2",
        "--vllm.num_engines", "1", "--vllm.tensor_parallel_size", "1",
        "--train.agent_func_path", str(AGENTS / "textworld_express_agent.py"),
        "--data.prompt_dataset", str(prompts), "--data.input_key", "prompt", "--data.label_key", "label",
        "--data.max_len", "768", "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "2",
        "--rollout.batch_size", "2", "--rollout.micro_batch_size", "2", "--train.batch_size", "4",
        "--train.micro_batch_size", "1", "--train.num_episodes", "1", "--algo.kl.init_coef", "0",
        "--ds.zero_stage", "2", "--logger.logging_steps", "1", "--logger.tensorboard_dir", str(tensorboard_dir),
        "--ckpt.path", str(tensorboard_dir.parent / "ckpt"), "--ckpt.output_dir", str(tensorboard_dir.parent / "final"),
    ]  # fmt: skip


@pytest.mark.e2e
def test_host_alone_and_third_party_plugin(tiny_model, tmp_path):
    """The launcher with no --loss_plugin runs the host unchanged (zero advantages: zero gradient);
    with the third-party test plugin (tests/third_party_plugin), its rank loss runs on both ranks."""
    prompts = coin_prompts(tmp_path / "coin.jsonl", 2)
    run(launcher(*host_alone_flags(tiny_model, prompts, tmp_path / "tb_host")), tmp_path / "host.log", {})
    host = scalars(tmp_path / "tb_host")
    assert not any("epo" in tag or "scaled" in tag for tag in host)
    assert values(host, "train/reward") == [0.0] and values(host, "train/actor_grad_norm") == [0.0]

    flags = ["--loss_plugin", "scaled", "--scaled.factor", "3", *host_alone_flags(tiny_model, prompts, tmp_path / "tb_scaled")]
    run(launcher(*flags), tmp_path / "scaled.log", {})
    scaled = scalars(tmp_path / "tb_scaled")
    assert values(scaled, "train/scaled/factor") == [3.0]
    assert values(scaled, "train/scaled/calls")[0] >= 2  # gas 2: a call per micro-batch


@pytest.mark.e2e
def test_the_sync_check_fails_without_the_sync(tiny_model, tmp_path):
    """The GRPO example's command with vLLM's side of the weight sync loading nothing
    (tests/support/no_weight_sync.py): the actor flattens as before, vLLM's rollouts do not follow."""
    from example_args import example_args

    env = grpo_env(tiny_model, tmp_path)
    flags = example_args("train_grpo_epo_agent_ray.sh", env, tmp_path)
    support = str(ROOT / "tests" / "support")
    command = [sys.executable, str(ROOT / "tests" / "support" / "no_weight_sync.py"), "--cpu", *flags, *GRPO_FLAGS,
               "--logger.tensorboard_dir", str(tmp_path / "tb")]  # fmt: skip
    run(command, tmp_path / "run.log", {"PYTHONPATH": os.pathsep.join(filter(None, [support, os.environ.get("PYTHONPATH")]))})
    tb = scalars(tmp_path / "tb")
    entropy, truncated = values(tb, "train/epo/entropy"), values(tb, "train/rollout/truncated_rate")
    assert entropy[2] > entropy[0] + 0.5, entropy  # the actor did flatten
    assert truncated == [0.0, 0.0, 0.0], truncated  # vLLM still samples from the start weights
