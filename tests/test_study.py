"""`openrlhf-epo study`: the config and its one-line errors, skipping finished runs, resuming the ones
cut short and refusing runs the config no longer describes (fake runs: no host starts), the statistics
of the pre-registered comparisons against table values and float64 hand computations, the results and
pictures, `plot` on study and TensorBoard folders; end to end (marker e2e): the smoke study through
OpenRLHF's whole loop, twice."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from openrlhf_epo.cli import main
from openrlhf_epo.demo import runner, stats, study

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "study" / "smoke.yaml"
TRAP = REPO / "configs" / "study" / "trap.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def write_config(folder: Path, config: dict) -> Path:
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def smoke_config() -> dict:
    return yaml.safe_load(SMOKE.read_text())


def plan(config: dict, out: Path):
    return study.plan_study(config, "test", out)


def rows(steps: int, success: float = 0.5, **fields) -> list[dict]:
    return [{"step": s, "success_rate": success, "entropy": 1.0, **fields} for s in range(steps)]


def fake_run(spec, logged: list[dict], **changed) -> None:
    """A run folder as the host leaves it: run.json (its spec, with `changed` fields) and metrics.jsonl."""
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({**asdict(spec), **changed}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in logged))


def last_error(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture
def no_signal_handlers(monkeypatch):
    """run_study installs Ctrl-C and kill handlers for its hosts; keep this test process's own."""
    monkeypatch.setattr(signal, "signal", lambda *args: None)


@pytest.fixture
def fake_host(monkeypatch, no_signal_handlers):
    """runner.run_all without a host: records the specs it is given and logs all their steps."""
    trained = []

    def run_all(specs, jobs, progress, after_each, resume=False):
        for spec in specs:
            trained.append(spec.run_dir)
            fake_run(spec, rows(spec.steps, success=0.25, trap_rate=0.5))
            after_each()
        return None

    monkeypatch.setattr(runner, "run_all", run_all)
    return trained


# -- the config -----------------------------------------------------------------------------------


def test_smoke_config_plans_two_runs_of_the_trap_task(tmp_path):
    from openrlhf_epo.demo.openrlhf_run import host_command

    plan_, specs = plan(smoke_config(), tmp_path / "s")
    assert [(s.name, s.seed) for s in specs] == [("baseline", 100), ("bonus-only", 100)]
    baseline, bonus = specs
    assert baseline.epo_flags is None
    # YAML numbers become the flag text, and the preset is named, so a later default cannot change a run
    assert bonus.epo_flags == {"preset": "paper-sciworld", "alpha": "0", "lambda_entropy": "0.03"}
    assert baseline.run_dir == str(tmp_path / "s" / "baseline-s100")
    assert baseline.model_dir == bonus.model_dir == str(tmp_path / "s" / "model-tiny-s100")
    assert baseline.env == {"rooms": 6, "max_turns": 18, "coin": 0.25}
    assert (baseline.steps, baseline.groups, baseline.group_size, baseline.ppo_epochs, baseline.minibatches) == (2, 2, 4, 1, 1)
    assert baseline.max_len == runner.PROMPT_TOKENS["tiny"] + runner.TOKENS_PER_TURN["tiny"] * 18
    assert baseline.save_every == study.DEFAULT_SAVE_EVERY and baseline.host_fixes == []
    assert plan_.comparisons == [("bonus-only", "baseline")] and plan_.min_effect == 0.2  # the defaults
    command = host_command(bonus)
    assert command[command.index("--epo.alpha") + 1] == "0" and command[command.index("--epo.lambda_entropy") + 1] == "0.03"
    assert "--loss_plugin" not in host_command(baseline)


def test_trap_configs_are_the_preregistered_study(tmp_path):
    """configs/study/trap*.yaml say what docs/evidence/trap-study.md registered: the same task, model
    and sizes; the control with the host fix off, the study with it on; test and calibration seeds apart."""
    loaded = {name: yaml.safe_load((TRAP.parent / f"{name}.yaml").read_text()) for name in ("trap", "trap-control", "trap-calibration")}
    plans = {name: plan(config, tmp_path / name) for name, config in loaded.items()}
    plan_, specs = plans["trap"]
    assert plan_.arms == ["baseline", "bonus-only", "paper-published", "paper-calibrated", "two-sided"]
    assert plan_.seeds == list(range(100, 110)) and len(specs) == 50
    assert {s.model for s in specs} == {"realistic"} and {s.steps for s in specs} == {40} and {tuple(s.host_fixes) for s in specs} == {("group_norm",)}
    assert plan_.comparisons == [("bonus-only", "baseline"), ("paper-published", "baseline"), ("paper-calibrated", "baseline"),
                                 ("two-sided", "baseline"), ("two-sided", "bonus-only"), ("paper-calibrated", "bonus-only")]  # fmt: skip
    flags = {s.name: s.epo_flags for s in specs}
    assert flags["paper-published"] == {"preset": "paper-sciworld"}
    assert flags["bonus-only"]["alpha"] == "0" and flags["two-sided"]["preset"] == "two-sided"
    # paper-calibrated runs at bonus-only's lambda, whatever the calibration chose
    assert flags["paper-calibrated"]["lambda_entropy"] == flags["bonus-only"]["lambda_entropy"]
    control, control_specs = plans["trap-control"]
    assert control.arms == ["baseline"] and control.seeds == plan_.seeds and {tuple(s.host_fixes) for s in control_specs} == {()}
    calibration, calibration_specs = plans["trap-calibration"]
    assert not set(calibration.seeds) & set(plan_.seeds) and len(calibration.seeds) >= 2
    grid = sorted(float(s.epo_flags["lambda_entropy"]) for s in calibration_specs if s.name.startswith("two-sided") and s.seed == calibration.seeds[0])
    assert grid == [0.003, 0.01, 0.03, 0.1]
    for other in (control_specs, calibration_specs):  # the same task, model and training everywhere
        for field in ("model", "env", "steps", "groups", "group_size", "lr", "ppo_epochs", "minibatches", "max_len"):
            assert {str(getattr(s, field)) for s in other} == {str(getattr(specs[0], field))}, field


def test_an_arm_without_knobs_is_epo_with_the_default_preset_named(tmp_path):
    from openrlhf_epo.config import DEFAULT_PRESET

    config = {**smoke_config(), "arms": {"epo": {}}}
    _, specs = plan(config, tmp_path)
    assert specs[0].epo_flags == {"preset": DEFAULT_PRESET}


BAD_CONFIGS = [
    ({"sizez": {}}, "unknown key 'sizez'"),
    ({"sizes": {"steps": 0}}, "sizes.steps=0 is invalid"),
    ({"sizes": {"steps": True}}, "sizes.steps=True is invalid"),
    ({"sizes": {"colour": 1}}, "sizes.colour: unknown key"),
    ({"sizes": {"group_size": 1}}, "sizes.group_size=1 is invalid"),
    ({"sizes": {"lr": "1e-3"}}, "sizes.lr='1e-3' is invalid: expected a finite number > 0 (YAML reads"),
    ({"sizes": {"lr": float("nan")}}, "sizes.lr=nan is invalid"),
    ({"sizes": {"groups": 2, "group_size": 4, "minibatches": 3}}, "sizes.minibatches=3 is invalid: the 8 episodes"),
    ({"env": {"rooms": 2}}, "env.rooms=2 is invalid"),
    ({"env": {"coin": 1.5}}, "env.coin=1.5 is invalid"),
    ({"env": {"colour": 3}}, "env.colour: unknown key"),
    ({"env": [6]}, "env=[6] is invalid: expected a mapping"),
    ({"model": "gpt5"}, "model='gpt5' is invalid"),
    ({"host_fixes": ["nofix"]}, "host_fixes: unknown fix 'nofix'"),
    ({"host_fixes": "group_norm"}, "host_fixes='group_norm' is invalid"),
    ({"seeds": []}, "seeds=[] is invalid"),
    ({"seeds": [1, 1]}, "a seed is listed twice"),
    ({"seeds": [-1]}, "seeds=-1 is invalid"),
    ({"arms": {}}, "arms: expected at least one arm"),
    ({"arms": {"two words": None}}, "arms='two words' is invalid"),
    ({"arms": {"model-x": None}}, "arms='model-x' is invalid: names starting with 'model-'"),
    ({"arms": {"epo": {"lambda": 0.03}}}, "arms.epo.lambda: unknown EPO knob"),
    ({"arms": {"epo": {"alpha": -1}}}, "arms.epo: epo.alpha=-1.0 is invalid"),
    ({"arms": {"epo": {"preset": "nope"}}}, "arms.epo: epo.preset='nope' is invalid"),
    ({"arms": {"epo": {"alpha": [1]}}}, "arms.epo.alpha=[1] is invalid"),
    ({"arms": {"epo": "paper-sciworld"}}, "arms.epo='paper-sciworld' is invalid: expected a mapping"),
    ({"comparisons": [["bonus-only", "nobody"]]}, "comparisons: ['bonus-only', 'nobody'] names 'nobody', which is no arm"),
    ({"comparisons": [["baseline", "baseline"]]}, "two different arms"),
    ({"comparisons": [["bonus-only", "baseline"]] * 2}, "is listed twice"),
    ({"comparisons": "all"}, "comparisons='all' is invalid"),
    ({"min_effect": "big"}, "min_effect='big' is invalid"),
    ({"min_effect": -0.1}, "min_effect=-0.1 is invalid"),
    ({"save_every": -1}, "save_every=-1 is invalid"),
    ({"name": "a b"}, "name='a b' is invalid"),
]


@pytest.mark.parametrize("change, message", BAD_CONFIGS, ids=[message for _, message in BAD_CONFIGS])
def test_bad_config_fails_with_one_line_naming_the_key(change, message, tmp_path, capsys):
    path = write_config(tmp_path, {**smoke_config(), **change})
    with pytest.raises(SystemExit) as failed:
        main(["study", str(path), "--out", str(tmp_path / "never")])
    assert failed.value.code == 2
    error = last_error(capsys)
    assert error.startswith(f"openrlhf-epo study: error: {path}: ") and message in error
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "text, message",
    [("- a\n- b\n", "expected a mapping of study keys"), ("name: [unclosed\n", "not valid YAML at line 2"), (None, "cannot read the study config")],
)
def test_unreadable_config_fails_with_one_line(text, message, tmp_path, capsys):
    path = tmp_path / "study.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as failed:
        main(["study", str(path), "--out", str(tmp_path / "never")])
    assert failed.value.code == 2 and message in last_error(capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--only", "nobody"], "--only='nobody' is invalid: 'nobody' is no arm of the study (baseline, bonus-only)"),
        (["--only", ","], "--only=',' is invalid"),
        (["--seeds_only", "7"], "--seeds_only='7' is invalid: '7' is no seed of the study (100)"),
        (["--jobs", "0"], "--jobs=0 is invalid"),
        (["--colour"], "unrecognized arguments: --colour"),
    ],
)
def test_bad_study_flags_fail_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as failed:
        main(["study", str(SMOKE), "--out", str(tmp_path / "never"), *argv])
    assert failed.value.code == 2 and message in last_error(capsys)
    assert not (tmp_path / "never").exists()


# -- runs already there ---------------------------------------------------------------------------


def test_finished_runs_are_skipped_and_cut_short_runs_resume(tmp_path, fake_host, capsys):
    config = {**smoke_config(), "seeds": [100, 101]}
    path = write_config(tmp_path, config)
    out = tmp_path / "out"
    _, specs = plan(config, out)
    by_run = {(s.name, s.seed): s for s in specs}
    fake_run(by_run["baseline", 100], rows(2, success=0.5))  # finished
    fake_run(by_run["bonus-only", 100], rows(1))  # cut short after 1 of 2 steps
    # finished by an older version, whose run.json had no host_fixes field, with other checkpoints and at another path
    fake_run(by_run["baseline", 101], rows(2), save_every=3, run_dir="elsewhere")
    saved = json.loads((out / "baseline-s101" / "run.json").read_text())
    del saved["host_fixes"]
    (out / "baseline-s101" / "run.json").write_text(json.dumps(saved))

    assert main(["study", str(path), "--out", str(out), "--no_progress"]) == 0
    # the cut-short run is trained again in its own folder, where the host loads its checkpoint
    assert fake_host == [str(out / "bonus-only-s100"), str(out / "bonus-only-s101")]
    from openrlhf_epo.demo.openrlhf_run import host_command

    command = host_command(by_run["bonus-only", 100])
    assert "--ckpt.load_enable" in command and command[command.index("--ckpt.path") + 1] == str(out / "bonus-only-s100" / "ckpt")
    captured = capsys.readouterr()
    assert "2 finished, 2 to train now" in captured.err
    assert "| baseline | 2 |" in captured.out and "| bonus-only | 2 |" in captured.out
    with open(out / "results.csv") as table:
        assert len(list(csv.DictReader(table))) == 4

    fake_host.clear()
    assert main(["study", str(path), "--out", str(out), "--no_progress"]) == 0
    assert fake_host == [] and "4 finished, 0 to train now" in capsys.readouterr().err


def test_only_and_seeds_only_choose_what_trains_now(tmp_path, fake_host):
    config = {**smoke_config(), "seeds": [100, 101]}
    path = write_config(tmp_path, config)
    out = tmp_path / "out"
    assert main(["study", str(path), "--out", str(out), "--only", "bonus-only", "--seeds_only", "101", "--no_progress"]) == 0
    assert fake_host == [str(out / "bonus-only-s101")]
    assert main(["study", str(path), "--out", str(out), "--seeds_only", "100", "--no_progress"]) == 0
    assert fake_host[1:] == [str(out / "baseline-s100"), str(out / "bonus-only-s100")]


@pytest.mark.parametrize(
    "field, saved, message",
    [
        ("lr", 0.002, "lr=0.002 (its run.json) but the config now asks lr=0.001"),
        ("epo_flags", {"preset": "paper-sciworld"}, "epo_flags={'preset': 'paper-sciworld'} (its run.json) but the config now asks"),
        ("env", {"rooms": 6, "max_turns": 18, "coin": 0.0}, "env="),
        ("steps", 40, "steps=40 (its run.json) but the config now asks steps=2"),
    ],
)
def test_a_run_the_config_no_longer_describes_is_refused_before_any_work(field, saved, message, tmp_path, fake_host, capsys):
    out = tmp_path / "out"
    _, specs = plan(smoke_config(), out)
    fake_run(specs[0], rows(2))
    fake_run(specs[1], rows(2), **{field: saved})
    with pytest.raises(SystemExit) as failed:
        main(["study", str(SMOKE), "--out", str(out), "--no_progress"])
    assert failed.value.code == 2
    error = last_error(capsys)
    assert f"run {out / 'bonus-only-s100'} was made with {field}=" in error and message in error
    assert fake_host == [] and not (out / "results.csv").exists()


def test_dry_run_says_what_each_run_would_do_and_writes_nothing(tmp_path, fake_host, capsys):
    config = {**smoke_config(), "seeds": [100, 101]}
    path = write_config(tmp_path, config)
    out = tmp_path / "out"
    _, specs = plan(config, out)
    fake_run(specs[0], rows(2))
    fake_run(specs[1], rows(1))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["study", str(path), "--out", str(out), "--dry_run", "--only", "baseline"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"baseline s100: finished -> {out / 'baseline-s100'}",
        f"baseline s101: resume (1 of 2 steps logged) -> {out / 'baseline-s101'}",
        f"bonus-only s100: not selected -> {out / 'bonus-only-s100'}",
        f"bonus-only s101: not selected -> {out / 'bonus-only-s101'}",
    ]
    assert fake_host == [] and sorted(p.relative_to(out) for p in out.rglob("*")) == before


# -- the statistics -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "p, df, expected",
    # printed tables of Student's t (two-sided 95%: p 0.975; 99%: p 0.995; one-sided 95%: p 0.95)
    [(0.975, 7, 2.3646), (0.975, 9, 2.2622), (0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.995, 4, 4.6041), (0.95, 30, 1.6973), (0.975, 120, 1.9799)],
)
def test_t_quantile_matches_table_values(p, df, expected):
    assert stats.student_t_quantile(p, df) == pytest.approx(expected, abs=1e-4)
    assert stats.student_t_quantile(1 - p, df) == pytest.approx(-expected, abs=1e-4)


def test_t_cdf_inverts_the_quantile_and_tends_to_the_normal():
    for df in (1, 3, 7, 29):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert stats.student_t_cdf(stats.student_t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)
    assert stats.student_t_cdf(0.0, 5) == 0.5
    assert stats.student_t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)


def test_incomplete_beta_matches_closed_forms():
    for x in (0.01, 0.3, 0.5, 0.77, 0.99):
        assert stats.incomplete_beta(3.0, 1.0, x) == pytest.approx(x**3, rel=1e-12)
        assert stats.incomplete_beta(1.0, 2.5, x) == pytest.approx(1 - (1 - x) ** 2.5, rel=1e-12)
        assert stats.incomplete_beta(0.5, 0.5, x) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), rel=1e-12)
    assert stats.incomplete_beta(2.0, 3.0, 0.0) == 0.0 and stats.incomplete_beta(2.0, 3.0, 1.0) == 1.0


def test_the_demo_table_of_t_agrees_with_the_exact_quantile():
    for df in range(1, 31):
        assert stats.t_quantile(df) == pytest.approx(stats.student_t_quantile(0.975, df), abs=5e-4)


def test_holm_on_a_known_example():
    # R: p.adjust(c(0.01, 0.04, 0.03, 0.005), "holm") gives 0.03 0.06 0.06 0.02
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # a comparison without a test is not counted in m; adjusted p-values are capped at 1
    assert stats.holm([0.2, None, 0.6]) == [0.4, None, 0.6]
    assert stats.holm([0.7, 0.9]) == [1.0, 1.0]


def t_two_sided_p_by_integration(t: float, df: int) -> float:
    """P(|T| >= |t|) by integrating Student's density numerically (float64), independent of the beta function."""
    grid = np.linspace(abs(t), 2000.0, 4_000_001)
    density = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2)) * (1 + grid**2 / df) ** (-(df + 1) / 2)
    return 2 * float(np.trapezoid(density, grid))


def test_paired_difference_against_a_float64_hand_computation():
    treatment = {100: 0.62, 101: 0.41, 102: 0.55, 103: 0.70, 104: 0.38, 105: 0.66, 106: 0.59, 107: 0.47, 108: 0.9}
    control = {99: 0.1, 100: 0.30, 101: 0.35, 102: 0.20, 103: 0.52, 104: 0.41, 105: 0.28, 106: 0.33, 107: 0.25}
    found = stats.paired_difference(treatment, control)
    seeds = list(range(100, 108))  # the seeds both have
    differences = np.array([treatment[s] - control[s] for s in seeds], dtype=np.float64)
    mean = differences.mean()
    error = differences.std(ddof=1) / np.sqrt(len(differences))
    t975_7 = 2.364624251592785  # t_{0.975, 7}
    assert found["seeds"] == seeds and found["n"] == 8 and found["df"] == 7
    assert found["mean_difference"] == pytest.approx(mean, rel=1e-12)
    assert found["ci95"] == pytest.approx([mean - t975_7 * error, mean + t975_7 * error], rel=1e-9)
    assert found["t"] == pytest.approx(mean / error, rel=1e-12)
    assert found["p"] == pytest.approx(t_two_sided_p_by_integration(mean / error, 7), rel=1e-6)


def test_paired_difference_with_too_few_seeds_or_no_spread():
    one = stats.paired_difference({1: 0.5, 2: 0.9}, {1: 0.2})
    assert (one["n"], one["ci95"], one["p"], one["t"]) == (1, None, None, None) and one["mean_difference"] == pytest.approx(0.3)
    assert stats.paired_difference({1: 0.5}, {2: 0.2})["mean_difference"] is None
    same = stats.paired_difference({1: 0.5, 2: 0.6}, {1: 0.2, 2: 0.3})
    assert same["ci95"] == pytest.approx([0.3, 0.3]) and same["p"] == 0.0 and same["t"] is None


def test_the_decision_rule_needs_effect_holm_and_an_interval_above_zero():
    seeds = range(8)
    base = {s: 0.2 + 0.01 * s for s in seeds}
    per_arm = {
        "baseline": base,
        "big": {s: base[s] + 0.30 + 0.02 * (s % 3) for s in seeds},  # +0.32 or so, consistent: passes
        "small": {s: base[s] + 0.05 + 0.01 * (s % 2) for s in seeds},  # consistent but under min_effect
        "noisy": {s: base[s] + (0.9 if s % 2 else -0.4) for s in seeds},  # big mean, interval across 0
        "single": {0: 0.9},
    }
    pairs = [("big", "baseline"), ("small", "baseline"), ("noisy", "baseline"), ("single", "baseline")]
    found = {item["treatment"]: item for item in stats.compare(per_arm, pairs, min_effect=0.2)}
    assert found["big"]["verdict"] == "pass" and found["big"]["p_holm"] < 0.05
    assert found["small"]["verdict"] == "fail" and found["small"]["p_holm"] < 0.05  # significant, too small
    assert found["noisy"]["verdict"] == "fail" and found["noisy"]["mean_difference"] >= 0.2 and found["noisy"]["ci95"][0] < 0
    assert found["single"]["verdict"] == "too few seeds" and found["single"]["p_holm"] is None
    # Holm over the three tested comparisons
    tested = [found[arm]["p"] for arm in ("big", "small", "noisy")]
    assert [found[arm]["p_holm"] for arm in ("big", "small", "noisy")] == pytest.approx(stats.holm(tested))


def test_trap_collapse_is_the_first_step_the_trap_rate_stays_high_from():
    def collapse(rates):
        return stats.trap_collapse_step([{"step": s, "trap_rate": r} for s, r in enumerate(rates)])

    assert collapse([0.1, 0.9, 0.5, 0.8, 0.9, 1.0]) == 3
    assert collapse([0.9, 0.95, 1.0]) == 0
    assert collapse([0.9, 0.95, 0.7]) is None
    assert collapse([None, None]) is None and stats.trap_collapse_step(rows(3)) is None


def test_run_results_use_the_last_fifth_and_leave_missing_metrics_empty():
    logged = [{"step": s, "success_rate": s / 10, "trap_rate": 1 - s / 10, "entropy": 2.0, "action_entropy": None} for s in range(10)]
    found = stats.run_results(logged)
    assert found["goal_final"] == pytest.approx((0.8 + 0.9) / 2)  # the last 2 of 10 steps
    assert found["goal_auc"] == pytest.approx(0.45)
    assert found["trap_final"] == pytest.approx((0.2 + 0.1) / 2) and found["entropy_final"] == 2.0
    assert found["action_entropy_final"] is None and found["tail_mass_final"] is None
    assert found["steps"] == 10 and found["trap_collapse_step"] is None


# -- results and pictures -------------------------------------------------------------------------


def fake_study(out: Path) -> study.Study:
    """Two arms x 3 seeds, finished; one more seed cut short; no run logged tail_mass."""
    config = {**smoke_config(), "seeds": [1, 2, 3, 4]}
    plan_, specs = plan(config, out)
    for spec in specs:
        lift = 0.3 if spec.name == "bonus-only" else 0.0
        logged = rows(2, success=0.1 * spec.seed + lift, trap_rate=1.0 - lift, action_entropy=1.2 + lift)
        fake_run(spec, logged if spec.seed < 4 else logged[:1])
    plan_.out.mkdir(parents=True, exist_ok=True)
    plan_.save()
    return plan_


def test_results_table_and_pictures_come_from_the_finished_runs(tmp_path):
    out = tmp_path / "out"
    written = study.write_results(fake_study(out))
    with open(out / "results.csv") as table:
        results = list(csv.DictReader(table))
    assert [(r["arm"], r["seed"]) for r in results] == [("baseline", "1"), ("baseline", "2"), ("baseline", "3"),
                                                         ("bonus-only", "1"), ("bonus-only", "2"), ("bonus-only", "3")]  # fmt: skip
    assert list(results[0]) == list(stats.RESULT_COLUMNS)
    assert float(results[3]["goal_final"]) == pytest.approx(0.4) and results[0]["tail_mass_final"] == ""
    assert results[0]["trap_collapse_step"] == "0" and results[3]["trap_collapse_step"] == ""  # 1.0 versus 0.7
    summary = json.loads((out / "study.json").read_text())
    assert (summary["finished_runs"], summary["planned_runs"]) == (6, 8)
    assert summary["arms"]["baseline"]["trapped_runs"] == 3 and summary["arms"]["bonus-only"]["trapped_runs"] == 0
    (comparison,) = summary["comparisons"]
    assert comparison["n"] == 3 and comparison["mean_difference"] == pytest.approx(0.3)
    assert comparison["p"] < 1e-9 and comparison["verdict"] == "pass"  # every seed +0.3, up to rounding
    table = (out / "study.md").read_text()
    assert "| bonus-only | 3 | 0.500 ± " in table and "| bonus-only - baseline | 3 | +0.300 |" in table
    pictures = {path.name for path in written if path.suffix == ".png"}
    assert pictures == {"goal.png", "trap.png", "action_entropy.png", "entropy.png"}  # no run logged tail_mass
    assert all((out / name).read_bytes()[:8] == PNG for name in pictures) and not (out / "tail_mass.png").exists()


def test_plot_redraws_a_study_folder_without_the_plugin_registry(tmp_path):
    out = tmp_path / "out"
    fake_study(out)
    env = {**os.environ, "OPENRLHF_HOOKS_PLUGINS": ""}
    done = subprocess.run([sys.executable, "-m", "openrlhf_epo.cli", "plot", str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert str(out / "results.csv") in done.stdout.splitlines() and (out / "goal.png").read_bytes()[:8] == PNG
    assert not (out / "summary.json").exists()  # a study folder, not drawn as a demo folder


def write_events(folder: Path, values: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    for tag, points in values.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_plot_draws_any_openrlhf_tensorboard_folder(tmp_path, capsys):
    """A user's GPU run: --logger.tensorboard_dir holds one folder per launch (a resume adds one)."""
    logs = tmp_path / "gpu-run"
    write_events(logs / "ppo_0101T10:00", {
        "train/env_success": [(1, 0.1), (2, 0.2)], "train/env_trapped": [(1, 0.5), (2, 0.9)],
        "train/probe/action_entropy": [(1, 1.3), (2, 1.1)], "train/entropy_loss": [(1, 2.0), (2, 1.9)],
    })  # fmt: skip
    time.sleep(0.05)
    write_events(logs / "ppo_0101T11:00", {"train/env_success": [(3, 0.4)], "train/env_trapped": [(3, 1.0)]})
    assert main(["plot", str(logs)]) == 0
    written = {Path(line).name for line in capsys.readouterr().out.splitlines()}
    assert written == {"goal.png", "trap.png", "action_entropy.png", "entropy.png"}  # no tail_mass or reward tag
    assert all((logs / name).read_bytes()[:8] == PNG for name in written)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as failed:
        main(["plot", str(empty)])
    assert failed.value.code == 2 and "nothing to plot under" in last_error(capsys)
    # another environment's run (no env_success): its reward and entropy still get their pictures
    write_events(tmp_path / "other-env", {"train/reward": [(1, 0.3), (2, 0.5)], "train/entropy_loss": [(2, 1.0)]})
    assert main(["plot", str(tmp_path / "other-env")]) == 0
    assert {Path(line).name for line in capsys.readouterr().out.splitlines()} == {"reward.png", "entropy.png"}
    write_events(tmp_path / "unknown-tags", {"train/foo": [(1, 0.3)]})
    with pytest.raises(SystemExit):
        main(["plot", str(tmp_path / "unknown-tags")])
    assert "hold none of the tags" in last_error(capsys)


# -- end to end: OpenRLHF's whole loop ----------------------------------------------------------


def study_command(out: Path) -> subprocess.CompletedProcess:
    # --jobs 2: a 2-step run is mostly the host's start-up and shut-down; overlapping the two runs'
    # took the study from about 250 s to about 145 s on 2 cores
    return subprocess.run(
        [sys.executable, "-m", "openrlhf_epo.cli", "study", str(SMOKE), "--out", str(out), "--no_progress", "--jobs", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.e2e
def test_smoke_study_runs_openrlhf_and_a_second_call_retrains_nothing(tmp_path):
    out = tmp_path / "study"
    done = study_command(out)
    assert done.returncode == 0, done.stderr[-4000:]
    for run in ("baseline-s100", "bonus-only-s100"):
        logged = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in logged] == [0, 1]
        # the trap task: every episode either took the coin, opened the door or ran out
        assert all(0 <= row["trap_rate"] <= 1 and 0 <= row["success_rate"] + row["trap_rate"] <= 1 for row in logged)
        assert (out / run / "train.log").read_text().count("-m openrlhf_hooks.train_ppo_ray --cpu") == 1
    assert "--loss_plugin epo" in (out / "bonus-only-s100" / "train.log").read_text()
    assert "--loss_plugin" not in (out / "baseline-s100" / "train.log").read_text()
    assert "| baseline | 1 |" in done.stdout and "| bonus-only - baseline | 1 |" in done.stdout and "too few seeds" in done.stdout
    assert all((out / name).read_bytes()[:8] == PNG for name in ("goal.png", "trap.png", "entropy.png"))
    logs = {run: (out / run / "train.log").read_text() for run in ("baseline-s100", "bonus-only-s100")}

    again = study_command(out)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "2 finished, 0 to train now" in again.stderr
    assert {run: (out / run / "train.log").read_text() for run in logs} == logs  # no host started
    with open(out / "results.csv") as table:
        assert [(r["arm"], r["seed"], r["steps"]) for r in csv.DictReader(table)] == [("baseline", "100", "2"), ("bonus-only", "100", "2")]
    assert "| baseline | 1 |" in again.stdout and "| bonus-only | 1 |" in again.stdout
