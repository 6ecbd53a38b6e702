"""Corridor, penalties, phase weight and L_EPO (docs/spec.md sections 3-5), derived by hand."""

import math
import warnings

import pytest
import torch

from float64_reference import ref_token_entropy
from openrlhf_epo import EPOConfig
from openrlhf_epo.core import (
    IndicatorPenaltyWarning,
    aggregate,
    epo_loss,
    epo_regularizer,
    phase_weight,
    step_statistic,
    step_statistic_parts,
)
from openrlhf_epo.core import objective as objective_module


def test_phase_weight_by_hand():
    # seed: K = 10, mid_fraction 0.6 -> k_mid = 6; gamma 1: beta_0 = 2, beta_6 = 1 + e^-1
    assert phase_weight(0, 10, 1.0, 0.6) == 2.0
    assert phase_weight(6, 10, 1.0, 0.6) == pytest.approx(1 + math.exp(-1))
    # paper: K = 100, k_mid = 50, gamma 3: beta_50 = 1 + e^-3; late steps relax toward 1
    assert phase_weight(50, 100, 3.0, 0.5) == pytest.approx(1 + math.exp(-3))
    assert 1.0 < phase_weight(99, 100, 3.0, 0.5) < phase_weight(10, 100, 3.0, 0.5) < 2.0
    # k_mid = max(1, round(0.5 * 1)) = max(1, 0) = 1 (Python rounds half to even)
    assert phase_weight(1, 1, 2.0, 0.5) == pytest.approx(1 + math.exp(-2))
    with pytest.raises(ValueError, match="total_steps=0 is invalid"):
        phase_weight(0, 0, 1.0, 0.5)


def _config(**overrides):
    return EPOConfig.from_preset("seed", **overrides)


ENTROPY = torch.tensor([[1.0, 3.0, 0.0, 5.0], [2.0, 4.0, 6.0, 0.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0]])
# trajectory L_H: trajectory 0 -> (2 + 5) / 2 = 3.5, trajectory 1 -> 4, L_H = 3.75


def test_no_reference_is_bonus_only():
    # L = L_policy - lambda * L_H = 0.5 - 0.1 * 3.75
    loss, metrics = epo_loss(torch.tensor(0.5, dtype=torch.float64), ENTROPY, MASK, None, 0, 10, _config())
    assert loss.item() == pytest.approx(0.5 - 0.375)
    assert metrics["entropy"] == pytest.approx(3.75) and metrics["penalty"] == 0.0
    assert math.isnan(metrics["reference"]) and math.isnan(metrics["in_corridor"])
    assert metrics["beta"] == 2.0 and metrics["loss"] == pytest.approx(0.125)


def test_squared_penalty_by_hand_above_and_below():
    # ref 2, kappa 0.5/1.5 -> corridor [1, 3]; L_H = 3.75 > 3 -> P = 0.75^2 = 0.5625
    # step 0 of K = 10: beta = 2; L = 0 - 0.1 * (3.75 - 2 * 0.1 * 0.5625) = -0.36375
    loss, metrics = epo_loss(torch.tensor(0.0, dtype=torch.float64), ENTROPY, MASK, 2.0, 0, 10, _config())
    assert metrics["penalty"] == pytest.approx(0.5625)
    assert loss.item() == pytest.approx(-0.36375)
    assert (metrics["lower"], metrics["upper"], metrics["reference"]) == (1.0, 3.0, 2.0)
    # tokens in [1, 3]: 1, 3, 2 of the six action tokens {1, 3, 5, 2, 4, 6}
    assert metrics["in_corridor"] == pytest.approx(3 / 6)
    # ref 10 -> corridor [5, 15]; L_H = 3.75 < 5 -> P = 1.25^2
    _, metrics = epo_loss(torch.tensor(0.0), ENTROPY, MASK, 10.0, 0, 10, _config())
    assert metrics["penalty"] == pytest.approx(1.5625)


def test_hinge_penalty_by_hand():
    # ref 2, kappa 0.5/1.5 -> [1, 3]. Per token p: 1->0, 3->0, 5->2 | 2->0, 4->1, 6->3
    # trajectory aggregation: traj 0 turns (0+0)/2=0 and 2 -> 1; traj 1 -> (0+1+3)/3 = 4/3; P = 7/6
    config = _config(penalty="hinge")
    _, metrics = epo_loss(torch.tensor(0.0), ENTROPY, MASK, 2.0, 3, 10, config)
    assert metrics["penalty"] == pytest.approx(7 / 6)
    # token aggregation: (0+0+2+0+1+3) / 6 = 1
    _, metrics = epo_loss(torch.tensor(0.0), ENTROPY, MASK, 2.0, 3, 10, _config(penalty="hinge", aggregation="token"))
    assert metrics["penalty"] == pytest.approx(1.0)


def test_indicator_penalty_value_zero_gradient_and_warns_once(monkeypatch):
    monkeypatch.setattr(objective_module, "_indicator_warned", False)
    config = _config(penalty="indicator", aggregation="token")
    h = ENTROPY.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        term, stats = epo_regularizer(h, MASK, 2.0, 2.0, **config.regularizer_knobs())
        epo_regularizer(h, MASK, 2.0, 2.0, **config.regularizer_knobs())
    assert sum(issubclass(w.category, IndicatorPenaltyWarning) for w in caught) == 1
    # outside the open corridor (1, 3): 1, 3, 5, 4, 6 -> P = 5/6
    assert stats["penalty"].item() == pytest.approx(5 / 6)
    # the penalty's gradient is zero: the full gradient equals the bonus-only gradient
    (with_penalty,) = torch.autograd.grad(term, h)
    bonus_only, _ = epo_regularizer(h, MASK, None, 2.0, **config.regularizer_knobs())
    (without,) = torch.autograd.grad(bonus_only, h)
    assert torch.equal(with_penalty, without)


def test_sign_one_gradient_step_raises_entropy():
    """Spec section 5: with L_policy = 0 and no penalty, descending L_EPO raises entropy."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 1, 0]])
    for preset in ("seed", "paper-sciworld", "released-code"):
        config = EPOConfig.from_preset(preset)
        before = aggregate(ref_token_entropy(logits), mask, config.aggregation)
        loss, _ = epo_loss(torch.tensor(0.0), ref_token_entropy(logits), mask, None, 0, 10, config)
        (grad,) = torch.autograd.grad(loss, logits)
        stepped = (logits - 1.0 * grad).detach()
        after = aggregate(ref_token_entropy(stepped), mask, config.aggregation)
        assert after > before, preset


@pytest.mark.parametrize("penalty", ["squared", "hinge"])
def test_pull_back(penalty):
    """Above the corridor the penalty's gradient lowers entropy; below it, it raises entropy."""
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 13, dtype=torch.float64) * 2.0
    mask = torch.ones(3, 5, dtype=torch.long)
    config = _config(penalty=penalty, lambda_entropy=1.0, alpha=1.0)
    current = aggregate(ref_token_entropy(logits), mask, config.aggregation).item()
    for reference, direction in ((current / 3.0, -1), (current * 3.0, +1)):
        x = logits.clone().requires_grad_(True)
        h = ref_token_entropy(x)
        with_penalty, _ = epo_regularizer(h, mask, reference, 2.0, **config.regularizer_knobs())
        bonus_only, _ = epo_regularizer(h, mask, None, 2.0, **config.regularizer_knobs())
        # the penalty's own part of the objective: lambda * beta * alpha * P
        (grad,) = torch.autograd.grad(with_penalty - bonus_only, x)
        stepped = (x - 0.5 * grad).detach()
        moved = aggregate(ref_token_entropy(stepped), mask, config.aggregation).item() - current
        assert moved * direction > 0, (reference, moved)


@pytest.mark.parametrize("penalty", ["squared", "hinge"])
@pytest.mark.parametrize("aggregation", ["trajectory", "token"])
def test_gradcheck_each_penalty(penalty, aggregation):
    torch.manual_seed(2)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
    # Keep entropies away from the corridor edges, where the penalties have a kink.
    h = torch.tensor(
        [[0.3, 2.9, 1.0, 1.7, 0.45], [1.0, 2.5, 0.2, 3.4, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    config = _config(penalty=penalty, aggregation=aggregation)
    for reference in (0.8, 1.6, 4.0):
        assert torch.autograd.gradcheck(lambda t: epo_regularizer(t, mask, reference, 1.7, **config.regularizer_knobs())[0], (h,))


def test_per_token_reference_hinge_by_hand():
    # Per-token references: corridor of a token = [0.5 r, 1.5 r]; token mode.
    h = torch.tensor([[1.0, 4.0]], dtype=torch.float64)
    ref = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    config = _config(penalty="hinge", aggregation="token")
    # token 1 in [0.5, 1.5] -> 0; token 2 above [1, 3] by 1 -> P = (0 + 1) / 2
    _, metrics = epo_loss(torch.tensor(0.0), h, torch.ones(1, 2), ref, 0, 10, config)
    assert metrics["penalty"] == pytest.approx(0.5) and metrics["reference"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="per-token reference needs a per-token penalty"):
        epo_loss(torch.tensor(0.0), h, torch.ones(1, 2), ref, 0, 10, _config())


def test_total_steps_from_config_or_error():
    _, metrics = epo_loss(torch.tensor(0.0), ENTROPY, MASK, None, 6, None, _config(total_steps=10))
    assert metrics["beta"] == pytest.approx(1 + math.exp(-1))
    with pytest.raises(ValueError, match="total_steps is unknown"):
        epo_loss(torch.tensor(0.0), ENTROPY, MASK, None, 0, None, _config())


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"entropy shape \(2, 4\) and action_mask shape \(2, 3\) disagree"):
        epo_loss(torch.tensor(0.0), ENTROPY, MASK[:, :3], None, 0, 10, _config())


@pytest.mark.parametrize("preset", ["seed", "paper-sciworld", "released-code"])
def test_shares_with_global_denominator_sum_to_the_whole(preset):
    """Splitting the batch: the shares' terms and gradients add up to the one-batch term."""
    torch.manual_seed(3)
    config = EPOConfig.from_preset(preset)
    h = (torch.rand(6, 8, dtype=torch.float64) * 3).requires_grad_(True)
    mask = (torch.rand(6, 8) > 0.3).long()
    reference = 0.9
    whole, _ = epo_regularizer(h, mask, reference, 1.4, **config.regularizer_knobs())
    (whole_grad,) = torch.autograd.grad(whole, h)

    parts = step_statistic_parts(h[:3], mask[:3], config.aggregation) + step_statistic_parts(
        h[3:], mask[3:], config.aggregation
    )
    global_value = step_statistic(parts).value
    assert global_value == pytest.approx(aggregate(h.detach(), mask, config.aggregation).item(), rel=1e-12)
    total = 0
    for rows in (slice(0, 3), slice(3, 6)):
        term, _ = epo_regularizer(
            h[rows], mask[rows], reference, 1.4, **config.regularizer_knobs(), denominator=parts[1], linearize_at=global_value
        )
        total = total + term
    (split_grad,) = torch.autograd.grad(total, h)
    assert total.item() == pytest.approx(whole.item(), rel=1e-12)
    assert torch.allclose(split_grad, whole_grad, rtol=1e-12, atol=1e-15)


def test_squared_share_needs_linearization_point():
    with pytest.raises(ValueError, match="needs linearize_at"):
        epo_regularizer(ENTROPY, MASK, 1.0, 1.0, **_config().regularizer_knobs(), denominator=torch.tensor(4.0))
