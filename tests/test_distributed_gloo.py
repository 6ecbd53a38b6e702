"""Two processes over gloo, each holding half the batch, rebuild the one-process values exactly.

The partial sums of step_statistic_parts are all-reduced with SUM (torch.distributed on CPU); the
step statistic, the per-turn history and the reference, and the summed gradients of the shares
(global denominator, squared penalty linearized at the global L_H) equal a single process's.
"""

import pytest
import torch
import torch.distributed as dist

from float64_reference import ref_token_entropy
from openrlhf_epo import EPOConfig
from openrlhf_epo.core import (
    EntropyHistory,
    PerTurnEntropyHistory,
    epo_regularizer,
    step_statistic,
    step_statistic_parts,
)

from gloo import run_ranks  # tests/support

STEPS = 4


def _batches():
    generator = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        logits = torch.randn(6, 10, 5, dtype=torch.float64, generator=generator) * 2
        mask = (torch.rand(6, 10, generator=generator) > 0.4).long()
        mask[1] = 0
        yield logits, mask


def _run(config: EPOConfig, rank: int | None, world: int):
    """One simulated run; rank None = one process with the whole batch. Returns per-step records."""
    per_turn = config.reference == "per_turn"
    history = PerTurnEntropyHistory(config.window_size, config.warmup) if per_turn else EntropyHistory(
        config.window_size, config.warmup
    )
    records = []
    for logits, mask in _batches():
        if rank is not None:
            rows = slice(rank * 3, rank * 3 + 3)
            logits, mask = logits[rows], mask[rows]
        x = logits.clone().requires_grad_(True)
        h = ref_token_entropy(x)
        parts = step_statistic_parts(h, mask, config.aggregation)
        if rank is not None:
            dist.all_reduce(parts, op=dist.ReduceOp.SUM)
        stat = step_statistic(parts)
        reference = history.token_reference(mask) if per_turn else history.reference()
        shared = {} if rank is None else {"denominator": parts[1], "linearize_at": stat.value}
        term, _ = epo_regularizer(h, mask, reference, 1.5, **config.regularizer_knobs(), **shared)
        (grad,) = torch.autograd.grad(term, x)
        total = term.detach().clone()
        if rank is not None:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        turn_reference = history.turn_reference() if per_turn else None
        records.append(
            {
                "value": stat.value,
                "reference": history.reference(),
                "turn_reference": None if turn_reference is None else turn_reference.tolist(),
                "term": total.item(),
                "grad": grad,
            }
        )
        history.push_step(stat)
    return records


CONFIGS = {
    "trajectory-squared": EPOConfig(warmup=1),
    "token-hinge": EPOConfig.from_preset("paper-sciworld", aggregation="token"),
    "per-turn": EPOConfig.from_preset("released-code", penalty="hinge"),
}


def _worker(rank: int, world: int, port: int, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {name: _run(config, rank, world) for name, config in CONFIGS.items()}
        for records in results.values():
            for record in records:  # plain lists: shared-memory tensors die with this process
                record["grad"] = record["grad"].tolist()
        queue.put((rank, results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_worker, world=2)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_ranks_equal_one_process(two_ranks, name):
    single = _run(CONFIGS[name], None, 1)
    for step, expected in enumerate(single):
        for rank in (0, 1):
            got = two_ranks[rank][name][step]
            assert got["value"] == pytest.approx(expected["value"], rel=1e-12), step
            assert got["reference"] == expected["reference"] or got["reference"] == pytest.approx(
                expected["reference"], rel=1e-12
            )
            assert got["turn_reference"] == expected["turn_reference"] or got["turn_reference"] == pytest.approx(
                expected["turn_reference"], rel=1e-12
            )
            assert got["term"] == pytest.approx(expected["term"], rel=1e-12)
        # each rank's gradient is its rows of the one-process gradient
        for rank, rows in ((0, slice(0, 3)), (1, slice(3, 6))):
            grad = torch.tensor(two_ranks[rank][name][step]["grad"], dtype=torch.float64)
            assert torch.allclose(grad, expected["grad"][rows], rtol=1e-12, atol=1e-15)
    assert single[-1]["reference"] is not None  # the penalty was exercised, not only warm-up
