"""The optimized core against the independent loop-based float64 implementation (float64_reference.py).

For every preset, on random batches over whole simulated runs (history, reference, phase weight,
loss): values and gradients agree to 1e-5 relative.
"""

import dataclasses

import pytest
import torch

from float64_reference import (
    ref_aggregate,
    ref_epo_loss,
    ref_global_reference,
    ref_in_corridor,
    ref_per_turn_reference,
    ref_phase_weight,
    ref_reference_tensor,
    ref_step_turn_sums,
    ref_token_entropy,
    ref_turn_ids,
)
from openrlhf_epo import PRESETS, EPOConfig
from openrlhf_epo.core import (
    EntropyHistory,
    PerTurnEntropyHistory,
    aggregate,
    epo_loss,
    phase_weight,
    step_statistic,
    step_statistic_parts,
    turn_ids,
)

REL = 1e-5


def random_batch(generator, batch=4, length=12, vocab=9):
    logits = torch.randn(batch, length, vocab, dtype=torch.float64, generator=generator) * 2
    mask = (torch.rand(batch, length, generator=generator) > 0.35).long()
    mask[-1] = 0  # a trajectory without action tokens must be left out
    return logits, mask


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_simulated_run_matches_reference(preset):
    generator = torch.Generator().manual_seed(sorted(PRESETS).index(preset))
    config = EPOConfig.from_preset(preset, total_steps=9, warmup=min(2, PRESETS[preset]["warmup"]))
    cfg = dataclasses.asdict(config)
    per_turn = config.reference == "per_turn"
    history = (PerTurnEntropyHistory if per_turn else EntropyHistory)(config.window_size, config.warmup)
    past_values, past_turn_sums = [], []

    for step in range(config.total_steps):
        logits, mask = random_batch(generator)
        assert turn_ids(mask).tolist() == ref_turn_ids(mask)

        global_ref = ref_global_reference(past_values, config.window_size, config.warmup)
        if per_turn:
            lookup = ref_per_turn_reference(past_turn_sums, config.warmup, global_ref)
            expected_ref = None if lookup is None else ref_reference_tensor(lookup, mask)
            reference = history.token_reference(mask)
        else:
            expected_ref = global_ref
            reference = history.reference()
        if expected_ref is None:
            assert reference is None
        elif per_turn:
            assert torch.allclose(reference, expected_ref, rtol=REL)
        else:
            assert reference == pytest.approx(expected_ref, rel=REL)

        x = logits.clone().requires_grad_(True)
        loss, metrics = epo_loss(torch.tensor(0.25, dtype=torch.float64), ref_token_entropy(x), mask, reference, step, None, config)
        (grad,) = torch.autograd.grad(loss, x)

        y = logits.clone().requires_grad_(True)
        h_ref = ref_token_entropy(y)
        expected_loss = ref_epo_loss(
            torch.tensor(0.25, dtype=torch.float64), h_ref, mask, expected_ref, step, config.total_steps, cfg
        )
        (expected_grad,) = torch.autograd.grad(expected_loss, y)

        assert loss.item() == pytest.approx(expected_loss.item(), rel=REL)
        assert torch.allclose(grad, expected_grad, rtol=REL, atol=1e-12)
        assert metrics["beta"] == pytest.approx(
            ref_phase_weight(step, config.total_steps, config.gamma, config.mid_fraction), rel=1e-12
        )
        assert metrics["entropy"] == pytest.approx(ref_aggregate(h_ref, mask, config.aggregation).item(), rel=REL)
        if expected_ref is not None:
            assert metrics["in_corridor"] == pytest.approx(
                ref_in_corridor(h_ref, mask, expected_ref, config.kappa_left, config.kappa_right), rel=REL
            )

        # close the step: push S_k (and the per-turn sums) into both histories
        stat = step_statistic(step_statistic_parts(ref_token_entropy(logits), mask, config.aggregation))
        expected_value = ref_aggregate(h_ref.detach(), mask, config.aggregation).item()
        assert stat.value == pytest.approx(expected_value, rel=REL)
        past_values.append(expected_value)
        if per_turn:
            turn_sums = ref_step_turn_sums(h_ref, mask)
            past_turn_sums.append(turn_sums)
            for turn, (h_sum, count) in turn_sums.items():
                assert stat.turn_sums[turn - 1].item() == pytest.approx(h_sum, rel=REL)
                assert stat.turn_counts[turn - 1].item() == count
            history.push(stat.value, stat.turn_sums, stat.turn_counts)
        else:
            history.push(stat.value)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("offset", [0.3, 1.0, 3.0])
def test_random_references_every_penalty_shape(preset, offset):
    """Reference values placing L_H below, inside and above the corridor."""
    generator = torch.Generator().manual_seed(100)
    config = EPOConfig.from_preset(preset, total_steps=20)
    logits, mask = random_batch(generator, batch=5, length=16, vocab=7)
    current = aggregate(ref_token_entropy(logits), mask, config.aggregation).item()
    reference = current * offset
    x = logits.clone().requires_grad_(True)
    loss, _ = epo_loss(torch.tensor(0.0, dtype=torch.float64), ref_token_entropy(x), mask, reference, 7, None, config)
    (grad,) = torch.autograd.grad(loss, x)
    y = logits.clone().requires_grad_(True)
    expected = ref_epo_loss(
        torch.tensor(0.0, dtype=torch.float64), ref_token_entropy(y), mask, reference, 7, 20, dataclasses.asdict(config)
    )
    (expected_grad,) = torch.autograd.grad(expected, y)
    assert loss.item() == pytest.approx(expected.item(), rel=REL)
    assert torch.allclose(grad, expected_grad, rtol=REL, atol=1e-12)


def test_phase_weight_matches_reference_over_a_grid():
    for total in (1, 2, 5, 7, 100):
        for fraction in (0.1, 0.5, 0.6, 1.0):
            for step in range(total):
                assert phase_weight(step, total, 3.0, fraction) == ref_phase_weight(step, total, 3.0, fraction)
