"""A child process in which vllm and flash_attn cannot be imported, as on a laptop without them, even
though the test environment has vLLM's CPU build: the path finder stops finding both."""

import sys

HIDE = """
import sys
from importlib.machinery import PathFinder

class _PathFinderWithoutGpuPackages(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in ("vllm", "flash_attn"):
            return None
        return PathFinder.find_spec(name, path, target)

sys.meta_path[:] = [_PathFinderWithoutGpuPackages if f is PathFinder else f for f in sys.meta_path]
"""
RUN_LAUNCHER = "import runpy; runpy.run_module('openrlhf_hooks.train_ppo_ray', run_name='__main__', alter_sys=True)"


def command(*argv, script: str = RUN_LAUNCHER) -> list:
    """`python -m openrlhf_hooks.train_ppo_ray *argv` (or `python -c script *argv`) without vllm and flash_attn."""
    return [sys.executable, "-c", HIDE + script, *argv]
