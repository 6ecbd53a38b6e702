"""python -m openrlhf_hooks.train_ppo_ray: OpenRLHF's train_ppo_ray with loss plugins.

Accepts every flag of `python -m openrlhf.cli.train_ppo_ray` unchanged, plus
  --loss_plugin NAME          a loss plugin found through the `openrlhf_hooks` entry points
  --<NAME>.<knob> VALUE       that plugin's flags (EPO: --epo.preset, --epo.config, --epo.<field>)
  --rollout_processors A,B    rollout post-processors to run on each rank's experiences
  --plugins_dry_run           run all parsing and validation, print one JSON object, exit before Ray
  --cpu                       CPU mode: OpenRLHF's loop on a machine without CUDA (hooks/openrlhf_hooks/cpu_mode.py)
  --host_fixes A,B            opt-in fixes of OpenRLHF bugs (hooks/openrlhf_hooks/host_fixes.py)
  --probe_words A,B           log the policy's entropy over these words at each reply's first token
                              and the mass outside them (hooks/openrlhf_hooks/probe.py)

The host's own parser and validation run unchanged (its module is executed as __main__). Two
seams are used, both in this driver process only: the host's `hierarchize` is observed to get the
parsed args, and the host's first call in train(), `ray.is_initialized()`, is where the plugin's
host checks run and the dry run stops, after all host validation and before Ray starts.

With a loss plugin, the driver also counts K, the RL steps that will train the actor
(hooks/openrlhf_hooks/steps.py), and puts it into the settings every rank receives (settings["rl_steps"]). The
host's `ray.init` gets the hook layer's environment (plugins.worker_env) in its runtime_env, so
every worker, on every node, loads the plugins the driver loaded.

`--help` and `--plugins_dry_run` work without vLLM and flash-attn (a CPU laptop or login node):
OpenRLHF's module imports them at load, so for those two only, and only while they run, the
missing ones are import-time placeholders (host_imports.py). A real run without them stops
with one line naming the package to install.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import json
import os
import runpy
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

from . import cpu_mode, host_fixes, probe, worker_setup
from .api import PluginConfigError, PluginError
from .host_imports import HostDependencyUnavailable, host_import_placeholders, missing_dependency_message, missing_package
from .plugins import Registry, get_registry, worker_env
from .steps import RLStepsError, derive_rl_steps
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
    group.add_argument(
        "--cpu",
        action="store_true",
        help="CPU mode: run OpenRLHF's loop without CUDA (smoke runs, CI); adds "
        + ", ".join(f"{f} {v}" if v else f for f, v in cpu_mode.FLAG_DEFAULTS)
        + " when not given (module openrlhf_hooks.cpu_mode; docs/how-it-works.md, CPU mode)",
    )
    group.add_argument(
        "--host_fixes",
        metavar="A,B",
        default="",
        help=f"opt-in fixes of OpenRLHF 0.11.2 bugs, off by default: {', '.join(sorted(host_fixes.FIXES))} "
        "(module openrlhf_hooks.host_fixes says what each changes)",
    )
    group.add_argument(
        "--probe_words",
        metavar="A,B",
        default="",
        help="the actions, e.g. left,right,take,open: log train/probe/action_entropy (entropy over these words "
        "at each reply's first token, renormalised) and train/probe/tail_mass (probability outside them) "
        "every RL step (module openrlhf_hooks.probe)",
    )
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
    words = None
    if namespace.probe_words:
        try:
            words = probe.parse_words(namespace.probe_words)
        except probe.ProbeError as exc:
            raise LauncherError(str(exc)) from None
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
    elif processors or words:
        settings = {"loss_plugin": None, "config": {}, "rollout_processors": processors}
    if words:
        settings[probe.SETTINGS_KEY] = {"words": words}  # token ids once the host's args name the model
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


def run_host(
    host_argv: Sequence[str],
    on_args_ready: Callable[[Any], None],
    actor_class: Any = None,
    worker_env: Optional[Mapping[str, str]] = None,
    ray_init_options: Optional[Callable[[Any, bool], dict]] = None,
) -> None:
    """Execute OpenRLHF's train_ppo_ray as __main__ with host_argv; on_args_ready(args) runs after
    all host validation, right before train() starts Ray. actor_class replaces PolicyModelActor.
    worker_env: environment variables added to the runtime_env of the host's own ray.init.
    ray_init_options(args, connecting): more keyword arguments for that ray.init (a runtime_env in
    them is merged); connecting is True when it will join a running cluster (RAY_ADDRESS)."""
    import ray
    import openrlhf.utils.config as host_config
    from openrlhf.trainer.ray import ppo_actor

    captured: dict = {}
    original_hierarchize = host_config.hierarchize
    original_is_initialized = ray.is_initialized
    original_init = ray.init
    original_actor = ppo_actor.PolicyModelActor

    def hierarchize(args):
        captured["args"] = original_hierarchize(args)
        return captured["args"]

    def is_initialized():
        ray.is_initialized = original_is_initialized
        if "args" not in captured:
            raise LauncherError(f"{HOST_MODULE} reached train() without hierarchize(); is this OpenRLHF 0.11.2?")
        on_args_ready(captured["args"])
        running = original_is_initialized()
        if running and worker_env:
            # train() skips its ray.init: the workers keep whatever environment that Ray gave them
            names = ", ".join(f"{k}={v}" for k, v in sorted(worker_env.items()))
            _warn(f"Ray was already initialized in this process, so its workers do not get {names} from here; "
                  "start Ray with these in runtime_env env_vars")  # fmt: skip
        return running

    def init(*args, **kwargs):
        # the host passes runtime_env={"env_vars": {3 of its own}} (cli/train_ppo_ray.py:23-31)
        extra = dict(ray_init_options(captured["args"], bool(args or kwargs.get("address") or os.environ.get("RAY_ADDRESS")))
                     if ray_init_options else {})  # fmt: skip
        runtime_env = {**(kwargs.get("runtime_env") or {}), **extra.pop("runtime_env", {})}
        runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **(worker_env or {})}
        kwargs.update(extra, runtime_env=runtime_env)
        return original_init(*args, **kwargs)

    host_config.hierarchize = hierarchize
    ray.is_initialized = is_initialized
    if worker_env or ray_init_options:
        ray.init = init
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
        ray.init = original_init
        ppo_actor.PolicyModelActor = original_actor


def _ray_init_with_worker_setup(cpu: bool, args: Any, connecting: bool) -> dict:
    """What the host's ray.init gets with --cpu or --host_fixes: every worker runs worker_setup.run;
    CPU mode adds a local node's resources."""
    extra = cpu_mode.ray_init_kwargs(args, connecting) if cpu else {}
    return {**extra, "runtime_env": {"worker_process_setup_hook": worker_setup.HOOK}}


def _probe_token_ids(args: Any, words: list[str]) -> list[list[int]]:
    """--probe_words as token ids of the actor's tokenizer (loaded as the host loads it: offline from
    a local folder, from the hub's cache otherwise)."""
    from transformers import AutoTokenizer

    model = args.actor.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise LauncherError(f"--probe_words: cannot load the tokenizer of --actor.model_name_or_path {model}: {exc}") from None
    try:
        return probe.resolve_word_tokens(words, tokenizer, model)
    except probe.ProbeError as exc:
        raise LauncherError(str(exc)) from None


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def rl_steps_settings(args: Any, plugin: Any, config: dict) -> dict:
    """settings["rl_steps"] (K, or None) and settings["rl_steps_note"] (how K was derived, or why not)."""
    knob = plugin.total_steps_knob
    flag = f"--{plugin.name}.{knob}"
    if knob and config.get(knob) is not None:
        return {"rl_steps": None, "rl_steps_note": f"not counted: {flag}={config[knob]} sets the run's RL steps"}
    try:
        derived = derive_rl_steps(args)
    except RLStepsError as exc:
        raise LauncherError(str(exc)) from None
    if derived.steps is None:
        _warn(f"{derived.note}; " + (f"set {flag} to the number of RL steps" if knob else
                                     f"loss plugin {plugin.name} gets RankContext.total_steps=None"))  # fmt: skip
    elif not derived.exact:
        _warn(f"{derived.note}; " + (f"set {flag} to fix it" if knob else
                                     f"loss plugin {plugin.name} gets this bound as RankContext.total_steps"))  # fmt: skip
    return {"rl_steps": derived.steps, "rl_steps_note": derived.note}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        registry = get_registry()
        if "-h" in argv or "--help" in argv:
            build_parser(registry).print_help()
            print(f"\nOpenRLHF's own flags ({HOST_MODULE}), accepted unchanged:\n", flush=True)
            with host_import_placeholders():
                run_host(["--help"], lambda args: None)
            return 0
        settings, dry_run, host_argv = resolve(argv, registry)
        try:
            fixes = host_fixes.parse(build_parser(registry).parse_known_args(argv)[0].host_fixes)
        except host_fixes.HostFixError as exc:
            raise LauncherError(str(exc)) from None
        cpu = "--cpu" in argv
        if cpu:
            host_argv, added = cpu_mode.with_flag_defaults(host_argv)
            if added:
                print(f"{PROG}: --cpu adds {', '.join(added)}", file=sys.stderr, flush=True)
        plugin = registry.loss_plugin(settings["loss_plugin"]) if settings and settings["loss_plugin"] else None
        real_stdout = sys.stdout

        validated = []  # set once the host's own flag checks have all passed

        def on_args_ready(args):
            validated.append(True)
            if cpu:
                try:
                    cpu_mode.check_args(args)
                except cpu_mode.CPUModeError as exc:
                    raise LauncherError(str(exc)) from None
            if settings is not None:
                setattr(args, ARGS_KEY, settings)
            if settings and settings.get(probe.SETTINGS_KEY):
                settings[probe.SETTINGS_KEY]["token_ids"] = _probe_token_ids(args, settings[probe.SETTINGS_KEY]["words"])
            if plugin is not None:
                try:
                    plugin.check_host(args, settings["config"])
                except PluginConfigError as exc:
                    raise LauncherError(str(exc)) from None
                settings.update(rl_steps_settings(args, plugin, settings["config"]))
                for line in plugin.start_up_warnings(settings["config"], settings["rl_steps"]):
                    _warn(f"loss plugin {plugin.name}: {line}")
            if dry_run:
                report = {
                    "loss_plugin": plugin.name if plugin else None,
                    "config": settings["config"] if settings else {},
                    "rollout_processors": settings["rollout_processors"] if settings else [],
                    "host": plugin.host_summary(args) if plugin else {},
                    "plugins": list(registry.selected),
                    "host_fixes": fixes,
                    "probe": (settings or {}).get(probe.SETTINGS_KEY),
                }
                if plugin is not None:
                    report.update(rl_steps=settings["rl_steps"], rl_steps_note=settings["rl_steps_note"])
                    extra = plugin.report(settings["config"], settings["rl_steps"])
                    clash = sorted(set(extra) & set(report))
                    if clash:
                        raise LauncherError(f"loss plugin {plugin.name}'s report() reuses the dry run's keys {clash}")
                    report.update(extra)
                print(json.dumps(report, sort_keys=True), file=real_stdout, flush=True)
                raise SystemExit(0)

        # In a dry run stdout carries only the JSON: the host's own prints go to stderr.
        redirect = contextlib.redirect_stdout(sys.stderr) if dry_run else contextlib.nullcontext()
        placeholders = host_import_placeholders() if dry_run else contextlib.nullcontext()
        env = worker_env(registry) if settings is not None else {}
        ray_init_options = None
        if (cpu or fixes) and not dry_run:
            # in this process now; in every Ray worker through worker_setup.run, told what to apply by env
            if cpu:
                cpu_mode.activate()
                env.update({name: os.environ[name] for name in cpu_mode.ENV_DEFAULTS}, **{worker_setup.ENV_CPU_MODE: "1"})
            if fixes:
                host_fixes.activate(fixes)
                env[host_fixes.ENV] = ",".join(fixes)
            ray_init_options = functools.partial(_ray_init_with_worker_setup, cpu)
        with redirect, placeholders:
            actor_class = None
            if settings is not None and not dry_run:
                from .ray_actor import PolicyModelActor as actor_class
            try:
                run_host(host_argv, on_args_ready, actor_class, env or None, ray_init_options)
            except AssertionError as exc:
                if validated:  # a failure while running: the host's own traceback
                    raise
                # the host checks many flag combinations with bare asserts (cli/train_ppo_ray.py:640-760)
                raise LauncherError(f"OpenRLHF rejected the flags: {exc}") from None
        return 0
    except ImportError as exc:
        if isinstance(exc, HostDependencyUnavailable):
            message = str(exc)
        else:
            message = missing_dependency_message(missing_package(exc))
        print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except (LauncherError, PluginError) as exc:
        # one line even when a plugin's own message spans several
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
