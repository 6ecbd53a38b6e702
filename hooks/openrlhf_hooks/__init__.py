"""openrlhf_hooks: pluggy hooks for OpenRLHF 0.11.2 loss plugins and rollout post-processors.

A plugin package lists a module under the `openrlhf_hooks` entry-point group; that module
implements `register_loss_plugins(register)` and/or `register_rollout_processors(register)` with
the `hookimpl` marker. The guide is docs/plugins.md.
"""

from .api import (
    LossPlugin,
    PluginConfigError,
    PluginError,
    RankContext,
    RankLoss,
    RankStateMismatchError,
    RolloutProcessor,
)
from .hookspecs import hookimpl
from .plugins import ENTRY_POINT_GROUP, get_registry, load_plugins

__all__ = [
    "ENTRY_POINT_GROUP",
    "LossPlugin",
    "PluginConfigError",
    "PluginError",
    "RankContext",
    "RankLoss",
    "RankStateMismatchError",
    "RolloutProcessor",
    "get_registry",
    "hookimpl",
    "load_plugins",
]
