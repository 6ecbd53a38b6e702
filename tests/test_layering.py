"""Import layering, read from the source: the EPO core imports no host package and no pluggy; the hook
layer (openrlhf_hooks) imports nothing from openrlhf_epo, so any plugin can stand on it alone."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOST_PACKAGES = {"openrlhf", "ray", "deepspeed", "vllm", "flash_attn", "pluggy", "openrlhf_hooks"}


def imported_packages(path: Path, package: str) -> set:
    """Top-level packages a file imports anywhere in it (function-local imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the file's own package
                found.add(package)
            else:
                found.add(node.module.partition(".")[0])
    return found


def files(folder: str):
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", files("openrlhf_epo/core"), ids=lambda p: p.name)
def test_core_imports_no_host_package_and_no_pluggy(path):
    assert not imported_packages(path, "openrlhf_epo") & HOST_PACKAGES


@pytest.mark.parametrize("path", files("hooks"), ids=lambda p: str(p.relative_to(ROOT)))
def test_hook_layer_imports_nothing_from_openrlhf_epo(path):
    assert "openrlhf_epo" not in imported_packages(path, "openrlhf_hooks")


def test_the_checks_see_imports():
    # the reader finds what it must: a core file's torch, the adapter's OpenRLHF and its own package
    assert "torch" in imported_packages(ROOT / "openrlhf_epo/core/objective.py", "openrlhf_epo")
    assert {"openrlhf", "openrlhf_hooks"} <= imported_packages(ROOT / "hooks/openrlhf_hooks/ray_actor.py", "openrlhf_hooks")
    assert "openrlhf_hooks" in imported_packages(ROOT / "openrlhf_epo/plugin.py", "openrlhf_epo")
