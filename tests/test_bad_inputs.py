"""The catalogue of bad inputs: one case of test_bad_input per row of docs/bad-inputs.md, same ids.

Launcher rows run `python -m openrlhf_hooks.train_ppo_ray` in this process (`main`), or in a child
process for a few, and check exit code 2, one `error:` line naming the flag or value and what is
allowed, and that Ray never started; rows about plugin flags also check that OpenRLHF's module never
ran. Rank rows drive EPORankLoss directly; two ranks are two threads whose all-reduce is a real
rendezvous (tests/test_rank_agreement.py does the same over gloo with two processes).
"""

import json
import logging
import math
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fake_plugins import install_fake_plugin
from float64_reference import ref_token_entropy
from host_args import tiny_host_flags  # installs the flash_attn/vllm stand-ins
from openrlhf_epo import EPOConfig
from openrlhf_epo.core import EntropyHistory, step_statistic, step_statistic_parts
from openrlhf_epo.demo.io import atomic_write_json, atomic_write_text
from openrlhf_epo.rank import EPOHealthError, EPORankLoss
from openrlhf_hooks import PluginConfigError, RankContext, RankStateMismatchError, plugins
from openrlhf_hooks.agreement import RankAgreement
from openrlhf_hooks import train_ppo_ray as launcher
from openrlhf_hooks.trainer import HookedTrainer

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bad-inputs.md"
PREFIX = "python -m openrlhf_hooks.train_ppo_ray: error: "
HOST = tiny_host_flags("/nonexistent/model", 1)
EPO = ["--loss_plugin", "epo"]

ROWS = []


def row(row_id):
    def register(check):
        ROWS.append(pytest.param(check, id=row_id))
        return check

    return register


class Env(SimpleNamespace):
    """What a row may use: tmp_path, capsys, monkeypatch, caplog."""


@pytest.fixture
def env(tmp_path, capsys, monkeypatch, caplog):
    # rows run under the suite's plugin selection (tests/conftest.py); a row about discovery drops it
    return Env(tmp_path=tmp_path, capsys=capsys, monkeypatch=monkeypatch, caplog=caplog)


@pytest.mark.parametrize("check", ROWS)
def test_bad_input(check, env):
    check(env)


def test_catalogue_table_matches_the_tests():
    """docs/bad-inputs.md lists exactly these rows, numbered 1..N, in this order."""
    numbers, ids = [], []
    for line in DOC.read_text().splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|.*`test_bad_input\[([^\]]+)\]`\s*\|\s*$", line)
        if match:
            numbers.append(int(match.group(1)))
            ids.append(match.group(2))
    assert ids == [p.id for p in ROWS]
    assert numbers == list(range(1, len(ROWS) + 1))
    assert len(ROWS) >= 30


# -- the launcher ------------------------------------------------------------------------------


def _host_must_not_run(*args, **kwargs):
    raise AssertionError("OpenRLHF's train_ppo_ray ran: the error came after the host started")


def launcher_error(env, flags, *needles, host=HOST, before_host=True):
    """main() exits 2 with one error line holding every needle; Ray never started."""
    import ray

    if before_host:
        env.monkeypatch.setattr(launcher, "run_host", _host_must_not_run)
    assert launcher.main([*host, *flags]) == 2
    err = env.capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error:" in line]
    assert len(errors) == 1 and errors[0] == err[-1], err
    if before_host:
        assert len(err) == 1, err
    line = err[-1]
    assert line.startswith(PREFIX), line
    for needle in needles:
        assert needle in line, (needle, line)
    assert not ray.is_initialized()
    return line


def dry_run(env, flags, host=HOST):
    with pytest.raises(SystemExit) as done:
        launcher.main([*host, *flags, "--plugins_dry_run"])
    assert done.value.code == 0
    return json.loads(env.capsys.readouterr().out)


def launcher_process(env, flags, extra_env=None):
    """The real `python -m openrlhf_hooks.train_ppo_ray` path in a child process: exit 2, nothing on
    stdout, exactly one line on stderr."""
    command = [sys.executable, str(ROOT / "tests/support/launch.py"), *HOST, *flags]
    child_env = {k: v for k, v in os.environ.items() if k != plugins.ENV_PLUGINS}
    child_env.update(extra_env or {})
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=child_env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and done.stdout == "" and len(lines) == 1, (done.returncode, done.stderr[-2000:])
    assert lines[0].startswith(PREFIX)
    return lines[0]


FLAG_ERRORS = [
    ("lambda-entropy-negative", ["--epo.lambda_entropy", "-0.1"],
     ["--epo.lambda_entropy=-0.1 is invalid", "must be a finite number >= 0"]),
    ("alpha-nan", ["--epo.alpha", "nan"], ["--epo.alpha=nan is invalid", "must be a finite number >= 0"]),
    ("alpha-not-a-number", ["--epo.alpha", "lots"], ["--epo.alpha='lots' is invalid", "expected a number"]),
    ("gamma-negative", ["--epo.gamma", "-3"], ["--epo.gamma=-3.0 is invalid", "must be a finite number >= 0"]),
    ("kappa-left-above-1", ["--epo.kappa_left", "1.2"], ["--epo.kappa_left=1.2 is invalid", "0 <= kappa_left <= 1"]),
    ("kappa-right-below-1", ["--epo.kappa_right", "0.9"], ["--epo.kappa_right=0.9 is invalid", ">= 1"]),
    ("kappa-left-not-below-kappa-right", ["--epo.kappa_left", "1.0", "--epo.kappa_right", "1.0"],
     ["--epo.kappa_left=1.0 is invalid", "must be smaller than kappa_right=1.0"]),
    ("mid-fraction-zero", ["--epo.mid_fraction", "0"], ["--epo.mid_fraction=0.0 is invalid", "0 < mid_fraction <= 1"]),
    ("window-size-zero", ["--epo.window_size", "0"], ["--epo.window_size=0 is invalid", "integer >= 1"]),
    ("window-size-not-an-integer", ["--epo.window_size", "2.5"],
     ["--epo.window_size='2.5' is invalid", "expected an integer or 'cumulative'"]),
    ("warmup-negative", ["--epo.warmup", "-1"], ["--epo.warmup=-1 is invalid", "integer >= 0"]),
    ("warmup-not-an-integer", ["--epo.warmup", "1.5"], ["--epo.warmup='1.5' is invalid", "expected an integer"]),
    ("total-steps-zero", ["--epo.total_steps", "0"], ["--epo.total_steps=0 is invalid", "integer >= 1"]),
    ("total-steps-not-an-integer", ["--epo.total_steps", "many"],
     ["--epo.total_steps='many' is invalid", "expected an integer or 'auto'"]),
    ("aggregation-unknown", ["--epo.aggregation", "sequence"],
     ["--epo.aggregation='sequence' is invalid", "allowed values are trajectory, token"]),
    ("penalty-unknown", ["--epo.penalty", "l2"], ["--epo.penalty='l2' is invalid", "squared, hinge, indicator"]),
    ("reference-unknown", ["--epo.reference", "local"], ["--epo.reference='local' is invalid", "global, per_turn"]),
    ("per-turn-reference-with-squared-penalty", ["--epo.preset", "released-code", "--epo.penalty", "squared"],
     ["--epo.reference='per_turn' is invalid", "per-token penalty (hinge or indicator)", "penalty=squared"]),
    ("max-bad-steps-zero", ["--epo.max_bad_steps", "0"], ["--epo.max_bad_steps=0 is invalid", "integer >= 1"]),
    ("check-every-negative", ["--epo.check_every", "-1"], ["--epo.check_every=-1 is invalid", "integer >= 0"]),
    ("check-every-not-an-integer", ["--epo.check_every", "often"],
     ["--epo.check_every='often' is invalid", "expected an integer"]),
    ("unknown-preset", ["--epo.preset", "paper"],
     ["--epo.preset='paper' is invalid", "allowed presets are seed, paper-sciworld, paper-alfworld, released-code"]),
    ("misspelled-plugin-flag", ["--epo.alpah", "0.1"], ["unknown flag --epo.alpah (did you mean --epo.alpha?)",
                                                        "loss plugin epo accepts --epo.preset"]),
    ("plugin-flag-without-value", ["--epo.alpha"], ["argument --epo.alpha: expected one argument"]),
]  # fmt: skip


def _flag_error(flags, needles):
    return lambda env: launcher_error(env, [*EPO, *flags], *needles)


for _id, _flags, _needles in FLAG_ERRORS:
    row(_id)(_flag_error(_flags, _needles))


@row("plugin-flag-without-loss-plugin")
def _(env):
    launcher_error(env, ["--epo.alpha", "0.1"], "--epo.alpha needs --loss_plugin epo")


@row("per-turn-reference-with-token-aggregation")
def _(env):
    # supported, not a contradiction: the released-code preset is exactly this
    report = dry_run(env, [*EPO, "--epo.reference", "per_turn", "--epo.aggregation", "token", "--epo.penalty", "hinge"])
    assert (report["config"]["reference"], report["config"]["aggregation"]) == ("per_turn", "token")


@row("host-entropy-bonus-with-epo")
def _(env):
    launcher_error(
        env, [*EPO, "--actor.entropy_coef", "0.01"],
        "--actor.entropy_coef=0.01 cannot be combined with --loss_plugin epo", "drop --actor.entropy_coef",
        before_host=False,
    )  # fmt: skip


@row("ring-attention-with-epo")
def _(env):
    host = tiny_host_flags("/nonexistent/model", 2, "--ds.packing_samples", "--vllm.num_engines", "1")
    launcher_error(
        env, [*EPO, "--ds.ring_attn_size", "2"], "--ds.ring_attn_size=2 is not supported with --loss_plugin epo",
        host=host, before_host=False,
    )  # fmt: skip


@row("misspelled-host-flag")
def _(env):
    import ray

    # the host's own strict parser refuses it, before Ray, with its own usage message
    with pytest.raises(SystemExit) as done:
        launcher.main([*HOST, *EPO, "--actor.entropy_cof", "0.01"])
    assert done.value.code == 2
    assert "unrecognized arguments: --actor.entropy_cof 0.01" in env.capsys.readouterr().err
    assert not ray.is_initialized()


@row("misspelled-plugin-flag-in-a-fresh-process")
def _(env):
    line = launcher_process(env, [*EPO, "--epo.kapa_left", "0.5"])
    assert "unknown flag --epo.kapa_left (did you mean --epo.kappa_left?)" in line


# -- --epo.config YAML -------------------------------------------------------------------------


def yaml_error(env, content, *needles):
    path = env.tmp_path / "epo.yaml"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return launcher_error(env, [*EPO, "--epo.config", str(path)], f"--epo.config={str(path)!r}", *needles)


@row("config-file-missing")
def _(env):
    launcher_error(env, [*EPO, "--epo.config", "/no/such.yaml"], "--epo.config='/no/such.yaml': cannot read the file",
                   "No such file or directory")  # fmt: skip


@row("config-file-is-a-directory")
def _(env):
    launcher_error(env, [*EPO, "--epo.config", str(env.tmp_path)], f"--epo.config={str(env.tmp_path)!r}: cannot read")


@row("config-file-not-text")
def _(env):
    yaml_error(env, b"\xff\xfe\x00binary", "not a UTF-8 text file; expected a YAML mapping")


@row("config-file-malformed-yaml")
def _(env):
    yaml_error(env, "alpha: 0.1\nkappa_left: [0.5\n", "not valid YAML at line 3")


@row("config-file-not-a-mapping")
def _(env):
    yaml_error(env, "- alpha\n- 0.1\n", "expected a mapping of EPO fields, got list")


@row("config-file-unknown-key")
def _(env):
    yaml_error(env, "alpha: 0.1\nlamda: 0.3\n", "unknown key 'lamda'", "allowed keys are preset, lambda_entropy")


@row("config-file-unknown-preset")
def _(env):
    yaml_error(env, "preset: [seed]\n", "preset=['seed'] is invalid", "allowed presets are seed")


@row("config-file-value-out-of-range")
def _(env):
    yaml_error(env, "alpha: -1\n", "alpha=-1 is invalid: must be a finite number >= 0")


@row("config-file-value-of-wrong-type")
def _(env):
    yaml_error(env, "window_size: '20'\n", "window_size='20' is invalid: must be an integer >= 1")


@row("config-file-empty")
def _(env):
    path = env.tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    assert dry_run(env, [*EPO, "--epo.config", str(path)])["config"] == EPOConfig().to_dict()


# -- plugins -----------------------------------------------------------------------------------


def fresh_registry(env):
    """Plugins installed under tmp_path are visible (every installed plugin loads, as without a
    selection), and the launcher loads the registry again."""
    env.monkeypatch.delenv(plugins.ENV_PLUGINS)
    env.monkeypatch.syspath_prepend(str(env.tmp_path))
    env.monkeypatch.setattr(plugins, "_cached", None)


@row("unknown-loss-plugin")
def _(env):
    launcher_error(env, ["--loss_plugin", "epoo"], "--loss_plugin: unknown loss plugin 'epoo'",
                   "installed loss plugins: epo, scaled")  # fmt: skip


@row("unknown-rollout-processor")
def _(env):
    launcher_error(env, [*EPO, "--rollout_processors", "turn_stat"], "--rollout_processors: unknown rollout processor "
                   "'turn_stat'", "installed rollout processors: turn_stats")  # fmt: skip


@row("plugin-raises-on-import")
def _(env):
    source = "raise RuntimeError('this plugin is broken')\n"
    install_fake_plugin(env.tmp_path, "catalogue-broken", {"catbroken": "catalogue_broken"},
                        {"catalogue_broken": source})  # fmt: skip
    line = launcher_process(env, EPO, {"PYTHONPATH": str(env.tmp_path)})
    assert "plugin 'catbroken' (entry point catbroken = catalogue_broken) failed to import" in line
    assert "RuntimeError: this plugin is broken" in line and "OPENRLHF_HOOKS_PLUGINS" in line


@row("two-plugins-claim-one-loss-name")
def _(env):
    source = """
        from openrlhf_hooks import LossPlugin, hookimpl

        class Impostor(LossPlugin):
            name = "epo"

        @hookimpl
        def register_loss_plugins(register):
            register(Impostor())
    """
    install_fake_plugin(env.tmp_path, "catalogue-impostor", {"catimpostor": "catalogue_impostor"},
                        {"catalogue_impostor": source})  # fmt: skip
    fresh_registry(env)
    launcher_error(env, EPO, "two plugins claim the loss name 'epo'", "catimpostor", "uninstall one of them")


@row("two-distributions-claim-one-entry-point")
def _(env):
    install_fake_plugin(env.tmp_path, "catalogue-other", {"epo": "catalogue_other"}, {"catalogue_other": ""})
    fresh_registry(env)
    launcher_error(env, EPO, "two installed plugins claim the entry point name 'epo'", "uninstall one of them")


@row("plugin-misspells-a-hook")
def _(env):
    source = """
        from openrlhf_hooks import hookimpl

        @hookimpl
        def register_loss_plugin(register):
            pass
    """
    install_fake_plugin(env.tmp_path, "catalogue-typo", {"cattypo": "catalogue_typo"}, {"catalogue_typo": source})
    fresh_registry(env)
    launcher_error(env, EPO, "a plugin implements a hook that does not exist", "register_loss_plugin")


@row("plugins-env-names-a-missing-plugin")
def _(env):
    line = launcher_process(env, EPO, {plugins.ENV_PLUGINS: "epo,epo_extra"})
    assert "OPENRLHF_HOOKS_PLUGINS names 'epo_extra', which no installed package provides" in line
    # every installed entry point is named, whatever else this environment has installed
    installed = re.search(r"\(installed: ([^)]*)\)$", line).group(1).split(", ")
    assert {"epo", "scaled"} <= set(installed) and installed == sorted(installed)


# -- one training rank -------------------------------------------------------------------------

MASK = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0]])


def make_loss(config=None, *, rank=0, dp_size=1, all_reduce=None, total_steps=10):
    context = RankContext(rank, dp_size, total_steps, all_reduce or (lambda tensor: tensor))
    return EPORankLoss(config or EPOConfig.from_preset("paper-sciworld"), context)


def logits(seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*MASK.shape, 6, generator=generator, dtype=torch.float64) * 2).requires_grad_(True)


def statistic(config, *micro_batches):
    """The step statistic of these (entropy, mask) micro-batches as one process computes it."""
    parts = sum(step_statistic_parts(h, m, config.aggregation) for h, m in micro_batches)
    return step_statistic(parts).value


def run_step(loss, micro_batches, info=None):
    """One RL step of one optimizer step: begin_step, begin_optimizer_step, policy_loss per (entropy, mask),
    end_step. Returns (metrics, losses, host leaves)."""
    loss.begin_step()
    # one optimizer step, as the host adapter drives it: the step's entropies first, when asked for
    wanted = loss.needs_optimizer_step_entropy()
    loss.begin_optimizer_step([(h.detach(), m) for h, m in micro_batches] if wanted else None)
    outputs, leaves = [], []
    for entropy, mask in micro_batches:
        leaf = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        outputs.append(loss.policy_loss((leaf * 2,), action_mask=mask, entropy=entropy, loss_batch_info=info or {})[0])
        leaves.append(leaf)
    return loss.end_step(), outputs, leaves


def with_bad_token(seed, value):
    x = logits(seed)
    with torch.no_grad():
        x[0, 1, 2] = value  # an action token (MASK[0, 1] = 1)
    return x


def warned(env, text):
    return any(text in record.getMessage() for record in env.caplog.records if record.levelno == logging.WARNING)


class ThreadRanks:
    """`size` ranks as threads; all_reduce_sum is a real rendezvous: every rank waits for the others."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots = [None] * size

    def all_reduce_sum(self, rank):
        def reduce(tensor):
            self.slots[rank] = tensor.detach().clone()
            self.barrier.wait()
            total = torch.stack(self.slots).sum(0)
            self.barrier.wait()  # everyone has read the slots before they are reused
            return total

        return reduce

    def run(self, body):
        """body(rank, all_reduce_sum) on every rank; returns each rank's result or exception."""
        results = [None] * self.size

        def target(rank):
            try:
                results[rank] = body(rank, self.all_reduce_sum(rank))
            except Exception as exc:  # noqa: BLE001  (handed back to the test)
                results[rank] = exc

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        return results


def two_rank_losses(config, all_reduce, rank):
    return make_loss(config, rank=rank, dp_size=2, all_reduce=all_reduce)


@row("micro-batch-without-action-token")
def _(env):
    loss = make_loss()
    empty = torch.zeros_like(MASK)
    clean = logits(1)
    x = logits(2)
    metrics, outputs, _ = run_step(loss, [(ref_token_entropy(clean), MASK), (ref_token_entropy(x), empty)])
    # the empty micro-batch adds nothing: a zero term, a zero (finite) gradient, no statistic
    assert outputs[1].item() == 1.0
    outputs[1].backward()
    assert x.grad is not None and not x.grad.any()
    assert loss.history.values() == [pytest.approx(statistic(loss.config, (ref_token_entropy(clean), MASK)))]
    assert metrics["skipped_steps"] == 0.0


@row("rank-batch-without-action-token")
def _(env):
    h = ref_token_entropy(logits(1)).detach()

    def body(rank, all_reduce):
        loss = two_rank_losses(None, all_reduce, rank)
        mask = MASK if rank == 0 else torch.zeros_like(MASK)
        run_step(loss, [(h, mask)])
        return loss.history.values()

    values = ThreadRanks(2).run(body)
    assert values[0] == values[1] == [pytest.approx(statistic(EPOConfig.from_preset("paper-sciworld"), (h, MASK)))]


@row("step-without-action-token")
def _(env):
    loss = make_loss()
    run_step(loss, [(ref_token_entropy(logits(1)), MASK)])
    before = loss.history.state_dict()
    with env.caplog.at_level(logging.WARNING):
        metrics, _, _ = run_step(loss, [(ref_token_entropy(logits(2)), torch.zeros_like(MASK))])
    assert loss.history.state_dict() == before
    assert metrics["skipped_steps"] == 1.0 and math.isnan(metrics["entropy"])
    assert warned(env, "skipped (no action token in the whole step)")


@row("nan-entropy-in-one-micro-batch")
def _(env):
    _one_bad_micro_batch(env, math.nan)


@row("inf-entropy-in-one-micro-batch")
def _(env):
    _one_bad_micro_batch(env, math.inf)


def _one_bad_micro_batch(env, value):
    loss = make_loss()
    clean = logits(1)
    if math.isnan(value):
        bad = with_bad_token(2, value)
        h_bad = ref_token_entropy(bad)
    else:  # ref_token_entropy stays finite for infinite logits: an infinite entropy can only come from the host
        bad = logits(2)
        offset = torch.zeros(MASK.shape, dtype=torch.float64)
        offset[0, 1] = value
        h_bad = ref_token_entropy(bad) + offset
    h_clean = ref_token_entropy(clean)
    assert not torch.isfinite(h_bad[MASK.bool()]).all()
    with env.caplog.at_level(logging.WARNING):
        metrics, outputs, leaves = run_step(loss, [(h_clean, MASK), (h_bad, MASK)])
    # the bad micro-batch's loss is the host's own, unchanged; EPO adds no gradient (and no nan) through it
    assert outputs[1].item() == 1.0
    outputs[1].backward()
    assert leaves[1].grad.item() == 2.0 and bad.grad is None
    # the statistic comes from the clean micro-batch; the history stays finite
    assert loss.history.values() == [pytest.approx(statistic(loss.config, (h_clean, MASK)))]
    assert metrics["nonfinite_micro_batches"] == 1.0 and metrics["skipped_steps"] == 0.0
    assert warned(env, "1 micro-batch(es) had non-finite entropy on action tokens")


@row("nan-entropy-on-one-rank-with-squared-penalty")
def _(env):
    # the squared penalty all-reduces once per optimizer step: the rank with the bad micro-batch must still join
    config = EPOConfig.from_preset("seed", warmup=1)
    h_good = ref_token_entropy(logits(1)).detach()
    h_bad = ref_token_entropy(with_bad_token(2, math.nan)).detach()
    info = {"global_batch_size": 6, "batch_num_tokens": 2 * int(MASK.sum()), "dp_size": 2}

    def body(rank, all_reduce):
        loss = two_rank_losses(config, all_reduce, rank)
        run_step(loss, [(h_good, MASK)], info)  # fills the warm-up: the penalty is on from here
        metrics, outputs, _ = run_step(loss, [(h_good if rank == 0 else h_bad, MASK)], info)
        return loss.history.values(), metrics["nonfinite_micro_batches"], outputs[0].item()

    (values0, dropped0, loss0), (values1, dropped1, loss1) = ThreadRanks(2).run(body)
    assert values0 == values1 and len(values0) == 2 and all(math.isfinite(v) for v in values0)
    assert values0[1] == pytest.approx(statistic(config, (h_good, MASK)))
    assert dropped0 == dropped1 == 1.0 and math.isfinite(loss0) and loss1 == 1.0


@row("nan-entropy-in-every-micro-batch")
def _(env):
    loss = make_loss()
    run_step(loss, [(ref_token_entropy(logits(1)), MASK)])
    before = loss.history.state_dict()
    with env.caplog.at_level(logging.WARNING):
        metrics, _, _ = run_step(loss, [(ref_token_entropy(with_bad_token(s, math.nan)), MASK) for s in (2, 3)])
    assert loss.history.state_dict() == before
    assert metrics["skipped_steps"] == 1.0 and metrics["nonfinite_micro_batches"] == 2.0
    assert warned(env, "skipped (every micro-batch had non-finite entropy)")


@row("nan-entropy-off-the-action-mask")
def _(env):
    loss = make_loss()
    h = ref_token_entropy(logits(1))
    stray = h.detach().clone()
    stray[0, 0] = math.nan  # MASK[0, 0] = 0: a prompt or observation position
    metrics, outputs, _ = run_step(loss, [(stray, MASK)])
    assert loss.history.values() == [pytest.approx(statistic(loss.config, (h, MASK)))]
    assert math.isfinite(outputs[0].item()) and metrics["nonfinite_micro_batches"] == 0.0


@row("max-bad-steps-in-a-row")
def _(env):
    loss = make_loss(EPOConfig.from_preset("paper-sciworld", max_bad_steps=3))
    bad = [(ref_token_entropy(with_bad_token(5, math.nan)), MASK)]
    run_step(loss, bad)
    run_step(loss, bad)
    run_step(loss, [(ref_token_entropy(logits(1)), MASK)])  # a good step resets the count
    run_step(loss, bad)
    metrics, _, _ = run_step(loss, bad)
    assert metrics["skipped_steps"] == 4.0 and len(loss.history) == 1
    with pytest.raises(EPOHealthError) as err:
        run_step(loss, bad)
    message = str(err.value)
    assert "3 consecutive RL steps (3 to 5) had no finite entropy statistic" in message
    assert "--epo.max_bad_steps=3 sets how many in a row are tolerated" in message and "\n" not in message
    assert len(loss.history) == 1


@row("non-finite-value-pushed-into-the-history")
def _(env):
    history = EntropyHistory(window_size=None, warmup=1)
    with pytest.raises(ValueError, match=r"step entropy statistic must be finite, got nan; a non-finite statistic"):
        history.push(math.nan)
    assert len(history) == 0


@row("entropy-and-mask-shapes-disagree")
def _(env):
    loss = make_loss()
    loss.begin_step()
    with pytest.raises(ValueError) as err:
        loss.policy_loss((torch.tensor(0.0),), action_mask=MASK, entropy=torch.zeros(3, 7), loss_batch_info={})
    assert "entropy shape (3, 7) and action_mask shape (3, 8) disagree" in str(err.value)


@row("entropy-not-provided-by-the-host")
def _(env):
    loss = make_loss()
    loss.begin_step()
    with pytest.raises(RuntimeError, match="EPO needs the per-token entropy of the policy"):
        loss.policy_loss((torch.tensor(0.0),), action_mask=MASK, entropy=None, loss_batch_info={})


# -- checkpoints -------------------------------------------------------------------------------


def trained_state(config, steps=2):
    loss = make_loss(config)
    for step in range(steps):
        run_step(loss, [(ref_token_entropy(logits(10 + step)), MASK)])
    return loss.state_dict()


@row("checkpoint-from-another-preset")
def _(env):
    state = trained_state(EPOConfig.from_preset("seed"))
    loss = make_loss(EPOConfig.from_preset("paper-sciworld"))
    with pytest.raises(ValueError) as err:
        loss.load_state_dict(state)
    message = str(err.value)
    assert "written with epo.window_size=20, but this run uses epo.window_size=None" in message
    assert "resume with the same --epo.window_size" in message
    assert len(loss.history) == 0


@row("checkpoint-from-a-preset-with-the-same-history")
def _(env):
    # paper-sciworld and paper-alfworld differ only in alpha: the history means the same
    state = trained_state(EPOConfig.from_preset("paper-sciworld"))
    loss = make_loss(EPOConfig.from_preset("paper-alfworld"))
    loss.load_state_dict(state)
    assert loss.history.state_dict() == state["history"] and loss.step == 2


@row("checkpoint-from-another-version")
def _(env):
    state = trained_state(None)
    state["history"]["version"] = 2
    with pytest.raises(ValueError, match=r"state has version 2; this build reads version 1 only \(the checkpoint was "):
        make_loss().load_state_dict(state)


@row("checkpoint-with-a-non-finite-value")
def _(env):
    state = trained_state(None)
    state["history"]["values"][0] = math.inf
    with pytest.raises(ValueError, match="saved step statistic must be finite, got inf"):
        make_loss().load_state_dict(state)


@row("checkpoint-incomplete")
def _(env):
    with pytest.raises(ValueError, match="EPO state in this checkpoint is incomplete: expected a mapping with 'step'"):
        make_loss().load_state_dict({"config": {}})


@row("checkpoint-of-another-plugin")
def _(env):
    trainer = SimpleNamespace(
        actor_loss_fn=lambda *a, **k: (torch.tensor(0.0),),
        actor=SimpleNamespace(forward=None),
        strategy=SimpleNamespace(backward=None),
        replay_buffer=SimpleNamespace(collate_fn=None),
        args=SimpleNamespace(train=SimpleNamespace(dynamic_batch_enable=False)),
        training_step=None,
    )
    loss = make_loss()
    hooked = HookedTrainer(trainer, loss, "epo", loss.context)
    with pytest.raises(PluginConfigError) as err:
        hooked.restore({"plugin": "scaled", "state": {}})
    assert "holds state of loss plugin 'scaled', but this run uses --loss_plugin epo" in str(err.value)
    assert "resume with --loss_plugin scaled" in str(err.value)


# -- rank agreement ----------------------------------------------------------------------------


@row("ranks-disagree-at-a-periodic-check")
def _(env):
    config = EPOConfig.from_preset("paper-sciworld", check_every=2)
    h = ref_token_entropy(logits(1)).detach()

    def body(rank, all_reduce):
        loss = two_rank_losses(config, all_reduce, rank)
        agreement = RankAgreement(loss, loss.context, "epo")  # the hook layer runs it before each step
        for step in range(3):  # checked at steps 0 and 2
            if step == 1 and rank == 1:
                loss.history.push(0.123)  # rank 1's history now differs
            agreement.check()
            run_step(loss, [(h, MASK)])

    results = ThreadRanks(2).run(body)
    for result in results:
        assert isinstance(result, RankStateMismatchError), result
        message = str(result)
        assert "loss plugin 'epo': the data-parallel ranks disagree about its state at step 2:" in message
        assert "rank 0: " in message and "rank 1: " in message and "resume all ranks from one checkpoint" in message


@row("ranks-disagree-after-a-resume")
def _(env):
    config = EPOConfig.from_preset("paper-sciworld", check_every=0)  # periodic checks off: the resume check still runs
    state = trained_state(config)
    tampered = json.loads(json.dumps(state))
    tampered["history"]["values"][0] += 1e-9
    h = ref_token_entropy(logits(1)).detach()

    def body(rank, all_reduce):
        loss = two_rank_losses(config, all_reduce, rank)
        agreement = RankAgreement(loss, loss.context, "epo")
        loss.load_state_dict(state if rank == 0 else tampered)
        agreement.restored(2)
        agreement.check()
        run_step(loss, [(h, MASK)])

    for result in ThreadRanks(2).run(body):
        assert isinstance(result, RankStateMismatchError), result
        assert "at step 2 (after a resume)" in str(result) and "rank 1: " in str(result)


@row("one-rank-did-not-resume")
def _(env):
    config = EPOConfig.from_preset("paper-sciworld", check_every=0)
    state = trained_state(config)
    h = ref_token_entropy(logits(1)).detach()

    def body(rank, all_reduce):
        loss = two_rank_losses(config, all_reduce, rank)
        agreement = RankAgreement(loss, loss.context, "epo")
        if rank == 0:
            loss.load_state_dict(state)
            agreement.restored(2)
        agreement.check()
        run_step(loss, [(h, MASK)])

    for result in ThreadRanks(2).run(body):
        assert isinstance(result, RankStateMismatchError), result
        assert "rank 1: no check (at another step, or not resumed)" in str(result)


@row("rank-outside-the-data-parallel-group")
def _(env):
    with pytest.raises(ValueError, match=r"RankContext.rank=2 is invalid: .*0 <= rank < dp_size=2"):
        make_loss(rank=2, dp_size=2)


# -- files the plugin's hosts write ------------------------------------------------------------


@row("summary-write-fails-part-way")
def _(env):
    path = env.tmp_path / "summary.json"
    atomic_write_json(path, {"step": 1})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch, pytest.raises(OSError, match="No space left"):
        patch.setattr(os, "fsync", disk_full)  # the bytes are written, the flush to disk fails
        atomic_write_json(path, {"step": 2})
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in env.tmp_path.iterdir()] == ["summary.json"]


@row("crash-while-rewriting-metrics")
def _(env):
    path = env.tmp_path / "metrics.jsonl"
    atomic_write_text(path, '{"step": 0}\n')
    crash = (
        "import os, sys\n"
        "from openrlhf_epo.demo import io\n"
        "os.fsync = lambda fd: os._exit(9)  # the process dies after writing, before the rename\n"
        "io.atomic_write_text(sys.argv[1], '{\"step\": 0}\\n{\"step\": 1}\\n')\n"
    )
    done = subprocess.run([sys.executable, "-c", crash, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 9, done.stderr
    assert path.read_text() == '{"step": 0}\n'


# -- the run's length (K) and the host's packages ----------------------------------------------


def prompts_flags(env, count, name="prompts.jsonl"):
    path = env.tmp_path / name
    path.write_text("".join(json.dumps({"prompt": f"task {i}"}) + "\n" for i in range(count)))
    return ["--data.prompt_dataset", str(path), "--data.input_key", "prompt"]


def dry_run_warnings(env, flags):
    """The dry run's report and its warning lines on stderr about K (the default preset's corridor
    warning, docs/spec.md section 8, has its own tests in test_corridor_holds.py)."""
    with pytest.raises(SystemExit) as done:
        launcher.main([*HOST, *flags, "--plugins_dry_run"])
    assert done.value.code == 0
    captured = env.capsys.readouterr()
    prefix = "python -m openrlhf_hooks.train_ppo_ray: warning: "
    corridor = f"{prefix}loss plugin epo: the corridor"
    lines = captured.err.splitlines()
    return json.loads(captured.out), [line for line in lines if line.startswith(prefix) and not line.startswith(corridor)]


@row("freezing-steps-cover-every-rl-step")
def _(env):
    # 10 prompts in rollout batches of 2 (HOST): 5 RL steps, global steps 0..4 all frozen
    launcher_error(env, [*EPO, *prompts_flags(env, 10), "--critic.freezing_steps", "4"],
                   "--critic.freezing_steps=4 freezes the actor for all 5 RL steps of this run",
                   "the actor would never train; lower --critic.freezing_steps", before_host=False)  # fmt: skip


@row("prompt-dataset-without-prompts")
def _(env):
    launcher_error(env, [*EPO, *prompts_flags(env, 10), "--data.max_samples", "0"], "--data.prompt_dataset=",
                   "holds no prompts (--data.max_samples=0): the run has no RL step to train", before_host=False)  # fmt: skip


@row("prompt-dataset-not-countable")
def _(env):
    report, (line,) = dry_run_warnings(env, [*EPO, "--data.prompt_dataset", str(env.tmp_path / "missing.jsonl")])
    assert report["rl_steps"] is None and report["rl_steps_note"].startswith("cannot count the prompts of")
    assert "cannot count the prompts of --data.prompt_dataset=" in line
    assert line.endswith("; set --epo.total_steps to the number of RL steps")


@row("dynamic-filtering-makes-k-an-estimate")
def _(env):
    report, (line,) = dry_run_warnings(env, [*EPO, *prompts_flags(env, 9), "--algo.dynamic_filtering_enable"])
    assert report["rl_steps"] == 5
    assert "at most 5 RL steps" in line and "depends on how many prompts pass the filter" in line
    assert line.endswith("; set --epo.total_steps to fix it")


def bare_process(env, flags, extra_env=None):
    """`python -m openrlhf_hooks.train_ppo_ray` in a fresh process WITHOUT the test stand-ins, and
    without vllm and flash_attn (tests/support/no_gpu_packages.py)."""
    import no_gpu_packages

    child_env = {k: v for k, v in os.environ.items() if k != plugins.ENV_PLUGINS}
    child_env.update(extra_env or {})
    command = no_gpu_packages.command(*HOST, *flags)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=child_env)


@row("host-package-missing-in-a-real-run")
def _(env):
    done = bare_process(env, EPO)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        PREFIX + "OpenRLHF needs the package 'vllm', which is not installed here: pip install 'openrlhf[vllm]==0.11.2'; "
        "or pip install 'openrlhf-hooks[gpu]' installs OpenRLHF 0.11.2 with vllm and flash-attn"
    ]


@row("dry-run-uses-a-missing-host-package")
def _(env):
    source = """
        from openrlhf_hooks import LossPlugin, hookimpl

        class UsesVllm(LossPlugin):
            name = "usesvllm"

            def check_host(self, host_args, config):
                import vllm

                vllm.SamplingParams(temperature=1.0)

        @hookimpl
        def register_loss_plugins(register):
            register(UsesVllm())
    """
    install_fake_plugin(env.tmp_path, "catalogue-usesvllm", {"usesvllm": "catalogue_usesvllm"},
                        {"catalogue_usesvllm": source})  # fmt: skip
    done = bare_process(env, ["--loss_plugin", "usesvllm", "--plugins_dry_run"], {"PYTHONPATH": str(env.tmp_path)})
    assert done.returncode == 2 and done.stdout == ""
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == [done.stderr.strip().splitlines()[-1]]
    assert errors[0] == (
        PREFIX + "vllm.SamplingParams was used, but OpenRLHF needs the package 'vllm', which is not installed here: "
        "pip install 'openrlhf[vllm]==0.11.2'; or pip install 'openrlhf-hooks[gpu]' installs OpenRLHF 0.11.2 with vllm "
        "and flash-attn (only --help and --plugins_dry_run run without it)"
    )
