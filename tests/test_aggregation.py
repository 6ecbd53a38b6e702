"""Turns and L_H (docs/spec.md section 1), derived by hand."""

import pytest
import torch

from openrlhf_epo.core import aggregate, aggregate_parts, turn_ids, turn_sums


def test_turn_ids_number_runs_of_ones():
    mask = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1, 1, 1], [1, 0, 1, 0, 1, 0, 1, 0, 0, 0], [0] * 10])
    assert turn_ids(mask).tolist() == [
        [0, 1, 1, 0, 0, 2, 0, 3, 3, 3],
        [1, 0, 2, 0, 3, 0, 4, 0, 0, 0],
        [0] * 10,
    ]
    assert turn_ids(mask).dtype == torch.long
    assert turn_ids(mask.bool()).tolist() == turn_ids(mask).tolist()


# Trajectory 0: turns {1: [1, 3]} and {2: [5]}   -> turn means 2 and 5   -> trajectory mean 3.5
# Trajectory 1: one turn {1: [2, 4, 6]}           -> turn mean 4          -> trajectory mean 4
# Trajectory 2: no action token                   -> left out
# trajectory mode: (3.5 + 4) / 2 = 3.75
# token mode: (1 + 3 + 5 + 2 + 4 + 6) / 6 = 3.5
VALUES = torch.tensor([[1.0, 3.0, 9.0, 5.0], [2.0, 4.0, 6.0, 8.0], [7.0, 7.0, 7.0, 7.0]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0], [0, 0, 0, 0]])


def test_trajectory_mode_by_hand():
    assert aggregate(VALUES, MASK, "trajectory").item() == pytest.approx(3.75)
    numerator, den = aggregate_parts(VALUES, MASK, "trajectory")
    assert (numerator.item(), den.item()) == (pytest.approx(7.5), 2.0)


def test_token_mode_by_hand():
    assert aggregate(VALUES, MASK, "token").item() == pytest.approx(3.5)
    numerator, den = aggregate_parts(VALUES, MASK, "token")
    assert (numerator.item(), den.item()) == (pytest.approx(21.0), 6.0)


def test_trajectory_gradient_by_hand():
    # dL/dv = 1 / (turn length * turns in trajectory * trajectories): 1/(2*2*2), 1/(1*2*2), 1/(3*1*2)
    v = VALUES.clone().requires_grad_(True)
    aggregate(v, MASK, "trajectory").backward()
    expected = torch.tensor(
        [[1 / 8, 1 / 8, 0, 1 / 4], [1 / 6, 1 / 6, 1 / 6, 0], [0, 0, 0, 0]], dtype=torch.float64
    )
    assert torch.allclose(v.grad, expected)


def test_off_mask_values_do_not_matter():
    poisoned = VALUES.clone()
    poisoned[MASK == 0] = 1e9
    for mode in ("trajectory", "token"):
        assert aggregate(poisoned, MASK, mode).item() == pytest.approx(aggregate(VALUES, MASK, mode).item())


def test_no_action_token_gives_connected_zero():
    v = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    for mode in ("trajectory", "token"):
        out = aggregate(v, torch.zeros(2, 3, dtype=torch.long), mode)
        assert out.item() == 0.0
        (grad,) = torch.autograd.grad(out, v)
        assert (grad == 0).all()


@pytest.mark.parametrize("mode", ["trajectory", "token"])
def test_gradcheck(mode):
    torch.manual_seed(0)
    v = torch.rand(3, 9, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(3, 9) > 0.4).long()
    mask[2] = 0
    assert torch.autograd.gradcheck(lambda t: aggregate(t, mask, mode), (v,))


def test_turn_sums_cap_shares_last_bucket():
    # Trajectory with turns 1, 2, 3, 4 and cap 2: turns 2, 3 and 4 land in bucket 2.
    values = torch.tensor([[1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0]])
    mask = torch.tensor([[1, 0, 1, 0, 1, 0, 1]])
    sums, counts = turn_sums(values, mask, max_turns=2)
    assert sums.tolist() == [1.0, 9.0] and counts.tolist() == [1.0, 3.0]


def test_bad_inputs():
    with pytest.raises(ValueError, match="aggregation mode 'mean' is invalid"):
        aggregate(VALUES, MASK, "mean")
    with pytest.raises(ValueError, match=r"values shape \(3, 4\) and action_mask shape \(3, 3\) disagree"):
        aggregate(VALUES, MASK[:, :3], "token")
