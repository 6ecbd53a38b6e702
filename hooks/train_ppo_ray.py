"""python -m openrlhf_hooks.train_ppo_ray: OpenRLHF's train_ppo_ray with loss plugins.

Accepts every flag of `python -m openrlhf.cli.train_ppo_ray` unchanged, plus
  --loss_plugin NAME          a loss plugin found through the `openrlhf_hooks` entry points
  --<NAME>.<knob> VALUE       that plugin's flags (EPO: --epo.preset, --epo.config, --epo.<field>)
  --rollout_processors A,B    rollout post-processors to run on each rank's experiences
  --plugins_dry_run           run all parsing and validation, print one JSON object, exit before Ray

The host's own parser and validation run unchanged (its module is executed as __main__). Two
seams are used, both in this driver process only: the host's `hierarchize` is observed to get the
parsed args, and the host's first call in train(), `ray.is_initialized()`, is where the plugin's
host checks run and the dry run stops, after all host validation and before Ray starts.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import runpy
import sys
from typing import Any, Callable, Optional, Sequence

from .api import PluginConfigError, PluginError
from .plugins import Registry, get_registry
from .trainer import ARGS_KEY

HOST_MODULE = "openrlhf.cli.train_ppo_ray"
PROG = "python -m openrlhf_hooks.train_ppo_ray"


class LauncherError(Exception):
    """A one-line launcher error (bad plugin flag, unknown plugin, ...)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises a one-line LauncherError instead of printing usage and exiting."""

    def error(self, message: str):
        raise LauncherError(message)


def build_parser(registry: Registry) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        add_help=False,
        allow_abbrev=False,
        description="OpenRLHF train_ppo_ray with loss plugins. All other flags go to OpenRLHF unchanged.",
    )
    group = parser.add_argument_group("openrlhf_hooks")
    group.add_argument("--loss_plugin", metavar="NAME", help=f"installed: {', '.join(sorted(registry.loss_plugins)) or 'none'}")
    group.add_argument(
        "--rollout_processors",
        metavar="A,B",
        default="",
        help=f"installed: {', '.join(sorted(registry.rollout_processors)) or 'none'}",
    )
    group.add_argument("--plugins_dry_run", action="store_true", help="validate everything, print JSON, exit 0")
    for name in sorted(registry.loss_plugins):
        plugin = registry.loss_plugins[name]
        plugin.add_arguments(parser.add_argument_group(f"loss plugin {name} {plugin.version} (with --loss_plugin {name})"))
    return parser


def plugin_flags(namespace: argparse.Namespace, name: str) -> dict:
    """The flags spelled --<name>.<knob>, as knob -> value."""
    prefix = f"{name}."
    return {dest[len(prefix) :]: value for dest, value in vars(namespace).items() if dest.startswith(prefix)}


def resolve(argv: Sequence[str], registry: Registry) -> tuple[Optional[dict], bool, list[str]]:
    """Split argv into (plugin settings or None, dry_run, host argv); LauncherError on bad plugin input."""
    namespace, host_argv = build_parser(registry).parse_known_args(list(argv))
    _reject_unknown_plugin_flags(namespace, host_argv, registry)
    settings = None
    name = namespace.loss_plugin
    for other in registry.loss_plugins:
        given = [k for k, v in plugin_flags(namespace, other).items() if v is not None]
        if given and other != name:
            raise LauncherError(f"--{other}.{given[0]} needs --loss_plugin {other}")
    processors = [p.strip() for p in namespace.rollout_processors.split(",") if p.strip()]
    for processor in processors:
        try:
            registry.rollout_processor(processor)
        except PluginError as exc:
            raise LauncherError(f"--rollout_processors: {exc}") from None
    if name:
        try:
            plugin = registry.loss_plugin(name)
        except PluginError as exc:
            raise LauncherError(f"--loss_plugin: {exc}") from None
        try:
            config = plugin.resolve_config(plugin_flags(namespace, name))
        except (PluginError, PluginConfigError) as exc:
            raise LauncherError(str(exc)) from None
        settings = {"loss_plugin": name, "config": config, "rollout_processors": processors}
    elif processors:
        settings = {"loss_plugin": None, "config": {}, "rollout_processors": processors}
    return settings, namespace.plugins_dry_run, host_argv


def _reject_unknown_plugin_flags(namespace: argparse.Namespace, host_argv: Sequence[str], registry: Registry) -> None:
    """A misspelled --<plugin>.<knob> would reach the host's parser as an unknown flag; name it here."""
    for token in host_argv:
        flag = token.split("=", 1)[0]
        for name in registry.loss_plugins:
            if flag.startswith(f"--{name}."):
                known = [f"--{name}.{knob}" for knob in plugin_flags(namespace, name)]
                close = difflib.get_close_matches(flag, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise LauncherError(f"unknown flag {flag}{hint}; loss plugin {name} accepts {', '.join(known)}")


def run_host(host_argv: Sequence[str], on_args_ready: Callable[[Any], None], actor_class: Any = None) -> None:
    """Execute OpenRLHF's train_ppo_ray as __main__ with host_argv; on_args_ready(args) runs after
    all host validation, right before train() starts Ray. actor_class replaces PolicyModelActor."""
    import ray
    import openrlhf.utils.config as host_config
    from openrlhf.trainer.ray import ppo_actor

    captured: dict = {}
    original_hierarchize = host_config.hierarchize
    original_is_initialized = ray.is_initialized
    original_actor = ppo_actor.PolicyModelActor

    def hierarchize(args):
        captured["args"] = original_hierarchize(args)
        return captured["args"]

    def is_initialized():
        ray.is_initialized = original_is_initialized
        if "args" not in captured:
            raise LauncherError(f"{HOST_MODULE} reached train() without hierarchize(); is this OpenRLHF 0.11.2?")
        on_args_ready(captured["args"])
        return original_is_initialized()

    host_config.hierarchize = hierarchize
    ray.is_initialized = is_initialized
    if actor_class is not None:
        ppo_actor.PolicyModelActor = actor_class
    saved_argv = sys.argv
    sys.argv = [HOST_MODULE, *host_argv]
    try:
        runpy.run_module(HOST_MODULE, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved_argv
        host_config.hierarchize = original_hierarchize
        ray.is_initialized = original_is_initialized
        ppo_actor.PolicyModelActor = original_actor


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        registry = get_registry()
        if "-h" in argv or "--help" in argv:
            build_parser(registry).print_help()
            print(f"\nOpenRLHF's own flags ({HOST_MODULE}), accepted unchanged:\n", flush=True)
            run_host(["--help"], lambda args: None)
            return 0
        settings, dry_run, host_argv = resolve(argv, registry)
        plugin = registry.loss_plugin(settings["loss_plugin"]) if settings and settings["loss_plugin"] else None
        real_stdout = sys.stdout

        def on_args_ready(args):
            if settings is not None:
                setattr(args, ARGS_KEY, settings)
            if plugin is not None:
                try:
                    plugin.check_host(args, settings["config"])
                except PluginConfigError as exc:
                    raise LauncherError(str(exc)) from None
            if dry_run:
                report = {
                    "loss_plugin": plugin.name if plugin else None,
                    "config": settings["config"] if settings else {},
                    "rollout_processors": settings["rollout_processors"] if settings else [],
                    "host": plugin.host_summary(args) if plugin else {},
                }
                print(json.dumps(report, sort_keys=True), file=real_stdout, flush=True)
                raise SystemExit(0)

        actor_class = None
        if settings is not None and not dry_run:
            from .ray_actor import PolicyModelActor as actor_class
        # In a dry run stdout carries only the JSON: the host's own prints go to stderr.
        redirect = contextlib.redirect_stdout(sys.stderr) if dry_run else contextlib.nullcontext()
        with redirect:
            run_host(host_argv, on_args_ready, actor_class)
        return 0
    except (LauncherError, PluginError) as exc:
        # one line even when a plugin's own message spans several
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
