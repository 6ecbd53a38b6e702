"""EPO configuration: the knobs of docs/spec.md, its presets, and their validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

AGGREGATIONS = ("trajectory", "token")
PENALTIES = ("squared", "hinge", "indicator")
REFERENCES = ("global", "per_turn")
DEFAULT_PRESET = "paper-sciworld"  # what the authors published and ran (docs/spec.md section 6)
REGULARIZER_KNOBS = ("lambda_entropy", "alpha", "kappa_left", "kappa_right", "penalty", "aggregation")


class EPOConfigError(ValueError):
    """A bad EPO setting. `field` names the EPOConfig field (the CLI flag is `--epo.<field>`)."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"epo.{field}={value!r} is invalid: {allowed}")


def knob(default: Any, help: str, kind: str, none_word: Optional[str] = None) -> Any:
    """One EPO knob, defined once: its default, its flag help, how a flag's text parses (kind: float,
    int or choice), and the word that means None where None is allowed (none_word)."""
    return dataclasses.field(default=default, metadata={"help": help, "kind": kind, "none_word": none_word})


@dataclass
class EPOConfig:
    """All EPO knobs (docs/spec.md section 6), each with its flag help. The defaults are the
    DEFAULT_PRESET, `paper-sciworld`. `--epo.<field> VALUE` sets one; `validate()` holds the allowed ranges."""

    lambda_entropy: float = knob(0.001, "strength of the entropy term (spec: lambda)", "float")
    alpha: float = knob(0.05, "weight of the smoothing penalty inside the entropy term (0: bonus only)", "float")
    kappa_left: float = knob(0.0, "corridor lower bound = kappa_left * reference, in [0, 1]", "float")
    kappa_right: float = knob(2.0, "corridor upper bound = kappa_right * reference, >= 1", "float")
    gamma: float = knob(3.0, "phase-weight decay: beta_k = 1 + exp(-gamma * k / k_mid)", "float")
    mid_fraction: float = knob(0.5, "k_mid = round(mid_fraction * K), in (0, 1]", "float")
    window_size: Optional[int] = knob(
        None, "reference = mean of the last N step entropies, or 'cumulative' (all of them)", "int", none_word="cumulative"
    )
    warmup: int = knob(1, "no smoothing penalty until the history holds this many steps", "int")
    aggregation: str = knob("trajectory", "entropy aggregation: " + " | ".join(AGGREGATIONS), "choice")
    penalty: str = knob("hinge", "smoothing penalty: " + " | ".join(PENALTIES) + " (indicator adds no gradient)", "choice")
    reference: str = knob("global", "reference entropy: " + " | ".join(REFERENCES), "choice")
    total_steps: Optional[int] = knob(
        None, "K, the run's RL steps (default 'auto': derived from the host's arguments)", "int", none_word="auto"
    )
    max_bad_steps: int = knob(
        5, "stop after this many consecutive RL steps without a finite entropy statistic (each is skipped)", "int"
    )
    check_every: int = knob(
        50, "compare the EPO state across data-parallel ranks every N RL steps; 0: only after a resume", "int"
    )

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_preset(cls, name: str = DEFAULT_PRESET, **overrides: Any) -> "EPOConfig":
        """The preset `name` with some fields overridden one by one; validated."""
        if name not in PRESETS:
            raise EPOConfigError("preset", name, f"allowed presets are {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EPOConfig":
        """Build from a mapping of field names; an unknown key is an error naming it."""
        known = field_names()
        for key in values:
            if key not in known:
                raise EPOConfigError(key, values[key], f"unknown field; known fields are {', '.join(known)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def regularizer_knobs(self) -> dict[str, Any]:
        """The knobs core.epo_regularizer takes, as keywords."""
        return {name: getattr(self, name) for name in REGULARIZER_KNOBS}

    def validate(self) -> None:
        """Raise EPOConfigError naming the first field whose value is out of range or of the wrong type."""
        for name in ("lambda_entropy", "alpha", "gamma"):
            _check_real(name, getattr(self, name), "must be a finite number >= 0", lambda v: v >= 0)
        _check_real("kappa_left", self.kappa_left, "must satisfy 0 <= kappa_left <= 1", lambda v: 0 <= v <= 1)
        _check_real("kappa_right", self.kappa_right, "must be a finite number >= 1", lambda v: v >= 1)
        if not self.kappa_left < self.kappa_right:
            raise EPOConfigError(
                "kappa_left", self.kappa_left, f"must be smaller than kappa_right={self.kappa_right!r}"
            )
        _check_real("mid_fraction", self.mid_fraction, "must satisfy 0 < mid_fraction <= 1", lambda v: 0 < v <= 1)
        if self.window_size is not None:
            _check_int("window_size", self.window_size, "must be an integer >= 1, or None for cumulative", 1)
        _check_int("warmup", self.warmup, "must be an integer >= 0", 0)
        if self.total_steps is not None:
            _check_int("total_steps", self.total_steps, "must be an integer >= 1, or None to derive it", 1)
        _check_int("max_bad_steps", self.max_bad_steps, "must be an integer >= 1", 1)
        _check_int("check_every", self.check_every, "must be an integer >= 0 (0: check only after a resume)", 0)
        _check_choice("aggregation", self.aggregation, AGGREGATIONS)
        _check_choice("penalty", self.penalty, PENALTIES)
        _check_choice("reference", self.reference, REFERENCES)
        if self.reference == "per_turn" and self.penalty == "squared":
            # The squared penalty acts on one batch scalar, which has no turn to take a reference from.
            raise EPOConfigError(
                "reference",
                self.reference,
                "per_turn needs a per-token penalty (hinge or indicator), not penalty=squared",
            )


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(EPOConfig))


def field_help(name: str) -> str:
    return _FIELDS[name].metadata["help"]


def parse_field(name: str, text: str) -> Any:
    """A flag's text to the field's type (validate() checks the range); EPOConfigError when it does not parse."""
    meta = _FIELDS[name].metadata
    none_word = meta["none_word"]
    if none_word and text.lower() in (none_word, "none"):
        return None
    try:
        if meta["kind"] == "float":
            return float(text)
        if meta["kind"] == "int":
            return int(text)
    except ValueError:
        expected = "a number" if meta["kind"] == "float" else "an integer"
        raise EPOConfigError(name, text, f"expected {expected}" + (f" or {none_word!r}" if none_word else "")) from None
    return text


def _check_real(name: str, value: Any, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise EPOConfigError(name, value, allowed)


def _check_int(name: str, value: Any, allowed: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EPOConfigError(name, value, allowed)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise EPOConfigError(name, value, f"allowed values are {', '.join(choices)}")


_FIELDS = {f.name: f for f in dataclasses.fields(EPOConfig)}

_PAPER = dict(
    lambda_entropy=0.001,
    kappa_left=0.0,
    kappa_right=2.0,
    gamma=3.0,
    mid_fraction=0.5,
    window_size=None,
    warmup=1,
    total_steps=None,
)

# docs/spec.md section 6, one dict per column.
PRESETS: dict[str, dict[str, Any]] = {
    "seed": dict(
        lambda_entropy=0.1,
        alpha=0.1,
        kappa_left=0.5,
        kappa_right=1.5,
        gamma=1.0,
        mid_fraction=0.6,
        window_size=20,
        warmup=5,
        aggregation="trajectory",
        penalty="squared",
        reference="global",
        total_steps=None,
    ),
    "paper-sciworld": dict(_PAPER, alpha=0.05, aggregation="trajectory", penalty="hinge", reference="global"),
    "paper-alfworld": dict(_PAPER, alpha=0.1, aggregation="trajectory", penalty="hinge", reference="global"),
    "released-code": dict(_PAPER, alpha=0.05, aggregation="token", penalty="indicator", reference="per_turn"),
    # this project's own: the paper's knobs, the corridor its text recommends, and alpha large enough
    # that the hinge pulls entropy back from above at every step (docs/spec.md section 8)
    "two-sided": dict(_PAPER, alpha=2.0, kappa_left=0.5, kappa_right=1.5, aggregation="trajectory", penalty="hinge", reference="global"),
}
