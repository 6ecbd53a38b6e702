"""The single plugin manager: entry-point discovery, registries, and loud errors.

Plugins are modules listed under the entry-point group `openrlhf_hooks`; EPO registers itself there
exactly like a third-party package. `OPENRLHF_HOOKS_PLUGINS` restricts what loads: unset = all,
empty = none, else a comma list of entry-point names (each must exist). `OPENRLHF_HOOKS_TRACE=1` prints
every hook call (pluggy's hook-call monitoring) to stderr.

The driver's selection must also be the workers' (a worker on another node has its own
environment): `worker_env` gives the settings to hand every Ray worker, which the launcher adds to
the runtime_env of the host's `ray.init`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Mapping, Optional

import pluggy

from . import hookspecs
from .api import LossPlugin, PluginError, RolloutProcessor

ENTRY_POINT_GROUP = "openrlhf_hooks"
ENV_PLUGINS = "OPENRLHF_HOOKS_PLUGINS"
ENV_TRACE = "OPENRLHF_HOOKS_TRACE"


@dataclass
class Registry:
    """Everything the loaded plugin modules registered, by name."""

    manager: pluggy.PluginManager
    loss_plugins: dict[str, LossPlugin] = field(default_factory=dict)
    rollout_processors: dict[str, RolloutProcessor] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # "loss:<name>" -> entry point that gave it
    selected: tuple[str, ...] = ()  # the entry point names loaded, in load order

    def loss_plugin(self, name: str) -> LossPlugin:
        if name not in self.loss_plugins:
            installed = ", ".join(sorted(self.loss_plugins)) or "none"
            raise PluginError(f"unknown loss plugin {name!r}; installed loss plugins: {installed}")
        return self.loss_plugins[name]

    def rollout_processor(self, name: str) -> RolloutProcessor:
        if name not in self.rollout_processors:
            installed = ", ".join(sorted(self.rollout_processors)) or "none"
            raise PluginError(f"unknown rollout processor {name!r}; installed rollout processors: {installed}")
        return self.rollout_processors[name]


def _selected_entry_points() -> list[metadata.EntryPoint]:
    found = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    by_name: dict[str, metadata.EntryPoint] = {}
    for ep in found:
        other = by_name.get(ep.name)
        if other is not None and other.value != ep.value:
            raise PluginError(
                f"two installed plugins claim the entry point name {ep.name!r}: {other.value!r} and {ep.value!r}; "
                "uninstall one of them"
            )
        by_name[ep.name] = ep
    wanted = os.environ.get(ENV_PLUGINS)
    if wanted is None:
        return [by_name[name] for name in sorted(by_name)]
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    missing = [n for n in names if n not in by_name]
    if missing:
        raise PluginError(
            f"{ENV_PLUGINS} names {', '.join(map(repr, missing))}, which no installed package provides "
            f"under the {ENTRY_POINT_GROUP!r} entry points (installed: {', '.join(sorted(by_name)) or 'none'})"
        )
    return [by_name[n] for n in names]


def load_plugins() -> Registry:
    """Load the selected entry points, register them, check hook names, and collect registrations."""
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    selected = _selected_entry_points()
    for ep in selected:
        try:
            module = ep.load()
        except Exception as exc:
            raise PluginError(
                f"plugin {ep.name!r} (entry point {ep.name} = {ep.value}) failed to import: "
                f"{type(exc).__name__}: {' '.join(str(exc).split())}; fix or uninstall it, or name only the "
                f"plugins to load in {ENV_PLUGINS}"
            ) from exc
        try:
            manager.register(module, name=ep.name)
        except ValueError as exc:
            raise PluginError(f"plugin {ep.name!r} (entry point {ep.value}) could not be registered: {exc}") from exc
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements a hook that does not exist (misspelled?): {exc}") from exc

    registry = Registry(manager, selected=tuple(ep.name for ep in selected))

    def registrar(kind: str, table: dict, base: type, plugin_name: str):
        def register(obj) -> None:
            if not isinstance(obj, base):
                raise PluginError(f"plugin {plugin_name!r} registered {obj!r}, which is not a {base.__name__}")
            if not obj.name:
                raise PluginError(f"plugin {plugin_name!r} registered a {base.__name__} without a name")
            key = f"{kind}:{obj.name}"
            if obj.name in table:
                raise PluginError(
                    f"two plugins claim the {kind} name {obj.name!r}: {registry.sources[key]!r} and {plugin_name!r}; "
                    f"uninstall one of them or leave it out of {ENV_PLUGINS}"
                )
            table[obj.name] = obj
            registry.sources[key] = plugin_name

        return register

    if os.environ.get(ENV_TRACE):
        manager.add_hookcall_monitoring(*_trace_printers())
    # Through pluggy's caller, one plugin at a time, so that a registration can be traced to its plugin.
    plugins = manager.list_name_plugin()
    for source, _ in plugins:
        others = [plugin for name, plugin in plugins if name != source]
        for hook, args in (
            ("register_loss_plugins", ("loss", registry.loss_plugins, LossPlugin, source)),
            ("register_rollout_processors", ("rollout processor", registry.rollout_processors, RolloutProcessor, source)),
        ):
            caller = manager.subset_hook_caller(hook, remove_plugins=others)
            if caller.get_hookimpls():
                caller(register=registrar(*args))
    return registry


def _trace_printers():
    """OPENRLHF_HOOKS_TRACE=1: one stderr line per hook call and per implementation's return, in every
    process that loads plugins (the driver and, through worker_env, every Ray worker)."""

    def line(text: str) -> None:
        print(f"openrlhf_hooks trace [pid {os.getpid()}]: {text}", file=sys.stderr, flush=True)

    def before(hook_name, hook_impls, kwargs):
        line(f"{hook_name}({', '.join(sorted(kwargs))}) -> {', '.join(impl.plugin_name for impl in hook_impls) or 'no plugin'}")

    def after(outcome, hook_name, hook_impls, kwargs):
        failed = outcome.exception
        line(f"{hook_name} done" + (f": {type(failed).__name__}: {failed}" if failed else ""))

    return before, after


def worker_env(registry: Registry, environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment every Ray worker needs to load what this process loaded.

    OPENRLHF_HOOKS_PLUGINS is set to the entry points this registry loaded (so a worker loads
    exactly them, whatever its node's environment says, and fails naming one it lacks); every other
    OPENRLHF_HOOKS_* variable (OPENRLHF_HOOKS_KERNEL, OPENRLHF_HOOKS_STATE_LOG, ...), and each loaded
    loss plugin's own OPENRLHF_<NAME>_* variables, are passed on as this process has them.
    """
    environ = os.environ if environ is None else environ
    prefixes = ("OPENRLHF_HOOKS_", *(f"OPENRLHF_{name.upper()}_" for name in registry.loss_plugins))
    env = {key: value for key, value in environ.items() if key.startswith(prefixes)}
    env[ENV_PLUGINS] = ",".join(registry.selected)
    return env


_cached: Optional[Registry] = None


def get_registry() -> Registry:
    """The process-wide registry, loaded once per process (driver and every Ray worker)."""
    global _cached
    if _cached is None:
        _cached = load_plugins()
    return _cached
