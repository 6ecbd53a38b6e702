"""`python -m openrlhf_hooks.testing`: train the fixed batch on 1 rank (gas 1) and on 2 ranks
(gas 2) and compare the gradients (the package docstring says why)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .fixed_batch import ROWS
from .ranks import host_args, host_flags, train_ranks, worker

REFERENCE = {"world": 1, "micro_batch_size": ROWS}  # gas 1
SPLIT = {"world": 2, "micro_batch_size": 2}  # 4 samples per rank: gas 2


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all parameters (0 when both are zero, inf when only a is)."""
    num = math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))
    den = math.sqrt(sum(float((a[k] ** 2).sum()) for k in a))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def _same(values: list) -> bool:
    """Every rank's plain value is the same; NaN equals NaN here (JSON writes floats exactly)."""
    texts = [json.dumps(value, sort_keys=True, default=repr) for value in values]
    return all(text == texts[0] for text in texts[1:])


@dataclass
class NormalisationReport:
    """What check_normalisation found. differences: per optimizer step, the relative difference of
    the split run's gradient from the reference's; gradient_norm: the reference's first gradient norm."""

    differences: list[float]
    gradient_norm: float
    tolerance: float
    metrics_agree: bool
    states_agree: bool
    gas: tuple[int, int]  # (reference, split) as DeepSpeed ran them
    reference_metrics: list[dict] = field(default_factory=list)
    split_metrics: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.gas == (1, 2)
            and self.gradient_norm > 0
            and all(difference <= self.tolerance for difference in self.differences)  # False for NaN
            and self.metrics_agree
            and self.states_agree
        )

    def describe(self) -> str:
        lines = [
            f"gradient, 2 ranks x gas {self.gas[1]} against 1 rank x gas {self.gas[0]}, relative difference per optimizer step: "
            + ", ".join(f"{d:.2e}" for d in self.differences)
            + f" (tolerance {self.tolerance:.0e}; reference gradient norm {self.gradient_norm:.3e})",
            f"metrics identical on every rank: {'yes' if self.metrics_agree else 'NO'}",
            f"state_dict identical on every rank: {'yes' if self.states_agree else 'NO'}",
        ]
        if self.gas != (1, 2):
            lines.append("the flags changed the split (gas must be 1 and 2): leave --train.* batch sizes to the check")
        if self.gradient_norm == 0:
            lines.append("the reference gradient is zero: with --advantages zero the plugin's term must depend on the policy")
        lines.append(f"reference metrics (last step): {self.reference_metrics[-1] if self.reference_metrics else {}}")
        lines.append(f"split metrics (last step, rank 0): {self.split_metrics[-1] if self.split_metrics else {}}")
        lines.append("OK: the plugin's term is normalised like the host's loss" if self.ok else "FAILED")
        return "\n".join(lines)


def check_normalisation(
    argv: Sequence[str],
    *,
    steps: int = 2,
    zero_advantages: bool = True,
    tolerance: float = 1e-5,
    out_dir: Optional[str | Path] = None,
) -> NormalisationReport:
    """Train the same batch as REFERENCE (1 rank, gas 1) and SPLIT (2 ranks, gas 2) with the plugin
    in `argv` (launcher flags: --loss_plugin NAME and its knobs) and compare what the ranks did."""
    with tempfile.TemporaryDirectory(prefix="openrlhf-hooks-check-") as scratch:
        folder = Path(out_dir) if out_dir is not None else Path(scratch)
        common = dict(out_dir=folder, steps=steps, zero_advantages=zero_advantages)
        reference = train_ranks(argv, **REFERENCE, **common)
        split = train_ranks(argv, **SPLIT, **common)
    differences = [relative_difference(a, b) for a, b in zip(reference[0]["grads"], split[0]["grads"])]
    if len(reference[0]["grads"]) != len(split[0]["grads"]):
        differences.append(math.inf)  # a different number of optimizer steps cannot match
    first = reference[0]["grads"][0] if reference[0]["grads"] else {}
    gradient_norm = math.sqrt(sum(float((g**2).sum()) for g in first.values()))
    return NormalisationReport(
        differences=differences or [math.inf],
        gradient_norm=gradient_norm,
        tolerance=tolerance,
        metrics_agree=_same([record["metrics"] for record in split]),
        gas=(reference[0]["gas"], split[0]["gas"]),
        states_agree=_same([record["states"] for record in split]),
        reference_metrics=reference[0]["metrics"],
        split_metrics=split[0]["metrics"],
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--_worker"]:
        out_path, init_file, steps, advantages, *flags = argv[1:]
        worker(out_path, init_file, int(steps), advantages == "zero", flags)
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m openrlhf_hooks.testing",
        description="Check that a loss plugin's term is normalised like OpenRLHF's loss: train one fixed batch on "
        "1 rank (gas 1) and on 2 gloo ranks (gas 2) through the host's real trainer and DeepSpeed, on CPU, and "
        "compare the gradients. Other flags go to the launcher (--loss_plugin NAME --NAME.knob VALUE ...).",
    )
    parser.add_argument("--steps", type=int, default=2, help="RL steps per run (default 2)")
    parser.add_argument(
        "--advantages", choices=("zero", "random"), default="zero",
        help="zero (default): only the plugin's term has a gradient; random: the host's policy loss too",
    )  # fmt: skip
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest relative gradient difference accepted")
    parser.add_argument("--keep", type=Path, help="keep the runs' logs and records in this folder")
    args, flags = parser.parse_known_args(argv)
    if "--loss_plugin" not in flags and not any(flag.startswith("--loss_plugin=") for flag in flags):
        parser.error("give --loss_plugin NAME (and its flags)")
    if args.steps < 1:
        parser.error(f"--steps={args.steps} is invalid: expected an integer >= 1")
    from ..api import PluginConfigError
    from ..host_imports import HostDependencyUnavailable, host_import_placeholders
    from ..train_ppo_ray import LauncherError

    try:  # the host's and the plugin's checks, here before any rank starts (no vLLM or flash-attn needed)
        with host_import_placeholders():
            host_args([*host_flags("tiny-qwen2", SPLIT["world"], SPLIT["micro_batch_size"]), *flags])
    except (LauncherError, PluginConfigError, HostDependencyUnavailable) as exc:
        parser.error(str(exc))
    print(f"[check] training the fixed batch on 1 rank (gas 1), then on 2 ranks (gas 2): {' '.join(flags)}", file=sys.stderr)
    try:
        report = check_normalisation(
            flags, steps=args.steps, zero_advantages=args.advantages == "zero", tolerance=args.tolerance, out_dir=args.keep
        )
    except RuntimeError as exc:
        print(f"[check] {exc}", file=sys.stderr)
        return 1
    print(report.describe())
    return 0 if report.ok else 1
