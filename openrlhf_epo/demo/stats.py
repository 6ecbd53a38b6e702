"""Statistics of the demo's runs: per-run diagnostics, per-variant summaries over seeds with 95%
Student-t intervals, each variant paired with the baseline seed by seed, and the summary and sweep
tables as text. `plots.py` draws them; `openrlhf-epo plot` and `sweep` print and save them.

Layout read: RUN_DIR/<run>/run.json (its `name` is the variant, `seed` the seed) and
RUN_DIR/<run>/metrics.jsonl (one object per RL step). A run killed part-way counts what it has.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

SMOOTHING = 10  # steps in the success-rate moving average
FINAL_FRACTION = 0.2  # "final success" = mean success over the last 20% of steps
START_FRACTION = 0.1  # "start success" = mean success over the first 10% of steps: what learning starts from


def _read_rows(run_dir: Path) -> list[dict]:
    metrics = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []


def load_runs(out: Path) -> dict[str, list[dict]]:
    """variant -> [{"seed", "dir", "rows"}] for every run folder under `out`, in seed order."""
    variants: dict[str, list[dict]] = {}
    for run_json in sorted(out.glob("*/run.json")):
        spec = json.loads(run_json.read_text())
        rows = _read_rows(run_json.parent)
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
            rows = _read_rows(run_json.parent)
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
