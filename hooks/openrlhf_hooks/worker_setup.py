"""Ray's worker_process_setup_hook for launcher runs: what every Ray worker of the run applies in its
own process before it runs host code. The launcher sets OPENRLHF_HOOKS_CPU_MODE and
OPENRLHF_HOOKS_HOST_FIXES in the workers' environment (runtime_env env_vars) and points the hook here,
so CPU mode and the host fixes can be on together (Ray takes one setup hook)."""

from __future__ import annotations

import os

HOOK = "openrlhf_hooks.worker_setup.run"
ENV_CPU_MODE = "OPENRLHF_HOOKS_CPU_MODE"


def run() -> None:
    if os.environ.get(ENV_CPU_MODE) == "1":
        from . import cpu_mode

        cpu_mode.activate()
    from . import host_fixes

    host_fixes.activate_requested()
