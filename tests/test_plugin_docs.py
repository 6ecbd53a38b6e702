"""docs/plugins.md against the code (in the style of datasette's documentation tests): every hook and
every public member of the plugin API is in the guide with its exact signature, and every hook is
exercised by a test."""

import dataclasses
import inspect
from pathlib import Path

import pytest

from openrlhf_hooks import api, hookspecs

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "docs" / "plugins.md").read_text()
CLASSES = [api.LossPlugin, api.RankLoss, api.RolloutProcessor]
HOOKS = [name for name, value in vars(hookspecs).items() if callable(value) and hasattr(value, "openrlhf_hooks_spec")]


def written(function) -> str:
    """A signature as the guide writes it: annotations as in the source, no quotes."""
    signature = inspect.signature(function)
    parts, keyword_only = [], False
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.KEYWORD_ONLY and not keyword_only:
            parts.append("*")
            keyword_only = True
        text = parameter.name
        if parameter.annotation is not parameter.empty:
            text += f": {parameter.annotation}"
        if parameter.default is not parameter.empty:
            text += f" = {parameter.default!r}"
        parts.append(text)
    returns = "" if signature.return_annotation is signature.empty else f" -> {signature.return_annotation}"
    return f"{function.__name__}({', '.join(parts)}){returns}"


def public_methods(cls):
    return [value for name, value in vars(cls).items() if inspect.isfunction(value) and not name.startswith("_")]


def test_hooks_are_found():
    assert HOOKS == ["register_loss_plugins", "register_rollout_processors"]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature(hook):
    assert f"`{written(getattr(hookspecs, hook))}`" in GUIDE


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    users = [p.name for p in (ROOT / "tests").rglob("*.py") if p.name != Path(__file__).name and hook in p.read_text()]
    assert users, f"no test calls or implements {hook}"


@pytest.mark.parametrize("method", [m for cls in CLASSES for m in public_methods(cls)], ids=lambda m: m.__qualname__)
def test_every_public_method_is_documented_with_its_signature(method):
    assert f"`{written(method)}`" in GUIDE, written(method)


CLASS_ATTRIBUTES = sorted(
    {name for cls in CLASSES for name, value in vars(cls).items() if not name.startswith("_") and not callable(value)}
)


def test_class_attributes_are_found():
    assert {"name", "version", "needs_entropy", "check_every", "total_steps_knob"} <= set(CLASS_ATTRIBUTES)


@pytest.mark.parametrize("name", CLASS_ATTRIBUTES)
def test_class_attributes_are_documented(name):
    assert f"| `{name}` |" in GUIDE


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(api.RankContext)])
def test_every_rank_context_field_is_documented(field):
    assert f"| `{field}` |" in GUIDE


def test_the_signature_writer_reads_what_it_must():
    assert written(api.RankLoss.begin_step) == "begin_step(self) -> None"
    assert "*, action_mask: torch.Tensor" in written(api.RankLoss.policy_loss)
