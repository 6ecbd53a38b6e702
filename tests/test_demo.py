"""The CPU demo: the KeyDoor environment, the tiny policy and host, the `openrlhf-epo` command
(demo and plot), and kill-and-resume on the 2-process gloo path (issue 6, item 4)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from openrlhf_epo.cli import main
from openrlhf_epo.demo.env import ACTIONS, MIN_TURNS, OBSERVATION_WORDS, KeyDoorConfig, KeyDoorEnv, solve, vocabulary
from openrlhf_epo.demo.host import RunSpec, Trainer, action_logprobs, group_advantages, rollout, to_batch
from openrlhf_epo.demo.policy import tiny_policy

REPO = Path(__file__).resolve().parents[1]
REQUIRED_FIELDS = (
    "step", "success_rate", "mean_return", "entropy", "reference", "lower", "upper", "penalty", "beta",
    "in_corridor", "policy_loss",
)  # fmt: skip
SMALL = ["--groups", "2", "--group_size", "4", "--ppo_epochs", "1", "--minibatches", "1", "--no_progress"]


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- environment ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_gold_path_wins_and_reward_is_only_at_the_end(seed):
    config = KeyDoorConfig(rooms=6)
    env = KeyDoorEnv(config, seed)
    assert env.reset().startswith("find the key then open the door")
    plan = solve(config, seed)
    for i, action in enumerate(plan):
        observation, reward, done = env.step(action)
        assert len(observation.split()) == OBSERVATION_WORDS
        last = i == len(plan) - 1
        assert done == last and reward == (1.0 if last else 0.0)
    assert observation.split()[2] == "opened"


def test_episode_runs_out_after_max_turns_with_zero_reward():
    config = KeyDoorConfig(rooms=5)
    assert config.max_turns >= MIN_TURNS
    env = KeyDoorEnv(config, 3)
    env.reset()
    rewards = []
    for _ in range(config.max_turns):
        observation, reward, done = env.step("take" if env.turn % 2 else "open")
        rewards.append(reward)
    assert done and observation.split()[2] == "over" and sum(rewards) == 0.0
    with pytest.raises(RuntimeError):
        env.step("left")


def test_layout_is_deterministic_for_a_seed_and_varies_across_seeds():
    config = KeyDoorConfig(rooms=5)
    layouts = [(KeyDoorEnv(config, s).position, KeyDoorEnv(config, s).key_room, KeyDoorEnv(config, s).door_room) for s in range(40)]
    assert layouts[:20] == [(KeyDoorEnv(config, s).position, KeyDoorEnv(config, s).key_room, KeyDoorEnv(config, s).door_room) for s in range(20)]
    assert len(set(layouts)) > 10
    # the start room never shows the key or the door: the agent has to explore
    assert all(KeyDoorEnv(config, s).reset().split()[-4] == "empty" for s in range(40))


def test_opening_without_the_key_is_locked_and_walls_bump():
    config = KeyDoorConfig(rooms=3)
    seed = next(s for s in range(100) if KeyDoorEnv(config, s).position == 0)
    env = KeyDoorEnv(config, seed)
    env.reset()
    assert env.step("left")[0].split()[2] == "bump"
    while env.position != env.door_room:
        env.step("right")
    assert env.step("open") == ("door nokey locked act", 0.0, False)


@pytest.mark.parametrize(
    "kwargs, flag",
    [({"rooms": 2}, "--env.rooms=2"), ({"rooms": "5"}, "--env.rooms='5'"), ({"max_turns": 4}, "--env.max_turns=4")],
)
def test_env_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag.replace("(", r"\(")):
        KeyDoorConfig(**kwargs)


def test_a_reply_that_is_no_action_wastes_the_turn():
    env = KeyDoorEnv(KeyDoorConfig(), 0)
    env.reset()
    before = (env.position, env.has_key)
    observation, reward, done = env.step("jump")
    assert observation.split()[2] == "invalid" and (reward, done) == (0.0, False)
    assert (env.position, env.has_key, env.turn) == (*before, 1)


# -- policy and host -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return tiny_policy(vocabulary(), ACTIONS, tmp_path_factory.mktemp("tokenizer"), seed=0)


def test_tokenizer_is_word_level_and_reloads_from_its_folder(policy, tmp_path):
    text = KeyDoorEnv(KeyDoorConfig(), 0).reset()
    ids = policy.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.split()) and policy.tokenizer.unk_token_id not in ids
    assert policy.tokenizer.decode(ids) == text
    assert [policy.tokenizer.decode([i]) for i in policy.allowed_ids.tolist()] == list(ACTIONS)


def test_rollout_marks_one_generated_token_per_turn(policy):
    config = KeyDoorConfig(rooms=4)
    envs = [KeyDoorEnv(config, s) for s in range(6)]
    episodes = rollout(policy, envs, torch.Generator().manual_seed(0))
    for episode in episodes:
        assert sum(episode.acted) == episode.turns
        assert all(policy.tokenizer.decode([t]) in ACTIONS for t, a in zip(episode.tokens, episode.acted) if a)
        assert episode.reward in (0.0, 1.0)
        assert MIN_TURNS <= config.max_turns and 1 <= episode.turns <= config.max_turns


def test_action_logprobs_match_a_float64_reference(policy):
    envs = [KeyDoorEnv(KeyDoorConfig(rooms=4), s) for s in range(3)]
    episodes = rollout(policy, envs, torch.Generator().manual_seed(1))
    sequences, attention, action_mask = to_batch(episodes, policy.tokenizer.pad_token_id)
    with torch.no_grad():
        logprob, entropy = action_logprobs(policy, sequences, attention, action_mask)
        logits = policy.model(input_ids=sequences, attention_mask=attention).logits[:, :-1].double()
    restricted = torch.log_softmax(logits[..., policy.allowed_ids], -1)
    chosen = (sequences[:, 1:, None] == policy.allowed_ids).double().argmax(-1)
    on = action_mask.bool()
    want_logprob = restricted.gather(-1, chosen[..., None]).squeeze(-1)
    want_entropy = -(restricted.exp() * restricted).sum(-1)
    torch.testing.assert_close(logprob[on].double(), want_logprob[on], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy[on].double(), want_entropy[on], rtol=1e-5, atol=1e-5)
    assert (logprob[~on] == 0).all() and (entropy[~on] == 0).all()
    assert (want_entropy[on] <= math.log(len(ACTIONS)) + 1e-9).all()


def test_group_advantages_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    advantages = group_advantages(rewards, 4).view(2, 4)
    assert advantages[0].sum().abs() < 1e-6 and advantages[0, 0] > 0 > advantages[0, 1]
    assert (advantages[1] == 0).all()  # a group that all succeeded teaches nothing


def test_trainer_gets_the_plugin_objects_through_the_entry_points(tmp_path):
    from openrlhf_epo import EPOConfig
    from openrlhf_epo.plugin import TurnStatsProcessor
    from openrlhf_epo.rank import EPORankLoss

    spec = RunSpec(name="epo-seed", run_dir=str(tmp_path), seed=0, steps=1, epo_config=EPOConfig().to_dict())
    trainer = Trainer(spec)
    assert isinstance(trainer.rank_loss, EPORankLoss) and isinstance(trainer.turn_stats, TurnStatsProcessor)
    experience = trainer.collect()
    assert torch.equal(experience.info["turns"], experience.info["turns_played"])


# -- the command ---------------------------------------------------------------------------------


def test_demo_end_to_end_writes_metrics_plots_and_summary(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4", "--env.rooms", "4", "--epo.warmup", "2", *SMALL]) == 0
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["baseline-s0", "epo-seed-warmup-2-s0"]  # a variant's name lists the flags it overrides
    baseline = read_rows(out / "baseline-s0" / "metrics.jsonl")
    epo = read_rows(out / "epo-seed-warmup-2-s0" / "metrics.jsonl")
    assert [r["step"] for r in baseline] == [r["step"] for r in epo] == [0, 1, 2, 3]
    for row in baseline + epo:
        assert set(REQUIRED_FIELDS) <= set(row)
        assert 0 <= row["success_rate"] <= 1 and row["entropy"] > 0 and math.isfinite(row["policy_loss"])
    assert all(row[k] is None for row in baseline for k in ("reference", "lower", "upper", "penalty", "beta", "in_corridor"))
    assert all(row["beta"] > 1 for row in epo) and epo[-1]["reference"] is not None
    assert epo[-1]["lower"] < epo[-1]["reference"] < epo[-1]["upper"]
    # same seed, same first rollout: EPO only changes the update
    assert baseline[0]["success_rate"] == epo[0]["success_rate"]
    assert baseline[0]["entropy"] == pytest.approx(epo[0]["entropy"], rel=1e-6)
    for name in ("entropy.png", "success.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"baseline", "epo-seed-warmup-2"} and summary["baseline"]["steps"] == 4
    assert "| baseline | 1 | 4 |" in capsys.readouterr().out

    # `plot` redraws them from metrics.jsonl alone
    for name in ("entropy.png", "success.png", "summary.json", "summary.md"):
        (out / name).unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "entropy.png").stat().st_size > 1000 and (out / "summary.md").exists()

    # an existing --out is never overwritten without --resume
    with pytest.raises(SystemExit) as refused:
        main(["demo", "--out", str(out), "--steps", "4", *SMALL])
    assert refused.value.code == 2
    assert "already holds demo runs" in capsys.readouterr().err
    assert len(read_rows(out / "baseline-s0" / "metrics.jsonl")) == 4


def plan(argv: list[str]):
    from openrlhf_epo.cli import build_parser, plan_runs

    parser = build_parser()
    args, extra = parser.parse_known_args(["demo", *argv])
    return plan_runs(args, args.command_parser, {})


def test_default_comparison_and_pure_presets(tmp_path):
    default = plan(["--out", str(tmp_path / "a")])
    assert [s.name for s in default] == ["baseline", "epo-seed-lambda_entropy-0.03"]
    assert default[0].epo_config is None and default[1].epo_config["lambda_entropy"] == 0.03
    assert default[1].epo_config["alpha"] == 0.1  # the rest is the seed preset
    named = plan(["--out", str(tmp_path / "b"), "--presets", "seed,paper-sciworld", "--seeds", "2", "--no_baseline"])
    assert [(s.name, s.seed) for s in named] == [("epo-seed", 0), ("epo-seed", 1), ("epo-paper-sciworld", 0), ("epo-paper-sciworld", 1)]
    assert named[0].epo_config["lambda_entropy"] == 0.1 and named[2].epo_config["lambda_entropy"] == 0.001
    assert named[0].run_dir.endswith("epo-seed-s0") and named[3].run_dir.endswith("epo-paper-sciworld-s1")
    quick = plan(["--out", str(tmp_path / "c"), "--quick"])
    assert (quick[0].steps, quick[0].groups, quick[0].group_size, quick[0].lr) == (20, 4, 8, 3e-3)
    smol = plan(["--out", str(tmp_path / "d"), "--model", "smollm2", "--quick", "--lr", "2e-5"])
    assert (smol[0].steps, smol[0].groups, smol[0].group_size, smol[0].minibatches, smol[0].lr) == (2, 2, 2, 1, 2e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps=0 is invalid"),
        (["--presets", "nope"], "--presets='nope' is invalid"),
        (["--epo.alpha", "-1"], "--epo.alpha=-1.0 is invalid"),
        (["--epo.preset", "seed"], "list the presets to compare with --presets"),
        (["--env.rooms", "2"], "--env.rooms=2 is invalid"),
        (["--env.colour", "3"], "unknown flag --env.colour"),
        (["--groups", "3", "--nproc", "2"], "--groups=3 is invalid"),
        (["--group_size", "1"], "--group_size=1 is invalid"),
        (["--lr", "nan"], "--lr=nan is invalid"),
        (["--presets", "seed,seed"], "names a preset twice"),
    ],
)
def test_bad_demo_flags_fail_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as failed:
        main(["demo", "--out", str(tmp_path / "never"), *argv])
    assert failed.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not (tmp_path / "never").exists()


# -- two gloo ranks; kill and resume -------------------------------------------------------------

RESUME_ARGS = [
    "--nproc", "2", "--no_baseline", "--presets", "seed", "--steps", "6", "--save_every", "2",
    "--epo.warmup", "2", "--epo.window_size", "3", "--env.rooms", "4", *SMALL,
]  # fmt: skip


def demo_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "openrlhf_epo.cli", "demo", "--out", str(out), *RESUME_ARGS, *extra]


def run_demo(command: list[str], env: dict) -> None:
    done = subprocess.run(command, env=env, cwd=REPO, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stderr[-4000:]}"


def test_killed_two_rank_run_resumes_to_the_same_history(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = tmp_path / "whole"
    run_demo(demo_command(whole), env)

    (run,) = [p.name for p in whole.iterdir() if p.is_dir()]
    killed = tmp_path / "killed"
    metrics = killed / run / "metrics.jsonl"
    process = subprocess.Popen(
        demo_command(killed), env=env, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    # three steps done, a checkpoint after step 2: the kill lands inside step 4
    while not (metrics.exists() and len(read_rows(metrics)) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    checkpoint = torch.load(killed / run / "checkpoint.pt", weights_only=False)
    assert checkpoint["step"] == 2 and len(read_rows(metrics)) == 3

    run_demo(demo_command(killed, "--resume"), env)

    expected = torch.load(whole / run / "checkpoint.pt", weights_only=False)
    resumed = torch.load(killed / run / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == expected["step"] == 6
    assert resumed["epo"]["history"] == expected["epo"]["history"]
    assert resumed["epo"]["step"] == expected["epo"]["step"]
    rows_whole, rows_resumed = read_rows(whole / run / "metrics.jsonl"), read_rows(metrics)
    assert len(rows_resumed) == 6
    for key in ("reference", "lower", "upper", "beta", "entropy", "success_rate", "penalty"):
        assert [r[key] for r in rows_resumed] == [r[key] for r in rows_whole], key
    for name, tensor in expected["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name


def test_plot_needs_no_plugin_registry(tmp_path):
    """Issue 13 (5b): `plot` only reads metrics.jsonl, so it works with every plugin disabled."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "1", "--env.rooms", "4", *SMALL]) == 0
    for name in ("entropy.png", "success.png", "summary.json", "summary.md"):
        (out / name).unlink()
    env = {**os.environ, "OPENRLHF_HOOKS_PLUGINS": ""}  # empty: no entry point loads
    done = subprocess.run(
        [sys.executable, "-m", "openrlhf_epo.cli", "plot", str(out)], env=env, cwd=REPO, timeout=120, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    for name in ("entropy.png", "success.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(json.loads((out / "summary.json").read_text())) == {"baseline", "epo-seed-lambda_entropy-0.03"}
    # the demo itself still resolves the plugin: with none enabled it does not start
    refused = subprocess.run(
        [sys.executable, "-m", "openrlhf_epo.cli", "demo", "--out", str(tmp_path / "never"), "--steps", "1"],
        env=env, cwd=REPO, timeout=120, capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode != 0 and "unknown loss plugin 'epo'" in refused.stderr
    assert not (tmp_path / "never").exists()
