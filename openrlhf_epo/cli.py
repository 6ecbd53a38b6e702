"""`openrlhf-epo`: the CPU demo (baseline versus EPO on a multi-turn agent task), studies and plots.

    openrlhf-epo demo [--quick] [--seeds 3] [--presets seed,paper-sciworld] [--epo.<field> V]
    openrlhf-epo study CONFIG.yaml [--out DIR] [--jobs N] [--only ARM,ARM] [--seeds_only S,S] [--dry_run]
    openrlhf-epo plot DIR
    openrlhf-epo sweep RUN_DIR [RUN_DIR ...] --png lambda.png

This module only parses and dispatches: the demo runner is `openrlhf_epo.demo.runner`, studies
`openrlhf_epo.demo.study`, the pictures `openrlhf_epo.demo.plots`. Every argument is checked before
anything starts; a bad one exits 2 with one line naming it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from openrlhf_epo.demo import runner, study


def build_parser(plugin_flags: bool = True) -> argparse.ArgumentParser:
    """plugin_flags=False leaves out the epo plugin's --epo.* flags, so the plugin registry is not
    resolved: `plot` and the top-level help must work with no plugin installed or enabled."""
    parser = argparse.ArgumentParser(prog="openrlhf-epo", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,study,plot,sweep}")

    demo = commands.add_parser(
        "demo",
        help="train a small agent on CPU through OpenRLHF's loop, baseline versus EPO, and plot entropy and success",
        description="Runs OpenRLHF's own PPO loop in CPU mode (python -m openrlhf_hooks.train_ppo_ray --cpu) on "
        "a multi-turn task with a sparse final reward, with a model built locally: a baseline (group-normalised "
        "advantages, no entropy term) and the same command with --loss_plugin epo, for each variant and seed. "
        "The default task is the trap (a coin worth 0.25 in the start room ends the episode, the door across 6 rooms "
        "pays 1) with an 8192-token model; --task keydoor is the plain key-and-door game. Environment knobs: "
        "--env.rooms N, --env.max_turns N, --env.coin R (each task's defaults in docs/demo.md).",
    )
    demo.set_defaults(command_parser=demo)
    runner.add_arguments(demo, plugin_flags)

    study_parser = commands.add_parser(
        "study",
        help="train the arms x seeds of a study config through OpenRLHF's loop and compare them (resumable)",
        description="Trains every arm (the host alone, or EPO with the arm's knobs) for every seed of CONFIG.yaml "
        "(configs/study/), one run as the demo's, in OUT/<arm>-s<seed>. Finished runs are skipped and runs cut short "
        "resume from their checkpoint, so the same command continues a study; a run whose run.json differs from the "
        "config is refused. Writes results.csv, study.json, study.md and the pictures after every run.",
    )
    study_parser.set_defaults(command_parser=study_parser)
    study.add_arguments(study_parser)

    plot = commands.add_parser(
        "plot",
        help="redraw the pictures and tables of a demo folder, a study folder, or any OpenRLHF TensorBoard folder",
    )
    plot.set_defaults(command_parser=plot)
    plot.add_argument(
        "run_dir",
        type=Path,
        metavar="DIR",
        help="a demo folder (<run>/metrics.jsonl), a study folder (study-plan.json) or a folder with TensorBoard "
        "files (events.out.tfevents.*, searched recursively, read as one run)",
    )

    sweep = commands.add_parser(
        "sweep", help="final success and entropy against lambda over demo folders (the baseline is lambda 0)"
    )
    sweep.set_defaults(command_parser=sweep)
    sweep.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    sweep.add_argument("--png", type=Path, default=Path("lambda.png"), help="picture to write (default lambda.png)")
    return parser


def _command(argv: Sequence[str]) -> Optional[str]:
    """The subcommand: the first token that is not an option (the top-level parser has only -h)."""
    return next((token for token in argv if not token.startswith("-")), None)


def _plot(folder: Path) -> list:
    """Whichever folder it is: a study (its plan), a demo (run folders), else TensorBoard files."""
    from openrlhf_epo.demo import plots

    if (folder / study.PLAN_FILE).exists():
        return study.write_results(study.Study.load(folder))
    if any(folder.glob("*/run.json")):
        return plots.plot_out(folder)
    if any(folder.rglob("events.out.tfevents.*")):
        return plots.plot_tensorboard(folder)
    raise FileNotFoundError(
        f"nothing to plot under {folder}: expected a study (study-plan.json), demo runs (<run>/run.json) or "
        "TensorBoard files (events.out.tfevents.*)"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Only `demo` takes the plugin's flags; any other command must not need the plugin registry.
    parser = build_parser(plugin_flags=_command(argv) == "demo")
    args, extra = parser.parse_known_args(argv)
    if args.command == "sweep":
        if extra:
            args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from openrlhf_epo.demo.plots import sweep

        from openrlhf_hooks.api import PluginConfigError

        try:
            print(sweep(args.run_dirs, args.png), end="")
        except (FileNotFoundError, PluginConfigError) as exc:  # no runs, or a run's EPO flags no longer resolve
            args.command_parser.error(str(exc))
        return 0
    if args.command in ("plot", "study") and extra:
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "plot":
        try:
            written = _plot(args.run_dir)
        except FileNotFoundError as exc:
            args.command_parser.error(str(exc))
        print("\n".join(str(path) for path in written))
        return 0
    if args.command == "study":
        return study.run_study(args, args.command_parser)
    return runner.run_demo(args, args.command_parser, extra)


if __name__ == "__main__":
    sys.exit(main())
