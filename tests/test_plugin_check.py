"""A plugin written from docs/plugins.md, installed like a third party's, checked with the hook
layer's public helpers: the dry run, and `python -m openrlhf_hooks.testing`, which trains one batch
through OpenRLHF's real trainer and DeepSpeed on 1 rank (gas 1) and on 2 gloo ranks (gas 2).

The example plugin (examples/plugin_entropy_bonus) is pip-installed into a folder of its own that
the launched processes get on PYTHONPATH; a plugin that takes a plain per-micro-batch mean is
installed the same way and must be caught.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fake_plugins import install_fake_plugin
from openrlhf_hooks.plugins import ENV_PLUGINS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "plugin_entropy_bonus"

# Reads the example's own RankLoss but takes each micro-batch's own token mean: the mistake the
# guide's "Normalise like the host" warns about.
PLAIN_MEAN = """
    from openrlhf_entropy_bonus import EntropyBonusPlugin, EntropyBonusRankLoss
    from openrlhf_hooks import hookimpl

    class PlainMeanRankLoss(EntropyBonusRankLoss):
        def policy_loss(self, host_outputs, *, action_mask, entropy, loss_batch_info):
            mask = action_mask.to(entropy.dtype)
            term = -self.coef * (entropy * mask).sum() / mask.sum()
            return (host_outputs[0] + term, *host_outputs[1:])

    class PlainMeanPlugin(EntropyBonusPlugin):
        name = "plain_mean"

        def add_arguments(self, group):
            group.add_argument("--plain_mean.coef", metavar="X")

        def build_rank_loss(self, host_args, config, context):
            return PlainMeanRankLoss(config["coef"], context)

    @hookimpl
    def register_loss_plugins(register):
        register(PlainMeanPlugin())
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The example installed by pip into its own folder, and the plain-mean plugin next to it."""
    root = tmp_path_factory.mktemp("site")
    source = shutil.copytree(EXAMPLE, tmp_path_factory.mktemp("source") / EXAMPLE.name)  # pip builds in the tree
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(root), str(source)],
        check=True,
        timeout=300,
    )
    install_fake_plugin(root, "plain-mean", {"plain_mean": "plain_mean"}, {"plain_mean": PLAIN_MEAN})
    return root


def run(site, *argv, timeout=900):
    # exactly the two plugins under test, whatever else this environment has installed (EPO, or the
    # example itself pip-installed beside this project: same entry point, same module, no conflict)
    env = {**os.environ, ENV_PLUGINS: "entropy_bonus,plain_mean"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_example_plugin_passes_the_dry_run(site, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"task {i}"}) + "\n" for i in range(10)))
    done = run(
        site, "-m", "openrlhf_hooks.train_ppo_ray", "--plugins_dry_run", "--loss_plugin", "entropy_bonus",
        "--entropy_bonus.coef", "0.02", "--actor.model_name_or_path", "any", "--train.agent_func_path", "agent.py",
        "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "2", "--rollout.batch_size", "5",
        "--train.batch_size", "10", "--data.prompt_dataset", str(prompts), "--data.input_key", "prompt",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["config"] == {"coef": 0.02}
    assert report["host"] == {"actor.entropy_coef": None, "rollout.temperature": 1.0}
    assert report["rl_steps"] == 2


def test_example_plugin_refuses_a_second_entropy_bonus(site):
    done = run(
        site, "-m", "openrlhf_hooks.train_ppo_ray", "--plugins_dry_run", "--loss_plugin", "entropy_bonus",
        "--actor.entropy_coef", "0.01", "--actor.model_name_or_path", "any", "--train.agent_func_path", "agent.py",
    )  # fmt: skip
    assert done.returncode == 2
    assert "--actor.entropy_coef=0.01 adds the host's entropy bonus as well" in done.stderr


def test_bad_flag_is_one_line_before_any_rank_starts(site):
    done = run(site, "-m", "openrlhf_hooks.testing", "--loss_plugin", "entropy_bonus", "--entropy_bonus.coef", "-1")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("--entropy_bonus.coef='-1' is invalid: expected a finite number >= 0")
    assert "[check]" not in done.stderr


def test_the_check_runs_the_host_and_plugin_checks_first(site):
    done = run(site, "-m", "openrlhf_hooks.testing", "--loss_plugin", "entropy_bonus", "--actor.entropy_coef", "0.1")
    assert done.returncode == 2
    assert "--actor.entropy_coef=0.1 adds the host's entropy bonus as well" in done.stderr.strip().splitlines()[-1]


def test_report_fails_on_nan_a_changed_split_or_disagreeing_ranks():
    from openrlhf_hooks.testing import NormalisationReport

    good = dict(differences=[2e-7, 2e-7], gradient_norm=0.4, tolerance=1e-5, metrics_agree=True, states_agree=True, gas=(1, 2))
    assert NormalisationReport(**good).ok
    assert not NormalisationReport(**{**good, "differences": [2e-7, float("nan")]}).ok
    assert not NormalisationReport(**{**good, "gas": (1, 1)}).ok
    assert "the flags changed the split" in NormalisationReport(**{**good, "gas": (1, 1)}).describe()
    assert not NormalisationReport(**{**good, "metrics_agree": False}).ok
    assert not NormalisationReport(**{**good, "gradient_norm": 0.0}).ok


@pytest.mark.e2e
def test_example_plugin_is_normalised_like_the_host(site, tmp_path):
    done = run(site, "-m", "openrlhf_hooks.testing", "--loss_plugin", "entropy_bonus", "--entropy_bonus.coef", "0.1",
               "--keep", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "OK: the plugin's term is normalised like the host's loss" in done.stdout
    records = {path.stem: __import__("torch").load(path, weights_only=False) for path in tmp_path.glob("*.pt")}
    assert {record["gas"] for name, record in records.items() if name.startswith("w2")} == {2}
    assert records["w1-mbs8-r0"]["gas"] == 1
    # the bonus moves the model: its gradient is not zero, and each rank logs the all-rank entropy
    assert records["w1-mbs8-r0"]["metrics"][0]["entropy_bonus/entropy"] > 0
    assert records["w2-mbs2-r0"]["metrics"] == records["w2-mbs2-r1"]["metrics"]


@pytest.mark.e2e
def test_a_per_micro_batch_mean_is_caught(site):
    done = run(site, "-m", "openrlhf_hooks.testing", "--loss_plugin", "plain_mean", "--plain_mean.coef", "0.1", "--steps", "1")
    assert done.returncode == 1, done.stdout + done.stderr[-3000:]
    assert "FAILED" in done.stdout
    line = next(line for line in done.stdout.splitlines() if line.startswith("gradient,"))
    difference = float(line.split("optimizer step: ")[1].split(" ")[0])
    assert difference > 1e-2  # micro-batches of 2 samples hold 22 to 31 action tokens
