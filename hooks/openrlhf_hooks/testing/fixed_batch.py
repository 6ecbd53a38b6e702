"""The fixed batch a check trains on: 8 multi-turn samples (turns of action tokens between
observation tokens, unequal lengths), the same at every RL step; each rank takes its rows."""

from __future__ import annotations

from typing import Any

import torch

ROWS = 8  # samples in the fixed batch: 4 prompts x 2 samples
LENGTH = 24  # tokens per sample
# turn layouts (runs of action tokens separated by observation tokens), cycled over the rows
TURNS = [[(3, 7), (10, 14), (18, 22)], [(3, 9), (12, 18)], [(3, 22)], [(5, 6), (8, 12), (15, 20)]]


def sample_batch(step: int, rows: int, vocab: int, zero_advantages: bool):
    """The same multi-turn samples at every step (each rank takes its rows); advantages vary by
    step unless zero. Returns sequences, attention_mask, action_mask, old_log_probs, advantages."""
    g = torch.Generator().manual_seed(1000)
    sequences = torch.randint(3, vocab, (rows, LENGTH), generator=g)
    attention_mask = torch.ones(rows, LENGTH, dtype=torch.long)
    attention_mask[1, -3:] = 0  # right padding
    action_mask = torch.zeros(rows, LENGTH - 1, dtype=torch.bool)
    for row in range(rows):
        for start, end in TURNS[row % len(TURNS)]:
            action_mask[row, start:end] = True
    action_mask &= attention_mask[:, 1:].bool()
    old_log_probs = -torch.rand(rows, LENGTH - 1, generator=g) * 3
    advantages = torch.randn(rows, LENGTH - 1, generator=torch.Generator().manual_seed(2000 + step))
    if zero_advantages:
        advantages.zero_()
    return sequences, attention_mask, action_mask, old_log_probs * action_mask, advantages * action_mask


def rank_experience(step: int, rows: int, vocab: int, zero_advantages: bool, rank: int, world: int) -> Any:
    """This rank's rows of sample_batch(...), as the host's Experience for its replay buffer."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    sequences, attention_mask, action_mask, old_log_probs, advantages = sample_batch(step, rows, vocab, zero_advantages)
    per_rank = rows // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    return Experience(
        sequences=sequences[mine],
        attention_mask=attention_mask[mine],
        action_mask=action_mask[mine],
        action_log_probs=old_log_probs[mine],
        advantages=advantages[mine],
        total_length=attention_mask[mine].sum(-1),
        response_length=action_mask[mine].sum(-1),
        info={},
    )
