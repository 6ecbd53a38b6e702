"""python -m openrlhf_hooks.train_ppo_ray: host flags unchanged, plugin flags, dry run, errors, --help."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from example_args import example_args
from host_args import host_args, tiny_host_flags  # installs the flash_attn/vllm stand-ins
from openrlhf_epo import PRESETS, EPOConfig
from openrlhf_hooks.train_ppo_ray import ARGS_KEY, main

ROOT = Path(__file__).resolve().parents[1]
HOST = tiny_host_flags("/nonexistent/model", 1)


def dry_run(capsys, *flags):
    with pytest.raises(SystemExit) as done:
        main([*HOST, *flags, "--plugins_dry_run"])
    assert done.value.code == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # ONE JSON object on stdout
    return json.loads(out[0])


def fails(capsys, *flags):
    assert main([*HOST, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dry_run_prints_the_resolved_config_for_each_preset(capsys, preset):
    import ray

    report = dry_run(capsys, "--loss_plugin", "epo", "--epo.preset", preset)
    assert report["loss_plugin"] == "epo"
    assert report["config"] == EPOConfig.from_preset(preset).to_dict()
    assert report["host"]["algo.advantage.estimator"] == "group_norm"
    assert report["host"]["actor.entropy_coef"] is None
    assert not ray.is_initialized()


def test_overrides_and_config_file(capsys, tmp_path):
    report = dry_run(
        capsys, "--loss_plugin", "epo", "--epo.config", str(ROOT / "configs/paper-alfworld.yaml"),
        "--epo.alpha", "0.3", "--epo.window_size", "cumulative", "--epo.total_steps", "50",
    )  # fmt: skip
    assert report["config"] == EPOConfig.from_preset("paper-alfworld", alpha=0.3, total_steps=50).to_dict()
    custom = tmp_path / "mine.yaml"
    custom.write_text("preset: paper-sciworld\nkappa_left: 0.5\n")
    report = dry_run(capsys, "--loss_plugin", "epo", "--epo.config", str(custom))
    assert report["config"] == EPOConfig.from_preset("paper-sciworld", kappa_left=0.5).to_dict()


def test_third_party_plugin_is_selected_through_its_entry_point(capsys):
    report = dry_run(capsys, "--loss_plugin", "scaled", "--scaled.factor", "2.5")
    assert report == {
        "loss_plugin": "scaled",
        "config": {"factor": 2.5},
        "rollout_processors": [],
        "host_fixes": [],
        "probe": None,  # no --probe_words
        "host": {"actor.policy_loss_type": "ppo"},
        "plugins": ["epo", "scaled"],  # the suite's selection (tests/conftest.py), not all that is installed
        "rl_steps": None,
        "rl_steps_note": "no --data.prompt_dataset to count prompts in",
    }


def test_rollout_processors_are_named_in_the_settings(capsys):
    report = dry_run(capsys, "--loss_plugin", "epo", "--rollout_processors", "turn_stats")
    assert report["rollout_processors"] == ["turn_stats"]


# "installed loss plugins" lists the loaded ones: the suite's selection (tests/conftest.py)
BAD = [
    (["--loss_plugin", "epoo"], "unknown loss plugin 'epoo'; installed loss plugins: epo, scaled"),
    (["--loss_plugin", "epo", "--epo.alpha", "-1"], "--epo.alpha=-1.0 is invalid: must be a finite number >= 0"),
    (["--loss_plugin", "epo", "--epo.alpha", "lots"], "--epo.alpha='lots' is invalid: expected a number"),
    (["--loss_plugin", "epo", "--epo.window_size", "0"], "--epo.window_size=0 is invalid"),
    (["--loss_plugin", "epo", "--epo.kappa_left", "0.9", "--epo.kappa_right", "1.0", "--epo.kappa_left", "1.0"],
     "--epo.kappa_left=1.0 is invalid: must be smaller than kappa_right=1.0"),
    (["--loss_plugin", "epo", "--epo.preset", "paper"], "--epo.preset='paper' is invalid: allowed presets are seed"),
    (["--loss_plugin", "epo", "--epo.penalty", "l2"], "--epo.penalty='l2' is invalid: allowed values are squared"),
    (["--epo.alpha", "0.1"], "--epo.alpha needs --loss_plugin epo"),
    (["--loss_plugin", "epo", "--epo.config", "/no/such.yaml"], "--epo.config='/no/such.yaml': cannot read the file"),
    (["--loss_plugin", "epo", "--actor.entropy_coef", "0.01"],
     "--actor.entropy_coef=0.01 cannot be combined with --loss_plugin epo"),
    (["--loss_plugin", "epo", "--rollout_processors", "nope"], "unknown rollout processor 'nope'"),
    (["--loss_plugin", "scaled", "--scaled.factor", "-2"], "--scaled.factor='-2' is invalid"),
]  # fmt: skip


@pytest.mark.parametrize("flags,message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_input_is_a_one_line_error_naming_the_flag(capsys, flags, message):
    import ray

    line = fails(capsys, *flags)
    assert line.startswith("python -m openrlhf_hooks.train_ppo_ray: error: ")
    assert message in line
    assert not ray.is_initialized()


def test_bad_config_files(capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("alpha: [0.1\n")
    assert "not valid YAML at line" in fails(capsys, "--loss_plugin", "epo", "--epo.config", str(broken))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("alpha: 0.1\nlamda: 0.3\n")
    assert "unknown key 'lamda'" in fails(capsys, "--loss_plugin", "epo", "--epo.config", str(unknown))


def test_entropy_coef_zero_is_allowed(capsys):
    report = dry_run(capsys, "--loss_plugin", "epo", "--actor.entropy_coef", "0")
    assert report["host"]["actor.entropy_coef"] == 0


def test_host_validation_still_runs(capsys):
    # the host's own parser rejects its own bad flags, unchanged
    with pytest.raises(SystemExit) as done:
        main([*HOST, "--loss_plugin", "epo", "--actor.policy_loss_type", "nope", "--plugins_dry_run"])
    assert done.value.code == 2
    assert "--actor.policy_loss_type" in capsys.readouterr().err


def test_host_flag_assertions_are_one_line(capsys):
    # the host validates flag combinations with bare asserts: one line, exit 2, before Ray
    flags = list(HOST)
    index = flags.index("--rollout.n_samples_per_prompt")
    del flags[index : index + 2]
    assert main([*flags, "--plugins_dry_run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "python -m openrlhf_hooks.train_ppo_ray: error: OpenRLHF rejected the flags: " \
                      "group_norm requires n_samples_per_prompt > 1"  # fmt: skip
    assert "Traceback" not in "\n".join(err)


def test_help_shows_plugin_and_host_flags(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--loss_plugin", "--plugins_dry_run", "--epo.preset", "--epo.kappa_left", "--scaled.factor",
                 "--actor.entropy_coef", "--algo.advantage.estimator"):  # fmt: skip
        assert flag in out


def _plain(namespace):
    return {k: _plain(v) if hasattr(v, "__dict__") else v for k, v in vars(namespace).items() if k != ARGS_KEY}


def test_host_args_identical_apart_from_the_plugin_part():
    without = host_args(HOST)
    with_plugin = host_args([*HOST, "--loss_plugin", "epo", "--epo.preset", "paper-sciworld", "--epo.alpha", "0.2"])
    assert _plain(without) == _plain(with_plugin)
    assert getattr(without, ARGS_KEY, None) is None
    assert getattr(with_plugin, ARGS_KEY)["config"]["alpha"] == 0.2


def test_module_entry_point_dry_run_in_a_fresh_process():
    """The real `python -m openrlhf_hooks.train_ppo_ray` path, in a child process with the stand-ins."""
    command = [sys.executable, str(ROOT / "tests/support/launch.py"), *HOST, "--loss_plugin", "epo",
               "--epo.preset", "paper-sciworld", "--plugins_dry_run"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["config"] == EPOConfig.from_preset("paper-sciworld").to_dict()


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("train_*_epo_*.sh")))
def test_example_scripts_pass_host_and_plugin_validation(capsys, script, tmp_path):
    # the command line the script builds with its GPU defaults (examples/*.sh run, with a stand-in python)
    env = {"AGENT_FUNC_PATH": "agent.py", "PROMPT_DATA": "prompts.jsonl", "MODEL": "model", "SAVE": "ckpt"}
    flags = example_args(script, env, tmp_path)
    assert "flash_attention_2" in flags and "--cpu" not in flags
    with pytest.raises(SystemExit) as done:
        main([*flags, "--plugins_dry_run"])
    assert done.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["loss_plugin"] == "epo" and report["host"]["train.agent_func_path"] == "agent.py"


def test_grpo_example_with_1000_prompts_counts_1260_rl_steps(capsys, tmp_path):
    """examples/train_grpo_epo_agent_ray.sh's own command line (EPO, turn_stats) with 1000 prompts:
    63 steps per episode x 20 = 1260 (the host's max_steps / steps-per-update gave 1240).
    hooks/tests/test_rl_steps.py runs the host's loop over the same host flags and counts its steps."""
    env = {"AGENT_FUNC_PATH": "agent.py", "PROMPT_DATA": prompts_file(tmp_path, 1000), "MODEL": "model", "SAVE": "ckpt"}
    flags = example_args("train_grpo_epo_agent_ray.sh", env, tmp_path)
    with pytest.raises(SystemExit) as done:
        main([*flags, "--plugins_dry_run"])
    assert done.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["loss_plugin"], report["config"]["total_steps"]) == ("epo", None)  # K is counted, not set
    assert report["rl_steps"] == 1260
    assert report["rl_steps_note"] == "1260 RL steps (1000 prompts in batches of 16 = 63 RL steps per episode x 20 episodes)"


def prompts_file(tmp_path, count):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"task {i}"}) + "\n" for i in range(count)))
    return str(path)


def counted(tmp_path, count, *flags):
    return [*HOST, "--data.prompt_dataset", prompts_file(tmp_path, count), "--data.input_key", "prompt", *flags]


def test_dry_run_reports_k_counted_from_the_prompt_dataset(capsys, tmp_path):
    # 9 prompts in rollout batches of 2 (HOST): 5 steps per episode, the last one on 1 prompt
    with pytest.raises(SystemExit):
        main([*counted(tmp_path, 9, "--train.num_episodes", "3"), "--loss_plugin", "epo", "--plugins_dry_run"])
    report = json.loads(capsys.readouterr().out)
    assert report["rl_steps"] == 15
    assert report["rl_steps_note"] == "15 RL steps (9 prompts in batches of 2 = 5 RL steps per episode x 3 episodes)"


def test_k_is_not_counted_when_the_plugin_sets_total_steps(capsys, tmp_path):
    report = dry_run(capsys, "--data.prompt_dataset", "/no/such.jsonl", "--loss_plugin", "epo", "--epo.total_steps", "40")
    assert report["rl_steps"] is None
    assert report["rl_steps_note"] == "not counted: --epo.total_steps=40 sets the run's RL steps"
    assert "warning" not in capsys.readouterr().err


def test_dynamic_filtering_warns_that_k_is_an_upper_bound(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main([*counted(tmp_path, 9, "--algo.dynamic_filtering_enable"), "--loss_plugin", "epo", "--plugins_dry_run"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["rl_steps"] == 5
    # the warnings about K (the default preset's corridor warning has its own tests: test_corridor_holds.py)
    warnings = [line for line in captured.err.splitlines() if "warning:" in line and "the corridor" not in line]
    assert warnings == [
        "python -m openrlhf_hooks.train_ppo_ray: warning: at most 5 RL steps (9 prompts in batches of 2 = 5 RL steps "
        "per episode x 1 episode): with --algo.dynamic_filtering_enable the count depends on how many prompts pass "
        "the filter; set --epo.total_steps to fix it"
    ]


def test_a_plugin_without_a_k_knob_is_told_what_it_gets(capsys, tmp_path):
    """--scaled has no total_steps_knob: K is still counted for it, and a count that fails says what it gets."""
    with pytest.raises(SystemExit):
        main([*HOST, "--data.prompt_dataset", "/no/such.jsonl", "--loss_plugin", "scaled", "--plugins_dry_run"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["rl_steps"] is None
    warning = [line for line in captured.err.splitlines() if "warning:" in line]
    assert len(warning) == 1 and warning[0].endswith("; loss plugin scaled gets RankContext.total_steps=None")


class _Stop(Exception):
    pass


def test_real_run_hands_k_to_the_ranks_and_the_plugin_set_to_ray_workers(monkeypatch, tmp_path):
    """Up to the host's own ray.init: the args every rank receives hold K, and the runtime_env the
    host starts Ray with holds the driver's plugin selection next to the host's own variables."""
    import openrlhf.utils.config as host_config
    import ray

    from openrlhf_hooks import plugins

    monkeypatch.setenv(plugins.ENV_PLUGINS, "epo")
    monkeypatch.setenv("OPENRLHF_EPO_KERNEL", "torch")
    monkeypatch.setattr(plugins, "_cached", None)
    seen = {}
    real_hierarchize = host_config.hierarchize

    def hierarchize(args):
        seen["args"] = real_hierarchize(args)
        return seen["args"]

    def init(*args, **kwargs):
        seen["init"] = kwargs
        raise _Stop

    monkeypatch.setattr(host_config, "hierarchize", hierarchize)
    monkeypatch.setattr(ray, "init", init)
    with pytest.raises(_Stop):
        main([*counted(tmp_path, 9), "--loss_plugin", "epo"])
    assert getattr(seen["args"], ARGS_KEY)["rl_steps"] == 5
    env_vars = seen["init"]["runtime_env"]["env_vars"]
    assert env_vars["OPENRLHF_HOOKS_PLUGINS"] == "epo" and env_vars["OPENRLHF_EPO_KERNEL"] == "torch"
    assert {"TOKENIZERS_PARALLELISM", "NCCL_DEBUG", "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"} <= set(env_vars)
    assert ray.init is init  # restored after the run
