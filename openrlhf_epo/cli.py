"""`openrlhf-epo`: the CPU demo (baseline versus EPO on a multi-turn agent task) and its plots.

    openrlhf-epo demo [--quick] [--seeds 3] [--presets seed,paper-sciworld] [--epo.<field> V]
    openrlhf-epo plot RUN_DIR
    openrlhf-epo sweep RUN_DIR [RUN_DIR ...] --png lambda.png

This module only parses and dispatches: the demo runner is `openrlhf_epo.demo.runner`, the pictures
`openrlhf_epo.demo.plots`. Every argument is checked before anything starts; a bad one exits 2 with
one line naming it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from openrlhf_epo.demo import runner


def build_parser(plugin_flags: bool = True) -> argparse.ArgumentParser:
    """plugin_flags=False leaves out the epo plugin's --epo.* flags, so the plugin registry is not
    resolved: `plot` and the top-level help must work with no plugin installed or enabled."""
    parser = argparse.ArgumentParser(prog="openrlhf-epo", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,plot,sweep}")

    demo = commands.add_parser(
        "demo",
        help="train a small agent on CPU through OpenRLHF's loop, baseline versus EPO, and plot entropy and success",
        description="Runs OpenRLHF's own PPO loop in CPU mode (python -m openrlhf_hooks.train_ppo_ray --cpu) on "
        "KeyDoor, a multi-turn environment with a sparse final reward, with a tiny model built locally: a "
        "baseline (group-normalised advantages, no entropy term) and the same command with --loss_plugin epo, "
        "for each preset and seed. Environment knobs: --env.rooms N (default 4), --env.max_turns N (default 20).",
    )
    demo.set_defaults(command_parser=demo)
    runner.add_arguments(demo, plugin_flags)

    plot = commands.add_parser("plot", help="redraw the PNGs and summary of a demo folder from its metrics.jsonl")
    plot.set_defaults(command_parser=plot)
    plot.add_argument("run_dir", type=Path, metavar="RUN_DIR")

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
    return runner.run_demo(args, args.command_parser, extra)


if __name__ == "__main__":
    sys.exit(main())
