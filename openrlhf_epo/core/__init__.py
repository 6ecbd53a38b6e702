"""Pure-torch EPO math (docs/spec.md). No OpenRLHF, Ray, DeepSpeed or pluggy import here."""

from .aggregation import aggregate, aggregate_parts, aggregation_weights, turn_ids, turn_sums
from .history import MAX_TURNS, EntropyHistory, PerTurnEntropyHistory
from .objective import (
    IndicatorPenaltyWarning,
    StepStatistic,
    corridor,
    corridor_strength,
    epo_loss,
    epo_regularizer,
    net_bonus_above,
    phase_weight,
    squared_penalty,
    step_statistic,
    step_statistic_parts,
)

__all__ = [
    "MAX_TURNS",
    "EntropyHistory",
    "IndicatorPenaltyWarning",
    "PerTurnEntropyHistory",
    "StepStatistic",
    "aggregate",
    "aggregate_parts",
    "aggregation_weights",
    "corridor",
    "corridor_strength",
    "epo_loss",
    "epo_regularizer",
    "net_bonus_above",
    "phase_weight",
    "squared_penalty",
    "step_statistic",
    "step_statistic_parts",
    "turn_ids",
    "turn_sums",
]
