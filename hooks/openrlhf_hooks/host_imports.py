"""OpenRLHF's import-only dependencies: what its train_ppo_ray module imports at load but never
calls while it parses and validates flags (vLLM, flash-attn).

Two users: the launcher's `--help` and `--plugins_dry_run` run on a laptop or login node without
them (host_import_placeholders), and CPU mode stands in for flash-attn, which the host imports at
load but only uses for packing, which CPU mode refuses (cpu_mode.activate). A placeholder raises
HostDependencyUnavailable, naming the package and what installs it, the moment anything uses it.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import re
import sys
import types
from typing import Iterator, Optional, Sequence

GPU_EXTRA = "pip install 'openrlhf-hooks[gpu]' installs OpenRLHF 0.11.2 with vllm and flash-attn"

# What OpenRLHF 0.11.2's train_ppo_ray imports at load but never calls while it parses and
# validates flags: package -> (where the host imports it, how to install it).
HOST_IMPORT_ONLY = {
    "vllm": (
        "openrlhf/trainer/ray/vllm_engine.py:7,11,12 (via trainer/ray/__init__.py:2, cli/train_ppo_ray.py:8)",
        "pip install 'openrlhf[vllm]==0.11.2'",
    ),
    "flash_attn": (
        "openrlhf/models/ring_attn_utils.py:3-4 (via models/actor.py:11, utils/deepspeed/deepspeed.py:25)",
        "pip install flash-attn==2.8.3 (an OpenRLHF 0.11.2 requirement; it builds against CUDA)",
    ),
}


def missing_dependency_message(package: str) -> str:
    """One line naming the missing package and what installs it."""
    how = HOST_IMPORT_ONLY[package][1] if package in HOST_IMPORT_ONLY else "install OpenRLHF 0.11.2's requirements"
    return f"OpenRLHF needs the package {package!r}, which is not installed here: {how}; or {GPU_EXTRA}"


def missing_package(exc: ImportError) -> str:
    """The top-level package an ImportError is about (a Ray worker's error may only say it in its text)."""
    name = getattr(exc, "name", None)
    if not name:
        found = re.search(r"No module named '([^']+)'", str(exc))
        name = found.group(1) if found else "?"
    return name.partition(".")[0]


class HostDependencyUnavailable(ModuleNotFoundError):
    """A placeholder was used: the package is needed after all. An ImportError, so host code that
    falls back when a package is missing still does."""


class _Placeholder:
    """Stands for one name imported from a missing package; any use raises HostDependencyUnavailable."""

    def __init__(self, qualname: str, package: str):
        self._qualname, self._package = qualname, package

    def _unavailable(self, *args, **kwargs):
        raise HostDependencyUnavailable(
            f"{self._qualname} was used, but {missing_dependency_message(self._package)} "
            "(only --help and --plugins_dry_run run without it)"
        )

    __call__ = __getitem__ = __iter__ = __mro_entries__ = _unavailable

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        self._unavailable()


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):  # introspection (__version__, __file__, ...) sees a plain module
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}", self.__name__.partition(".")[0])


class PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, packages: Sequence[str]):
        self.packages = set(packages)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.packages:
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _PlaceholderModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []


def importable(package: str) -> bool:
    if package in sys.modules:
        return True
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def install_placeholders(packages: Sequence[str]) -> Optional[PlaceholderFinder]:
    """Placeholders for those of `packages` that are not installed, for the rest of this process;
    returns the finder (to remove from sys.meta_path), or None when nothing is missing."""
    missing = [package for package in packages if not importable(package)]
    if not missing:
        return None
    finder = PlaceholderFinder(missing)
    sys.meta_path.insert(0, finder)
    return finder


@contextlib.contextmanager
def host_import_placeholders() -> Iterator[list]:
    """For --help and --plugins_dry_run: placeholders for the HOST_IMPORT_ONLY packages that are not
    installed, for the duration of the block only. Afterwards the placeholders, and the OpenRLHF
    modules first imported inside the block (which hold placeholder names), leave sys.modules, so a
    later import in this process meets the real ImportError again. Yields the placeholder packages."""
    missing = [package for package in HOST_IMPORT_ONLY if not importable(package)]
    if not missing:
        yield missing
        return
    before = set(sys.modules)
    finder = PlaceholderFinder(missing)
    sys.meta_path.insert(0, finder)
    try:
        yield missing
    finally:
        sys.meta_path.remove(finder)
        purged = [
            name
            for name in sys.modules
            if name not in before and name.partition(".")[0] in {*missing, "openrlhf"}
        ]
        for name in purged:
            module = sys.modules.pop(name)
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and getattr(sys.modules[parent], child, None) is module:
                delattr(sys.modules[parent], child)
