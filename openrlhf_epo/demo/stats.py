"""Statistics of the demo's runs: per-run diagnostics, per-variant summaries over seeds with 95%
Student-t intervals, each variant paired with the baseline seed by seed, and the summary and sweep
tables as text. `plots.py` draws them; `openrlhf-epo plot` and `sweep` print and save them. For
`openrlhf-epo study`: per-run results, Student's t computed exactly (the incomplete beta function; no
scipy), paired comparisons with Holm-Bonferroni adjusted p-values and the study's tables.

Layout read: RUN_DIR/<run>/run.json (its `name` is the variant, `seed` the seed) and
RUN_DIR/<run>/metrics.jsonl (one object per RL step). A run killed part-way counts what it has.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional

SMOOTHING = 10  # steps in the success-rate moving average
FINAL_FRACTION = 0.2  # "final success" = mean success over the last 20% of steps
START_FRACTION = 0.1  # "start success" = mean success over the first 10% of steps: what learning starts from


def read_rows(run_dir: Path) -> list[dict]:
    metrics = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []


def load_runs(out: Path) -> dict[str, list[dict]]:
    """variant -> [{"seed", "dir", "rows"}] for every run folder under `out`, in seed order."""
    variants: dict[str, list[dict]] = {}
    for run_json in sorted(out.glob("*/run.json")):
        spec = json.loads(run_json.read_text())
        rows = read_rows(run_json.parent)
        variants.setdefault(spec["name"], []).append({"seed": spec["seed"], "dir": run_json.parent.name, "rows": rows})
    if not variants:
        raise FileNotFoundError(f"no runs under {out} (expected <run>/run.json and <run>/metrics.jsonl)")
    for runs in variants.values():
        runs.sort(key=lambda run: run["seed"])
    return dict(sorted(variants.items(), key=lambda item: (item[0] != "baseline", item[0])))


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if value is not None:
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def moving_average(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


# Student's t at 97.5% for 1..30 degrees of freedom (two-sided 95% intervals over few seeds)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip
COLLAPSE_FRACTION = 0.5  # entropy "collapsed" once it falls below this fraction of its start
START_STEPS = 3  # the start = mean entropy over the first steps


def t_quantile(df: int) -> float:
    """t_{0.975, df}: the table up to 30, then a Cornish-Fisher expansion (within 1e-4 there)."""
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def interval(values: list[float]) -> dict:
    """Mean, sample standard deviation and the 95% t-interval half-width over seeds."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    if len(values) == 1:
        return {"mean": values[0], "std": None, "ci95": None, "n": 1}
    std = statistics.stdev(values)
    return {"mean": statistics.fmean(values), "std": std, "ci95": t_quantile(len(values) - 1) * std / math.sqrt(len(values)), "n": len(values)}


def run_diagnostics(rows: list[dict]) -> dict:
    """Per run: start, final and peak success, final entropy, when entropy first fell below half its start
    (collapse_step, None if never), its step-to-step oscillation (mean |H_t - H_t-1|), and, with a
    corridor (else None): the fraction of steps whose L_H lay inside it (what the squared penalty
    bounds) and the mean fraction of action tokens whose entropy did (what the per-token penalties
    bound; the plugin logs it as in_corridor)."""
    tail = rows[-max(1, math.ceil(FINAL_FRACTION * len(rows))) :]
    head = rows[: max(1, math.ceil(START_FRACTION * len(rows)))]
    steps, entropy = series(rows, "entropy")
    start = statistics.fmean(entropy[:START_STEPS]) if entropy else None
    collapse = next((step for step, h in zip(steps, entropy) if h < COLLAPSE_FRACTION * start), None) if entropy else None
    changes = [abs(b - a) for a, b in zip(entropy, entropy[1:])]
    _, tail_entropy = series(tail, "entropy")
    _, inside_tokens = series(rows, "in_corridor")
    bounded = [r for r in rows if None not in (r.get("epo_entropy"), r.get("lower"), r.get("upper"))]
    return {
        "start_success": statistics.fmean(r["success_rate"] for r in head),
        "final_success": statistics.fmean(r["success_rate"] for r in tail),
        "peak_success": max(moving_average([r["success_rate"] for r in rows], SMOOTHING)),
        "final_entropy": statistics.fmean(tail_entropy) if tail_entropy else None,
        "collapse_step": collapse,
        "oscillation": statistics.fmean(changes) if changes else None,
        "steps_in_corridor": statistics.fmean(r["lower"] <= r["epo_entropy"] <= r["upper"] for r in bounded) if bounded else None,
        "tokens_in_corridor": statistics.fmean(inside_tokens) if inside_tokens else None,
    }


def _summarise(runs: list[dict]) -> dict:
    diagnostics = [run_diagnostics(run["rows"]) for run in runs if run["rows"]]
    collapses = [d["collapse_step"] for d in diagnostics]
    return {
        "seeds": [run["seed"] for run in runs if run["rows"]],
        "start_success_per_seed": [d["start_success"] for d in diagnostics],
        "final_success_per_seed": [d["final_success"] for d in diagnostics],
        "steps_per_seed": [len(run["rows"]) for run in runs if run["rows"]],
        "steps": max((len(run["rows"]) for run in runs), default=0),
        **{key: interval([d[key] for d in diagnostics]) for key in ("start_success", "final_success", "peak_success", "final_entropy", "oscillation", "steps_in_corridor", "tokens_in_corridor")},
        "collapsed_runs": sum(step is not None for step in collapses),
        "collapse_steps": collapses,
    }


def summarise(variants: dict[str, list[dict]]) -> dict:
    """Per variant: `_summarise`, plus `vs_baseline`: its final success minus the baseline's, seed by
    seed over the seeds both have run for as many steps (a seed's variants start from the same model
    and layouts, so the pairing removes what the seed decides; a run stopped part-way has other final
    steps), with its t-interval; None for the baseline or without one."""
    summary = {name: _summarise(runs) for name, runs in variants.items()}
    baseline = summary.get("baseline")
    for name, item in summary.items():
        item["vs_baseline"] = None
        if baseline is not None and name != "baseline":
            base = {seed: (steps, final) for seed, steps, final in _per_seed(baseline)}
            item["vs_baseline"] = interval(
                [final - base[seed][1] for seed, steps, final in _per_seed(item) if base.get(seed, (None,))[0] == steps]
            )
    return summary


def _per_seed(item: dict) -> zip:
    return zip(item["seeds"], item["steps_per_seed"], item["final_success_per_seed"])


_NONE = {"mean": None}  # a statistic a summary written by an older version lacks


def summary_table(summary: dict) -> str:
    def cell(stat: dict) -> str:
        if stat["mean"] is None:
            return "-"
        return f"{stat['mean']:.3f}" if stat["ci95"] is None else f"{stat['mean']:.3f} ± {stat['ci95']:.3f}"

    def collapses(item: dict) -> str:
        steps = sorted(step for step in item["collapse_steps"] if step is not None)
        return f"{item['collapsed_runs']}/{len(item['collapse_steps'])}" + (f" (steps {', '.join(map(str, steps))})" if steps else "")

    lines = [
        "Mean over seeds ± the 95% t-interval half-width. Start: the first 10% of steps; final: the last 20%. "
        "Collapse: entropy below half its start (mean of the first 3 steps). Oscillation: mean |entropy change| per step. "
        "Vs baseline: final success minus the baseline's of the same seed, over the seeds both have (n). "
        "Corridor: steps whose L_H lay inside it; tokens whose entropy did (mean over steps).",
        "",
        "| variant | seeds | steps | start success | final success | vs baseline (paired) | success std over seeds | "
        "peak success (MA10) | final entropy | entropy collapsed | oscillation | steps in corridor | tokens in corridor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, item in summary.items():
        std = item["final_success"]["std"]
        gap = item.get("vs_baseline")  # absent from summaries written before the column existed
        gap_cell = "-" if not gap or gap["mean"] is None else f"{cell(gap)} (n={gap['n']})"
        lines.append(
            f"| {name} | {len(item['seeds'])} | {item['steps']} | {cell(item['start_success'])} | {cell(item['final_success'])} | "
            f"{gap_cell} | {'-' if std is None else f'{std:.3f}'} | {cell(item['peak_success'])} | {cell(item['final_entropy'])} | "
            f"{collapses(item)} | {cell(item['oscillation'])} | {cell(item.get('steps_in_corridor', _NONE))} | "
            f"{cell(item.get('tokens_in_corridor', item.get('in_corridor', _NONE)))} |"
        )
    return "\n".join(lines + _per_seed_table(summary)) + "\n"


def _per_seed_table(summary: dict) -> list[str]:
    """Start -> final success of every run, a column per seed (empty for summaries written before it)."""
    if not all("start_success_per_seed" in item for item in summary.values()):
        return []
    seeds = sorted({seed for item in summary.values() for seed in item["seeds"]})
    lines = ["", "Per seed, start -> final success:", "", "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|" + "---|" * len(seeds)]  # fmt: skip
    for name, item in summary.items():
        runs = {seed: f"{start:.2f} -> {final:.2f}" for seed, start, final in
                zip(item["seeds"], item["start_success_per_seed"], item["final_success_per_seed"])}  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(runs.get(seed, "-") for seed in seeds) + " |")
    return lines


def run_lambda(spec: dict) -> float:
    """A run's lambda from its run.json: 0 for the baseline, else its resolved EPO config's."""
    if spec.get("epo_flags") is None:
        return 0.0
    from openrlhf_epo.plugin import resolve_epo_config

    return resolve_epo_config(spec["epo_flags"]).lambda_entropy


def sweep_points(dirs: list[Path]) -> list[tuple[float, str, list[dict]]]:
    """(lambda, variant, the run_diagnostics of its runs) in lambda order, over every finished run of
    the demo folders `dirs` (a run stopped part-way is left out: its final steps are not the others')."""
    points: dict[tuple[str, float], list[dict]] = {}
    for folder in dirs:
        for run_json in sorted(Path(folder).glob("*/run.json")):
            spec = json.loads(run_json.read_text())
            rows = read_rows(run_json.parent)
            if rows and len(rows) >= spec.get("steps", len(rows)):
                points.setdefault((spec["name"], run_lambda(spec)), []).append(run_diagnostics(rows))
    if not points:
        raise FileNotFoundError(f"no finished runs under {', '.join(map(str, dirs))}")
    return sorted(((lam, name, found) for (name, lam), found in points.items()), key=lambda item: (item[0], item[1]))


def sweep_table(points: list[tuple[float, str, list[dict]]]) -> str:
    """The sweep as a markdown table, one row per variant."""

    def cell(stat: dict) -> str:
        return "-" if stat["mean"] is None else f"{stat['mean']:.3f}" + (f" ± {stat['ci95']:.3f}" if stat["ci95"] else "")

    lines = ["| lambda | variant | seeds | final success | final entropy | entropy collapsed |", "|---|---|---|---|---|---|"]
    for lam, name, found in points:
        success, entropy = interval([d["final_success"] for d in found]), interval([d["final_entropy"] for d in found])
        collapsed = sum(d["collapse_step"] is not None for d in found)
        lines.append(f"| {lam:g} | {name} | {len(found)} | {cell(success)} | {cell(entropy)} | {collapsed}/{len(found)} |")
    return "\n".join(lines) + "\n"


# -- the study (`openrlhf-epo study`): per-run results, exact Student t, paired comparisons, Holm --------

TRAP_COLLAPSE_RATE = 0.8  # a run "fell into the trap" from the first step after which its trap rate stays this high
SIGNIFICANCE = 0.05  # the pre-registered level for the Holm-adjusted p-values
RESULT_COLUMNS = (
    "arm", "seed", "steps", "goal_final", "goal_auc", "trap_final", "action_entropy_final", "tail_mass_final",
    "entropy_final", "trap_collapse_step",
)  # fmt: skip
SUMMARY_COLUMNS = ("goal_final", "goal_auc", "trap_final", "action_entropy_final", "tail_mass_final", "entropy_final")
# a results.csv column <- the metrics.jsonl field whose last-20% mean it is
FINAL_COLUMNS = {
    "goal_final": "success_rate",
    "trap_final": "trap_rate",
    "action_entropy_final": "action_entropy",
    "tail_mass_final": "tail_mass",
    "entropy_final": "entropy",
}


def _mean_or_none(values: list[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


def trap_collapse_step(rows: list[dict]) -> Optional[int]:
    """The first step from which the trap rate stays >= TRAP_COLLAPSE_RATE to the run's end; None if
    the last logged trap rate is below it (or the run logged none)."""
    collapse = None
    for step, rate in reversed(list(zip(*series(rows, "trap_rate")))):
        if rate < TRAP_COLLAPSE_RATE:
            break
        collapse = step
    return collapse


def run_results(rows: list[dict]) -> dict:
    """One results.csv row's numbers for a run's metrics rows: the last-20% mean of each FINAL_COLUMNS
    field, the goal's mean over all steps (its AUC per step) and the trap collapse step. A field the
    run never logged (a run without the probe, a task without the trap) gives None."""
    tail = rows[-max(1, math.ceil(FINAL_FRACTION * len(rows))) :]
    results = {column: _mean_or_none(series(tail, field)[1]) for column, field in FINAL_COLUMNS.items()}
    return {**results, "steps": len(rows), "goal_auc": _mean_or_none(series(rows, "success_rate")[1]),
            "trap_collapse_step": trap_collapse_step(rows)}  # fmt: skip


def step_band(runs: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per step over the runs (seeds) that logged `key` there: steps, mean, lowest and highest value."""
    by_step: dict[int, list[float]] = {}
    for rows in runs:
        for step, value in zip(*series(rows, key)):
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return (steps, [statistics.fmean(by_step[s]) for s in steps], [min(by_step[s]) for s in steps],
            [max(by_step[s]) for s in steps])  # fmt: skip


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, by the modified Lentz method; it
    converges fast for x < (a + 1) / (a + b + 2)."""
    floor = 1e-300  # keeps a partial denominator off zero
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > floor else floor)
    fraction = d
    for m in range(1, 10_000):
        # the even step, then the odd step, of the fraction's terms
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)), -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > floor else floor)
            c = 1.0 + numerator / c
            c = c if abs(c) > floor else floor
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            return fraction
    raise ArithmeticError(f"the incomplete beta fraction did not converge for a={a}, b={b}, x={x}")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b  # the symmetry I_x(a, b) = 1 - I_{1-x}(b, a)


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def student_t_cdf(t: float, df: float) -> float:
    tail = student_t_two_sided_p(t, df) / 2.0
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom, to about 1e-12 (bisection on student_t_cdf)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"a quantile needs 0 < p < 1, got {p}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        high *= 2.0
    while high - low > 1e-12 * high:
        middle = (low + high) / 2.0
        if student_t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def paired_difference(treatment: dict[int, float], control: dict[int, float]) -> dict:
    """treatment - control over the seeds both have (each seed's runs share the model and layouts, so
    the pairing removes what the seed decides): the mean difference, its 95% paired-t interval and the
    two-sided p-value of "no difference". Under 2 seeds the interval, t and p are None. All-equal
    differences have no spread: p is 0 for a non-zero difference (1 for zero) and t None."""
    seeds = sorted(set(treatment) & set(control))
    differences = [treatment[seed] - control[seed] for seed in seeds]
    found = {"seeds": seeds, "n": len(seeds), "mean_difference": _mean_or_none(differences), "ci95": None, "t": None, "df": None, "p": None}
    if len(differences) < 2:
        return found
    mean, df = statistics.fmean(differences), len(differences) - 1
    error = statistics.stdev(differences) / math.sqrt(len(differences))
    half = student_t_quantile(0.975, df) * error
    found.update(ci95=[mean - half, mean + half], df=df)
    if error == 0:
        found["p"] = 0.0 if mean != 0 else 1.0
    else:
        found.update(t=mean / error, p=student_t_two_sided_p(mean / error, df))
    return found


def holm(p_values: list[Optional[float]]) -> list[Optional[float]]:
    """Holm-Bonferroni adjusted p-values, in the given order, over the p-values that exist (None stays
    None: a comparison without a test is not one of the m tested): the k-th smallest is multiplied by
    m - k + 1, capped at 1 and kept at least as large as the one before it."""
    ranked = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[Optional[float]] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - rank) * p))
        adjusted[i] = running
    return adjusted


def compare(per_arm: dict[str, dict[int, float]], pairs: list[tuple[str, str]], min_effect: float) -> list[dict]:
    """The pre-registered decision rule for each (treatment, control) pair over `per_arm` (arm -> seed ->
    final goal success): paired_difference, the Holm-adjusted p over all pairs, and the verdict: "pass"
    when the mean difference >= min_effect, Holm p < SIGNIFICANCE and the 95% interval excludes 0;
    "too few seeds" under 2 paired seeds; else "fail"."""
    found = [{"treatment": a, "control": b, **paired_difference(per_arm.get(a, {}), per_arm.get(b, {}))} for a, b in pairs]
    for item, adjusted in zip(found, holm([item["p"] for item in found])):
        item["p_holm"] = adjusted
        if item["ci95"] is None:
            item["verdict"] = "too few seeds"
            continue
        low, high = item["ci95"]
        passes = item["mean_difference"] >= min_effect and adjusted < SIGNIFICANCE and (low > 0 or high < 0)
        item["verdict"] = "pass" if passes else "fail"
    return found


def study_summary(results: list[dict], arms: list[str], pairs: list[tuple[str, str]], min_effect: float) -> dict:
    """study.json: per arm (in `arms` order) the mean and 95% interval over seeds of every results
    column, and the trapped runs; the comparisons of `compare` on the final goal success."""
    summary: dict = {"arms": {}, "min_effect": min_effect, "significance": SIGNIFICANCE, "metric": "goal_final"}
    for arm in arms:
        rows = [row for row in results if row["arm"] == arm]
        collapses = [row["trap_collapse_step"] for row in rows]
        summary["arms"][arm] = {
            "seeds": [row["seed"] for row in rows],
            **{column: interval([row[column] for row in rows]) for column in SUMMARY_COLUMNS},
            # the pre-registered definition (docs/evidence/trap-study.md): trap rate >= 0.8 over the last 20% of steps
            "trapped_runs": sum(row["trap_final"] is not None and row["trap_final"] >= TRAP_COLLAPSE_RATE for row in rows),
            "trap_collapse_steps": collapses,
        }
    per_arm = {arm: {row["seed"]: row["goal_final"] for row in results if row["arm"] == arm} for arm in arms}
    summary["comparisons"] = compare(per_arm, pairs, min_effect)
    return summary


def study_table(summary: dict, name: str) -> str:
    """study.json as markdown: the arms, then the comparisons."""

    def cell(stat: dict) -> str:
        if stat["mean"] is None:
            return "-"
        return f"{stat['mean']:.3f}" if stat["ci95"] is None else f"{stat['mean']:.3f} ± {stat['ci95']:.3f}"

    def number(value: Optional[float], form: str) -> str:
        return "-" if value is None else format(value, form)

    lines = [
        f"Study {name}. Mean over seeds ± the 95% t-interval half-width; final: the last {FINAL_FRACTION:.0%} of steps; "
        f"goal AUC: the goal success over all steps; trapped: runs whose trap rate over the last 20% of steps is >= {TRAP_COLLAPSE_RATE}.",
        "",
        "| arm | runs | goal final | goal AUC | trap final | action entropy | tail mass | token entropy | trapped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, item in summary["arms"].items():
        lines.append(
            f"| {arm} | {len(item['seeds'])} | {cell(item['goal_final'])} | {cell(item['goal_auc'])} | {cell(item['trap_final'])} | "
            f"{cell(item['action_entropy_final'])} | {cell(item['tail_mass_final'])} | {cell(item['entropy_final'])} | "
            f"{item['trapped_runs']}/{len(item['seeds'])} |"
        )
    if summary["comparisons"]:
        lines += [
            "",
            f"Comparisons: final goal success, treatment - control paired by seed; pass: difference >= {summary['min_effect']:g}, "
            f"Holm-adjusted p < {summary['significance']:g} and the 95% interval excludes 0.",
            "",
            "| comparison | seeds | difference | 95% interval | p | p (Holm) | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for item in summary["comparisons"]:
            ci = "-" if item["ci95"] is None else f"[{item['ci95'][0]:+.3f}, {item['ci95'][1]:+.3f}]"
            lines.append(
                f"| {item['treatment']} - {item['control']} | {item['n']} | {number(item['mean_difference'], '+.3f')} | {ci} | "
                f"{number(item['p'], '.4f')} | {number(item['p_holm'], '.4f')} | {item['verdict']} |"
            )
    return "\n".join(lines) + "\n"
