"""The `openrlhf-hooks` console script: `list` the installed plugins, or `train-ppo-ray` (the launcher)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .api import PluginError
from .plugins import get_registry


def list_plugins() -> int:
    try:
        registry = get_registry()
    except PluginError as exc:
        print(f"openrlhf-hooks: error: {exc}", file=sys.stderr)
        return 2
    print("loss plugins:")
    for name in sorted(registry.loss_plugins):
        plugin = registry.loss_plugins[name]
        flags = argparse.ArgumentParser(add_help=False)
        plugin.add_arguments(flags.add_argument_group(name))
        options = [a.option_strings[0] for a in flags._actions]
        print(f"  {name} {plugin.version} (from {registry.sources['loss:' + name]}): {' '.join(options)}")
    print("rollout processors:")
    for name in sorted(registry.rollout_processors):
        print(f"  {name} (from {registry.sources['rollout processor:' + name]})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["list"]:
        return list_plugins()
    if argv[:1] == ["train-ppo-ray"]:
        from .train_ppo_ray import main as launch

        return launch(argv[1:])
    print("usage: openrlhf-hooks {list | train-ppo-ray [OpenRLHF and plugin flags]}", file=sys.stderr)
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
