"""Plots and a summary from the demo's metrics.jsonl files; `openrlhf-epo plot RUN_DIR` calls `plot_out`.

Layout read: RUN_DIR/<run>/run.json (its `name` is the variant, `seed` the seed) and
RUN_DIR/<run>/metrics.jsonl (one object per RL step). A run killed part-way plots what it has.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from openrlhf_epo.io import atomic_write_bytes, atomic_write_json, atomic_write_text

SMOOTHING = 10  # steps in the success-rate moving average
FINAL_FRACTION = 0.2  # "final success" = mean success over the last 20% of steps


def load_runs(out: Path) -> dict[str, list[dict]]:
    """variant -> [{"seed", "dir", "rows"}] for every run folder under `out`, in seed order."""
    variants: dict[str, list[dict]] = {}
    for run_json in sorted(out.glob("*/run.json")):
        spec = json.loads(run_json.read_text())
        metrics = run_json.parent / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
        variants.setdefault(spec["name"], []).append({"seed": spec["seed"], "dir": run_json.parent.name, "rows": rows})
    if not variants:
        raise FileNotFoundError(f"no runs under {out} (expected <run>/run.json and <run>/metrics.jsonl)")
    for runs in variants.values():
        runs.sort(key=lambda run: run["seed"])
    return dict(sorted(variants.items(), key=lambda item: (item[0] != "baseline", item[0])))


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if value is not None:
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def _moving_average(values: list[float], width: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def _summarise(runs: list[dict]) -> dict:
    finals, peaks, entropies, corridor = [], [], [], []
    for run in runs:
        rows = run["rows"]
        if not rows:
            continue
        tail = rows[-max(1, math.ceil(FINAL_FRACTION * len(rows))) :]
        finals.append(statistics.fmean(r["success_rate"] for r in tail))
        peaks.append(max(_moving_average([r["success_rate"] for r in rows], SMOOTHING)))
        tail_entropy = [r["entropy"] for r in tail if r.get("entropy") is not None]
        if tail_entropy:
            entropies.append(statistics.fmean(tail_entropy))
        inside = [r["in_corridor"] for r in rows if r.get("in_corridor") is not None]
        if inside:
            corridor.append(statistics.fmean(inside))

    def mean_std(values: list[float]) -> dict:
        if not values:
            return {"mean": None, "std": None}
        return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}

    return {
        "seeds": [run["seed"] for run in runs],
        "steps": max((len(run["rows"]) for run in runs), default=0),
        "final_success": mean_std(finals),
        "peak_success": mean_std(peaks),
        "final_entropy": mean_std(entropies),
        "in_corridor": mean_std(corridor),
    }


def summary_table(summary: dict) -> str:
    def cell(stat: dict) -> str:
        return "-" if stat["mean"] is None else f"{stat['mean']:.3f} ± {stat['std']:.3f}"

    lines = [
        "| variant | seeds | steps | final success | peak success (MA10) | final entropy | steps in corridor |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, item in summary.items():
        lines.append(
            f"| {name} | {len(item['seeds'])} | {item['steps']} | {cell(item['final_success'])} | "
            f"{cell(item['peak_success'])} | {cell(item['final_entropy'])} | {cell(item['in_corridor'])} |"
        )
    return "\n".join(lines) + "\n"


def _save(figure, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def plot_out(out: Path) -> list[Path]:
    """Writes entropy.png, success.png, summary.json and summary.md at the top of `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    variants = load_runs(out)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    width = 4.2 * len(variants)

    figure, axes = plt.subplots(1, len(variants), figsize=(width, 3.4), sharey=True, squeeze=False)
    for axis, (name, runs) in zip(axes[0], variants.items()):
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            steps, entropy = _series(run["rows"], "entropy")
            axis.plot(steps, entropy, color=color, lw=1.4, label=f"seed {run['seed']}")
            epo_steps, epo_entropy = _series(run["rows"], "epo_entropy")
            if epo_steps:
                axis.plot(epo_steps, epo_entropy, color=color, lw=1.0, ls="--")
            band_steps, lower = _series(run["rows"], "lower")
            _, upper = _series(run["rows"], "upper")
            if band_steps:
                axis.fill_between(band_steps, lower, upper, color=color, alpha=0.15, lw=0)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("RL step")
        axis.grid(alpha=0.3)
    figure.suptitle(
        "policy entropy per RL step, token mean (solid); EPO's L_H (dashed) and its corridor [lower, upper] (shaded)",
        fontsize=10,
    )
    axes[0][0].set_ylabel("policy entropy (nats)")
    axes[0][0].legend(fontsize=8)
    entropy_png = out / "entropy.png"
    _save(figure, entropy_png)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(variants), figsize=(width, 3.4), sharey=True, squeeze=False)
    for axis, (name, runs) in zip(axes[0], variants.items()):
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            steps, success = _series(run["rows"], "success_rate")
            axis.plot(steps, success, color=color, lw=0.6, alpha=0.35)
            axis.plot(steps, _moving_average(success, SMOOTHING), color=color, lw=1.6, label=f"seed {run['seed']}")
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("RL step")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"success rate (faint: per step, bold: {SMOOTHING}-step mean)")
    axes[0][0].legend(fontsize=8)
    success_png = out / "success.png"
    _save(figure, success_png)
    plt.close(figure)

    summary = {name: _summarise(runs) for name, runs in variants.items()}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_table(summary))
    return [entropy_png, success_png, out / "summary.json", out / "summary.md"]
