"""The demo's pictures, drawn with matplotlib from the numbers `stats.py` computes: `openrlhf-epo plot
RUN_DIR` calls `plot_out` (a demo folder) or `plot_tensorboard` (any OpenRLHF TensorBoard folder),
`openrlhf-epo sweep` calls `sweep`, and a study (`study.py`) draws its arms with `plot_arms`.
"""

from __future__ import annotations

import math
from pathlib import Path

from openrlhf_epo.demo.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from openrlhf_epo.demo.stats import SMOOTHING, interval, load_runs, moving_average, series, step_band, summarise, summary_table, sweep_points, sweep_table

PANELS_PER_ROW = 4
# the pictures of a study or a TensorBoard folder: file, metrics.jsonl field, what it is, y range (None: matplotlib's)
DEMO_DECISION_PICTURES = ("trap.png", "action_entropy.png", "tail_mass.png")  # the demo draws its own entropy and success
ARM_PICTURES = (
    ("goal.png", "success_rate", "goal success rate (the door opened)", (-0.02, 1.02)),
    ("trap.png", "trap_rate", "trap rate (took the coin)", (-0.02, 1.02)),
    ("reward.png", "mean_return", "mean episode reward (the host's train/reward)", None),
    ("action_entropy.png", "action_entropy", "entropy over the actions at a reply's first token (nats)", None),
    ("tail_mass.png", "tail_mass", "probability outside the actions at a reply's first token", None),
    ("entropy.png", "entropy", "policy entropy, the host's token mean (nats)", None),
)


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

    def panels():
        """One panel per variant, at most PANELS_PER_ROW to a row (a sweep has many variants)."""
        columns = min(PANELS_PER_ROW, len(variants))
        rows = math.ceil(len(variants) / columns)
        figure, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), sharey=True, squeeze=False, layout="constrained")
        for axis in grid.flat[len(variants) :]:
            axis.set_visible(False)
        return figure, grid.flat, grid[:, 0]

    def finish(figure, first_column, title: str, ylabel: str, path: Path) -> None:
        figure.suptitle(title, fontsize=10)
        for axis in first_column:
            axis.set_ylabel(ylabel)
        first_column[0].legend(fontsize=8)
        _save(figure, path)
        plt.close(figure)

    figure, axes, first_column = panels()
    for axis, (name, runs) in zip(axes, variants.items()):
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            steps, entropy = series(run["rows"], "entropy")
            axis.plot(steps, entropy, color=color, lw=1.4, label=f"seed {run['seed']}")
            epo_steps, epo_entropy = series(run["rows"], "epo_entropy")
            if epo_steps:
                axis.plot(epo_steps, epo_entropy, color=color, lw=1.0, ls="--")
            band_steps, lower = series(run["rows"], "lower")
            _, upper = series(run["rows"], "upper")
            if band_steps:
                axis.fill_between(band_steps, lower, upper, color=color, alpha=0.15, lw=0)
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("RL step")
        axis.grid(alpha=0.3)
    entropy_png = out / "entropy.png"
    finish(
        figure,
        first_column,
        "policy entropy per RL step, token mean (solid); EPO's L_H (dashed) and its corridor [lower, upper] (shaded)",
        "policy entropy (nats)",
        entropy_png,
    )

    figure, axes, first_column = panels()
    for axis, (name, runs) in zip(axes, variants.items()):
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            steps, success = series(run["rows"], "success_rate")
            axis.plot(steps, success, color=color, lw=0.6, alpha=0.35)
            axis.plot(steps, moving_average(success, SMOOTHING), color=color, lw=1.6, label=f"seed {run['seed']}")
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("RL step")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    success_png = out / "success.png"
    finish(figure, first_column, f"success rate per RL step (faint: per step; bold: {SMOOTHING}-step mean)", "success rate", success_png)

    # the trap and the decision itself (trap.png, action_entropy.png, tail_mass.png), where the runs logged them
    decision = tuple(picture for picture in ARM_PICTURES if picture[0] in DEMO_DECISION_PICTURES)
    more = plot_arms({name: [run["rows"] for run in runs] for name, runs in variants.items()}, out, out.name, decision)

    summary = summarise(variants)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_table(summary))
    return [entropy_png, success_png, *more, out / "summary.json", out / "summary.md"]


def _dodged(lam: float, name: str, rows: list) -> float:
    """Where a variant's points go on the lambda axis: variants that share a lambda (the presets) side
    by side, a few percent of a decade apart, so their intervals do not hide each other."""
    sharing = [other for other_lam, other, _ in rows if other_lam == lam]
    if lam <= 0 or len(sharing) == 1:
        return lam
    return lam * 10 ** (0.06 * (sharing.index(name) - (len(sharing) - 1) / 2))


def sweep(dirs: list[Path], png: Path) -> str:
    """Final success and final entropy against lambda (symlog axis, so the baseline's 0 is on it),
    over every finished run of the demo folders `dirs` (a run stopped part-way is left out: its
    final steps are not the others'); writes `png` and returns a markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sweep_points(dirs)
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, key, label in ((axes[0], "final_success", "final success (last 20% of steps)"),
                             (axes[1], "final_entropy", "final entropy (nats)")):  # fmt: skip
        for lam, name, found in rows:
            stat = interval([d[key] for d in found])
            if stat["mean"] is None:
                continue
            x = _dodged(lam, name, rows)
            axis.errorbar([x], [stat["mean"]], yerr=[stat["ci95"] or 0.0], fmt="o", capsize=4, label=f"{name} (n={stat['n']})")
            axis.scatter([x] * len(found), [d[key] for d in found], s=8, alpha=0.35, color="gray")
        axis.set_xscale("symlog", linthresh=1e-4)
        axis.set_xlabel("lambda (0: baseline)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("mean over seeds with 95% t-intervals; gray: each seed", fontsize=10)
    _save(figure, Path(png))
    plt.close(figure)
    return sweep_table(rows)


def plot_arms(arms: dict[str, list[list[dict]]], out: Path, title: str, pictures: tuple = ARM_PICTURES) -> list[Path]:
    """ARM_PICTURES in `out`: per picture one line per arm, the mean over its runs (seeds) per RL step,
    with a band from the lowest to the highest run. `arms`: arm -> the metrics rows of each run. A
    picture whose field no run logged is not drawn; returns the pictures written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    for file_name, key, label, limits in pictures:
        bands = {arm: step_band(runs, key) for arm, runs in arms.items()}
        if not any(steps for steps, *_ in bands.values()):
            continue
        figure, axis = plt.subplots(figsize=(7, 4), layout="constrained")
        for arm, (steps, mean, low, high) in bands.items():
            if not steps:
                continue
            line = axis.plot(steps, mean, lw=1.6, label=f"{arm} (n={len(arms[arm])})")[0]
            axis.fill_between(steps, low, high, color=line.get_color(), alpha=0.15, lw=0)
        axis.set_xlabel("RL step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(label)
        if limits:
            axis.set_ylim(*limits)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        axis.set_title(f"{title}: mean over seeds per RL step (band: lowest to highest seed)", fontsize=10)
        _save(figure, out / file_name)
        plt.close(figure)
        written.append(out / file_name)
    return written


def plot_tensorboard(folder: Path) -> list[Path]:
    """ARM_PICTURES for the OpenRLHF run whose TensorBoard files lie anywhere under `folder` (a user's
    --logger.tensorboard_dir, or a demo run's tensorboard/), written into `folder`. Every event file
    counts as one run's (a resumed run adds a folder; the later file wins a step), as the demo reads it."""
    from openrlhf_epo.demo.openrlhf_run import TAGS, metric_rows, read_scalars

    folder = Path(folder)
    if not any(folder.rglob("events.out.tfevents.*")):
        raise FileNotFoundError(f"no TensorBoard files (events.out.tfevents.*) under {folder}")
    rows = metric_rows(read_scalars(folder))
    if not rows:
        raise FileNotFoundError(f"the TensorBoard files under {folder} hold none of the tags {', '.join(sorted(TAGS.values()))}")
    return plot_arms({folder.resolve().name: [rows]}, folder, folder.resolve().name)
