"""--plugins_dry_run and --help on a CPU machine without vLLM and flash-attn (a laptop, a login node).

Every test runs `python -m openrlhf_hooks.train_ppo_ray` (or a short script) in a fresh process
WITHOUT the test stand-ins of tests/support/stand_ins.py, in which vllm and flash_attn cannot be
imported (the test environment has vLLM's CPU build: tests/support/no_gpu_packages.py hides it from
the import system, as if it were not installed): the launcher's own dry-run placeholders must be enough there,
and a real run must stop with one line naming the package to install.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import no_gpu_packages
from fake_plugins import install_fake_plugin
from openrlhf_hooks.plugins import ENV_PLUGINS

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "python -m openrlhf_hooks.train_ppo_ray: error: "

def host_flags(prompts_path):
    return ["--actor.model_name_or_path", "/nonexistent/model", "--algo.advantage.estimator", "group_norm",
            "--rollout.n_samples_per_prompt", "2", "--rollout.batch_size", "64", "--train.batch_size", "128",
            "--train.agent_func_path", "agent.py", "--data.prompt_dataset", str(prompts_path),
            "--data.input_key", "prompt"]  # fmt: skip


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"task {i}"}) + "\n" for i in range(100)))
    return path


def launch(*argv, script=None, env=None):
    """The child inherits the suite's plugin selection (tests/conftest.py) unless `env` replaces it."""
    argv = no_gpu_packages.command(*argv, script=textwrap.dedent(script)) if script else no_gpu_packages.command(*argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


@pytest.mark.parametrize("plugin", [["--loss_plugin", "epo", "--epo.preset", "paper-sciworld"],
                                    ["--loss_plugin", "scaled", "--scaled.factor", "2"]], ids=["epo", "third-party"])  # fmt: skip
def test_dry_run_without_vllm_and_flash_attn_reports_k(prompts, plugin):
    done = launch(*host_flags(prompts), *plugin, "--plugins_dry_run")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["loss_plugin"] == plugin[1]
    # 100 prompts, rollout batch 64: the host trains on 64, then on the last 36
    assert report["rl_steps"] == 2
    assert report["rl_steps_note"] == "2 RL steps (100 prompts in batches of 64 = 2 RL steps per episode x 1 episode)"
    assert report["plugins"] == ["epo", "scaled"]  # the suite's selection, whatever else is installed


def test_dry_run_warns_when_k_cannot_be_counted(tmp_path):
    done = launch(*host_flags(tmp_path / "missing.jsonl"), "--loss_plugin", "epo", "--plugins_dry_run")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["rl_steps"] is None
    # the warning about K (the default preset's corridor warning has its own tests: test_corridor_holds.py)
    warning = [line for line in done.stderr.splitlines() if "warning:" in line and "the corridor" not in line]
    assert len(warning) == 1 and "cannot count the prompts of --data.prompt_dataset=" in warning[0]
    assert warning[0].endswith("set --epo.total_steps to the number of RL steps")


def test_help_without_vllm_and_flash_attn():
    done = launch("--help")
    assert done.returncode == 0, done.stderr[-3000:]
    for flag in ("--loss_plugin", "--epo.preset", "--scaled.factor", "--actor.entropy_coef", "--vllm.num_engines"):
        assert flag in done.stdout


SAME_PROCESS = """
    import sys, json
    from openrlhf_hooks import host_imports, train_ppo_ray as launcher

    flags = sys.argv[1:]
    for _ in range(2):  # twice: the placeholders come back for the second dry run
        try:
            launcher.main([*flags, "--plugins_dry_run"])
        except SystemExit as done:
            assert done.code == 0, done.code
    left = sorted(n for n in sys.modules if n.split(".")[0] in ("vllm", "flash_attn", "openrlhf"))
    holders = sorted(name for name, module in list(sys.modules.items())
                     for value in list(getattr(module, "__dict__", {}).values())
                     if isinstance(value, (host_imports._Placeholder, host_imports._PlaceholderModule)))
    with launcher.host_import_placeholders():
        import vllm
        try:
            vllm.SamplingParams(temperature=1.0)
            touched = None
        except launcher.HostDependencyUnavailable as exc:
            touched = [str(exc), isinstance(exc, ImportError)]
    print(json.dumps({"left": left, "holders": holders, "touched": touched}), file=sys.stderr)
    sys.exit(launcher.main(flags))  # a real run: vllm is still missing
"""


def test_placeholders_live_only_during_the_dry_run_and_a_real_run_names_the_package(prompts):
    done = launch(*host_flags(prompts), "--loss_plugin", "epo", script=SAME_PROCESS)
    lines = done.stderr.strip().splitlines()
    state = json.loads(next(line for line in lines if line.startswith('{"left"')))
    assert state["left"] == [] and state["holders"] == []
    message, is_import_error = state["touched"]
    assert message.startswith("vllm.SamplingParams was used, but OpenRLHF needs the package 'vllm'")
    assert "pip install 'openrlhf[vllm]==0.11.2'" in message and is_import_error
    assert done.returncode == 2
    assert lines[-1] == (PREFIX + "OpenRLHF needs the package 'vllm', which is not installed here: "
                         "pip install 'openrlhf[vllm]==0.11.2'; or pip install 'openrlhf-hooks[gpu]' installs "
                         "OpenRLHF 0.11.2 with vllm and flash-attn")  # fmt: skip


def test_real_run_without_vllm_is_one_line_and_exit_2(prompts):
    done = launch(*host_flags(prompts), "--loss_plugin", "scaled")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        PREFIX + "OpenRLHF needs the package 'vllm', which is not installed here: pip install 'openrlhf[vllm]==0.11.2'; "
        "or pip install 'openrlhf-hooks[gpu]' installs OpenRLHF 0.11.2 with vllm and flash-attn"
    ]


EXTRA_PLUGIN = """
    from openrlhf_hooks import LossPlugin, hookimpl

    class ExtraPlugin(LossPlugin):
        name, version = "extra", "9.9"

        def add_arguments(self, group):
            group.add_argument("--extra.knob", metavar="X")

    @hookimpl
    def register_loss_plugins(register):
        register(ExtraPlugin())
"""


def listed_loss_plugins(env):
    """{name: version} of the loss plugins `openrlhf-hooks list` prints, in its order."""
    done = subprocess.run([sys.executable, "-m", "openrlhf_hooks.cli", "list"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("rollout processors:")[0].splitlines()
    assert lines[0] == "loss plugins:", done.stdout
    return dict(line.split()[:2] for line in lines[1:])


def test_a_plugin_installed_beside_the_suite_is_left_out_by_its_selection(prompts, tmp_path):
    """docs/plugins.md has an author pip-install their plugin into this environment: the suite's
    selection keeps the launcher and `openrlhf-hooks list` to EPO and the test plugin. The extra
    plugin is a real installed distribution (a *.dist-info with its entry point) on PYTHONPATH, and
    without the selection both find it, so this test would see a selection that was not applied."""
    site = tmp_path / "site"
    site.mkdir()
    install_fake_plugin(site, "openrlhf-extra-loss", {"extra": "openrlhf_extra_loss"}, {"openrlhf_extra_loss": EXTRA_PLUGIN})
    selected = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    assert selected[ENV_PLUGINS] == "epo,scaled"  # inherited from tests/conftest.py
    everything = {k: v for k, v in selected.items() if k != ENV_PLUGINS}

    done = launch(*host_flags(prompts), "--loss_plugin", "scaled", "--plugins_dry_run", env=selected)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["plugins"] == ["epo", "scaled"]
    assert list(listed_loss_plugins(selected)) == ["epo", "scaled"]

    done = launch(*host_flags(prompts), "--loss_plugin", "extra", "--plugins_dry_run", env=everything)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["loss_plugin"] == "extra" and {"epo", "extra", "scaled"} <= set(report["plugins"])
    listed = listed_loss_plugins(everything)
    assert listed["extra"] == "9.9" and {"epo", "scaled"} <= set(listed)
    # selected by name, the extra plugin is refused while the suite's selection holds
    done = launch(*host_flags(prompts), "--loss_plugin", "extra", "--plugins_dry_run", env=selected)
    assert done.returncode == 2 and "unknown loss plugin 'extra'; installed loss plugins: epo, scaled" in done.stderr
