"""EPOConfig: the presets of docs/spec.md section 6, their YAML twins, and validation."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from openrlhf_epo import PRESETS, EPOConfig, EPOConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# docs/spec.md section 6, copied column by column (the test's own copy, not the code's).
SPEC_TABLE = {
    "seed": (0.1, 0.1, 0.5, 1.5, 20, 5, "trajectory", "squared", "global", 1.0, 0.6),
    "paper-sciworld": (0.001, 0.05, 0.0, 2.0, None, 1, "trajectory", "hinge", "global", 3.0, 0.5),
    "paper-alfworld": (0.001, 0.1, 0.0, 2.0, None, 1, "trajectory", "hinge", "global", 3.0, 0.5),
    "released-code": (0.001, 0.05, 0.0, 2.0, None, 1, "token", "indicator", "per_turn", 3.0, 0.5),
    "two-sided": (0.001, 2.0, 0.5, 1.5, None, 1, "trajectory", "hinge", "global", 3.0, 0.5),
}
COLUMNS = (
    "lambda_entropy",
    "alpha",
    "kappa_left",
    "kappa_right",
    "window_size",
    "warmup",
    "aggregation",
    "penalty",
    "reference",
    "gamma",
    "mid_fraction",
)


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_preset_equals_spec_table(name):
    config = EPOConfig.from_preset(name)
    assert tuple(getattr(config, c) for c in COLUMNS) == SPEC_TABLE[name]
    assert config.total_steps is None


def test_presets_are_exactly_the_spec_columns():
    assert set(PRESETS) == set(SPEC_TABLE)


def test_default_is_paper_sciworld():
    assert EPOConfig() == EPOConfig.from_preset("paper-sciworld") == EPOConfig.from_preset()


def test_fields_are_the_public_api():
    assert [f.name for f in dataclasses.fields(EPOConfig)] == [
        "lambda_entropy",
        "alpha",
        "kappa_left",
        "kappa_right",
        "gamma",
        "mid_fraction",
        "window_size",
        "warmup",
        "aggregation",
        "penalty",
        "reference",
        "total_steps",
        "max_bad_steps",
        "check_every",
    ]


@pytest.mark.parametrize("name", sorted(SPEC_TABLE))
def test_yaml_file_agrees_with_code(name):
    data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert data.pop("preset") == name
    assert EPOConfig.from_dict(data) == EPOConfig.from_preset(name)
    assert set(data) == {f.name for f in dataclasses.fields(EPOConfig)}


def test_every_yaml_file_is_a_preset():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(PRESETS)


def test_overrides_one_by_one():
    config = EPOConfig.from_preset("paper-sciworld", alpha=0.2, window_size=7)
    assert (config.alpha, config.window_size, config.lambda_entropy) == (0.2, 7, 0.001)


BAD = [
    ("lambda_entropy", -0.1, ">= 0"),
    ("lambda_entropy", float("nan"), "finite"),
    ("lambda_entropy", "0.1", "number"),
    ("alpha", -1.0, ">= 0"),
    ("alpha", True, "number"),
    ("gamma", -3.0, ">= 0"),
    ("kappa_left", -0.5, "0 <= kappa_left <= 1"),
    ("kappa_left", 1.2, "0 <= kappa_left <= 1"),
    ("kappa_right", 0.9, ">= 1"),
    ("kappa_right", float("inf"), "finite"),
    ("mid_fraction", 0.0, "0 < mid_fraction <= 1"),
    ("mid_fraction", 1.5, "0 < mid_fraction <= 1"),
    ("window_size", 0, ">= 1"),
    ("window_size", 2.5, "integer"),
    ("warmup", -1, ">= 0"),
    ("warmup", 1.0, "integer"),
    ("total_steps", 0, ">= 1"),
    ("aggregation", "sequence", "trajectory, token"),
    ("penalty", "l1", "squared, hinge, indicator"),
    ("reference", "local", "global, per_turn"),
    ("max_bad_steps", 0, ">= 1"),
    ("max_bad_steps", 2.0, "integer"),
    ("check_every", -1, ">= 0"),
]


@pytest.mark.parametrize("field,value,allowed", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_validation_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(EPOConfigError) as err:
        EPOConfig.from_preset("seed", **{field: value})
    assert err.value.field == field
    message = str(err.value)
    assert f"epo.{field}=" in message and repr(value) in message and allowed in message
    assert isinstance(err.value, ValueError) and "\n" not in message


def test_kappa_left_must_be_below_kappa_right():
    with pytest.raises(EPOConfigError, match=r"epo\.kappa_left=1\.0 .*smaller than kappa_right=1\.0"):
        EPOConfig(kappa_left=1.0, kappa_right=1.0)


def test_per_turn_reference_needs_a_per_token_penalty():
    with pytest.raises(EPOConfigError, match="per_turn needs a per-token penalty"):
        EPOConfig(reference="per_turn", penalty="squared")


def test_validate_catches_a_mutated_config():
    config = EPOConfig()
    config.window_size = 0
    with pytest.raises(EPOConfigError, match="window_size"):
        config.validate()


def test_unknown_preset_and_unknown_field():
    with pytest.raises(EPOConfigError, match="allowed presets are seed, paper-sciworld"):
        EPOConfig.from_preset("paper")
    with pytest.raises(EPOConfigError, match="epo.lamda=.*unknown field"):
        EPOConfig.from_preset("seed", lamda=0.1)
