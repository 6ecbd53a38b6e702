"""Import layering, read from the source: the EPO core imports no host package and no pluggy; the hook
layer (openrlhf_hooks) imports nothing from openrlhf_epo, so any plugin can stand on it alone; the
runtime never imports the testing helpers; and no modules of either package import each other in a
circle (docs/architecture.md draws the direction)."""

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


@pytest.mark.parametrize("path", files("hooks/openrlhf_hooks"), ids=lambda p: str(p.relative_to(ROOT)))
def test_hook_layer_imports_nothing_from_openrlhf_epo(path):
    assert "openrlhf_epo" not in imported_packages(path, "openrlhf_hooks")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str, known: set) -> set:
    """The modules of `known` that a file imports (relative imports resolved, `from pkg import mod` as pkg.mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in known)
    # a package's own __init__ is run before any of its modules anyway: not an edge of a circle
    return {target for target in found if not (name + ".").startswith(target + ".")}


def import_graph() -> dict:
    sources = {module_name(p, ROOT / "hooks"): p for p in files("hooks/openrlhf_hooks")}
    sources.update({module_name(p, ROOT): p for p in files("openrlhf_epo")})
    return {name: imported_modules(path, name, set(sources)) for name, path in sources.items()}


def circles(graph: dict) -> list:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_the_circle_check_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    # and reads relative imports: the launcher imports CPU mode
    assert "openrlhf_hooks.cpu_mode" in import_graph()["openrlhf_hooks.train_ppo_ray"]


def test_the_runtime_never_imports_the_testing_helpers():
    graph = import_graph()
    runtime = [name for name in graph if name.startswith("openrlhf_hooks") and not name.startswith("openrlhf_hooks.testing")]
    runtime += ["openrlhf_epo.plugin", "openrlhf_epo.rank", "openrlhf_epo.config"]
    runtime += [name for name in graph if name.startswith("openrlhf_epo.core")]
    assert {name: sorted(m for m in graph[name] if m.startswith("openrlhf_hooks.testing")) for name in runtime} == {
        name: [] for name in runtime
    }


def test_the_checks_see_imports():
    # the reader finds what it must: a core file's torch, the adapter's OpenRLHF and its own package
    assert "torch" in imported_packages(ROOT / "openrlhf_epo/core/objective.py", "openrlhf_epo")
    assert {"openrlhf", "openrlhf_hooks"} <= imported_packages(ROOT / "hooks/openrlhf_hooks/ray_actor.py", "openrlhf_hooks")
    assert "openrlhf_hooks" in imported_packages(ROOT / "openrlhf_epo/plugin.py", "openrlhf_epo")
