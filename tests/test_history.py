"""EntropyHistory and the per-turn reference (docs/spec.md section 2)."""

import math

import pytest
import torch

from openrlhf_epo.core import EntropyHistory, PerTurnEntropyHistory


def test_window_mean_and_warmup():
    history = EntropyHistory(window_size=3, warmup=2)
    assert history.reference() is None
    history.push(1.0)
    assert history.reference() is None and len(history) == 1  # 1 entry < warmup 2
    history.push(2.0)
    assert history.reference() == pytest.approx(1.5)
    history.push(3.0)
    history.push(10.0)
    assert history.reference() == pytest.approx((2 + 3 + 10) / 3)  # the last 3 only
    assert len(history) == 4


def test_cumulative_mean():
    history = EntropyHistory(window_size=None, warmup=1)
    for value in (1.0, 2.0, 3.0, 10.0):
        history.push(value)
    assert history.reference() == pytest.approx(4.0)


def test_warmup_zero_still_needs_one_entry():
    history = EntropyHistory(window_size=None, warmup=0)
    assert history.reference() is None
    history.push(0.7)
    assert history.reference() == pytest.approx(0.7)


def test_non_finite_is_never_pushed():
    history = EntropyHistory(window_size=None, warmup=1)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="must be finite"):
            history.push(bad)
    assert len(history) == 0


def test_state_round_trip_and_mismatch():
    history = EntropyHistory(window_size=4, warmup=1)
    for value in (0.5, 0.25, 2.0):
        history.push(value)
    restored = EntropyHistory(window_size=4, warmup=1)
    restored.load_state_dict(history.state_dict())
    assert restored.values() == history.values() and restored.reference() == history.reference()
    with pytest.raises(ValueError, match="saved with window_size=4 but this run uses window_size=None"):
        EntropyHistory(window_size=None, warmup=1).load_state_dict(history.state_dict())
    with pytest.raises(ValueError, match="version"):
        restored.load_state_dict({**history.state_dict(), "version": 99})


def _push(history, value, per_turn: dict):
    sums = torch.zeros(history.max_turns, dtype=torch.float64)
    counts = torch.zeros(history.max_turns, dtype=torch.float64)
    for turn, (s, c) in per_turn.items():
        sums[turn - 1], counts[turn - 1] = s, c
    history.push(value, sums, counts)


def test_per_turn_cumulative_means_without_zero_padding():
    history = PerTurnEntropyHistory(window_size=None, warmup=1, max_turns=4)
    assert history.turn_reference() is None
    # step 0: turn 1 has tokens with H summing to 6 over 3 tokens; turn 2 sums 2 over 1 token
    _push(history, 1.5, {1: (6.0, 3.0), 2: (2.0, 1.0)})
    # step 1: only turn 1 occurs (sum 2 over 2 tokens); turn 2 must NOT be averaged with a zero
    _push(history, 1.0, {1: (2.0, 2.0)})
    ref = history.turn_reference()
    # turn 1: (6 + 2) / (3 + 2) = 1.6; turn 2: 2 / 1 = 2.0; turns 3, 4 never seen -> global (1.5+1)/2
    assert ref.tolist() == pytest.approx([1.6, 2.0, 1.25, 1.25])
    mask = torch.tensor([[1, 0, 1, 1, 0, 1, 0, 1, 0, 1]])  # turns 1, 2, 3, 4, 5 (5 -> bucket 4)
    token_ref = history.token_reference(mask)
    assert token_ref[0].tolist() == pytest.approx([1.6, 0, 2.0, 2.0, 0, 1.25, 0, 1.25, 0, 1.25])


def test_per_turn_window_and_round_trip():
    history = PerTurnEntropyHistory(window_size=2, warmup=2, max_turns=2)
    _push(history, 1.0, {1: (1.0, 1.0)})
    assert history.turn_reference() is None  # warm-up: 1 entry < 2
    _push(history, 2.0, {1: (4.0, 2.0), 2: (3.0, 1.0)})
    _push(history, 3.0, {1: (9.0, 3.0)})
    # window of 2 steps: turn 1 = (4 + 9) / (2 + 3); turn 2 = 3 / 1
    assert history.turn_reference().tolist() == pytest.approx([13 / 5, 3.0])
    restored = PerTurnEntropyHistory(window_size=2, warmup=2, max_turns=2)
    restored.load_state_dict(history.state_dict())
    assert torch.equal(restored.turn_reference(), history.turn_reference())
    assert restored.reference() == history.reference() == pytest.approx(2.5)
    with pytest.raises(ValueError, match="kind 'per_turn', expected 'global'"):
        EntropyHistory(window_size=2, warmup=2).load_state_dict(history.state_dict())
