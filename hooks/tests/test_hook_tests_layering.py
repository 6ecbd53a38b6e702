"""The hook layer's tests stand on the hook layer alone: no file here, and no helper of tests/support
that one of them imports, imports openrlhf_epo (read from the source, function-local imports included).
That they need no EPO plugin either is shown by running `pytest hooks/tests` alone, which loads no
plugin (conftest.py)."""

import ast
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SUPPORT = HERE.parents[1] / "tests" / "support"


def imported(path: Path) -> set:
    """Dotted names a file imports anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module)
    return names


def with_support_helpers(path: Path) -> list:
    """The file and every tests/support module it imports, directly or through another helper."""
    seen, todo = [], [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.append(current)
        todo += [SUPPORT / f"{name}.py" for name in imported(current) if (SUPPORT / f"{name}.py").is_file()]
    return seen


@pytest.mark.parametrize("path", sorted(HERE.glob("*.py")), ids=lambda p: p.name)
def test_imports_nothing_from_openrlhf_epo(path):
    offending = {str(f.relative_to(HERE.parents[1])): sorted(n for n in imported(f) if n.partition(".")[0] == "openrlhf_epo")
                 for f in with_support_helpers(path)}  # fmt: skip
    assert not {f: names for f, names in offending.items() if names}, offending


def test_the_check_sees_imports_and_follows_helpers():
    this = Path(__file__)
    assert "ast" in imported(this) and "pytest" in imported(this)
    cpu_mode_tests = with_support_helpers(HERE / "test_cpu_mode.py")
    assert SUPPORT / "host_args.py" in cpu_mode_tests and SUPPORT / "stand_ins.py" in cpu_mode_tests  # through host_args
