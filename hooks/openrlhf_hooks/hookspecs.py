"""The hooks a plugin package implements. Each receives a `register` callback; the host owns
validation and duplicate detection (see openrlhf_hooks.plugins)."""

import pluggy

hookspec = pluggy.HookspecMarker("openrlhf_hooks")
hookimpl = pluggy.HookimplMarker("openrlhf_hooks")


@hookspec
def register_loss_plugins(register):
    """Call register(plugin) for each LossPlugin (openrlhf_hooks.api) this package provides."""


@hookspec
def register_rollout_processors(register):
    """Call register(processor) for each RolloutProcessor (openrlhf_hooks.api) this package provides."""
