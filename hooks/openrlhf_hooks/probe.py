"""`--probe_words A,B,...`: what the policy does at the first token of each reply, logged every RL step.

A multi-turn agent's decision is mostly its reply's first token (the action word); the token-mean
entropy the host logs (train/entropy_loss) mixes that decision with every later token of the reply.
At each reply start (the first token of every run of action_mask = 1) of every training forward,
the probe reads the policy's distribution p over the vocabulary and logs, averaged over the step's
reply starts on all data-parallel ranks:

  train/probe/action_entropy  entropy of p restricted to the probe words, renormalised (nats): how
                              undecided the policy is between the actions;
  train/probe/tail_mass       1 - the probe words' total probability: mass outside any action;
  train/probe/reply_starts    how many reply starts were read.

A word counts with both its spellings that are one token ("left" and " left"), since a tokenizer may
start a reply either way. The launcher resolves the words to token ids from the actor's tokenizer
before Ray starts (resolve_word_tokens), so a word the tokenizer splits stops the run at once. The
probe reads the logits the host computed anyway, without gradient: it changes nothing in training.
The forwards it reads are the training forwards (every mini-batch and epoch of the step), so the
figure is the mean over the policies the step passed through.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch

SETTINGS_KEY = "probe"  # settings["probe"] = {"words": [...], "token_ids": [[ids of word 0], ...]}


class ProbeError(ValueError):
    """A probe word that is no token of the model's tokenizer."""


def parse_words(text: str) -> list[str]:
    words = [word.strip() for word in text.split(",") if word.strip()]
    if len(words) < 2:
        raise ProbeError(f"--probe_words={text!r} is invalid: give at least two comma-separated words (the actions)")
    if len(set(words)) != len(words):
        raise ProbeError(f"--probe_words={text!r} names a word twice")
    return words


def resolve_word_tokens(words: Sequence[str], tokenizer: Any, model: str) -> list[list[int]]:
    """The one-token spellings of each word ("w" and " w"); ProbeError naming a word with none, or
    two words that share a token."""
    token_ids: list[list[int]] = []
    for word in words:
        ids = []
        for spelling in (word, f" {word}"):
            encoded = tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        if not ids:
            raise ProbeError(f"--probe_words: {word!r} is not one token of {model}'s tokenizer (as {word!r} or {' ' + word!r})")
        token_ids.append(ids)
    flat = [token for ids in token_ids for token in ids]
    if len(set(flat)) != len(flat):
        raise ProbeError(f"--probe_words: two of {list(words)} share a token in {model}'s tokenizer")
    return token_ids


def reply_starts(action_mask: torch.Tensor) -> torch.Tensor:
    """[B, A] bool: the first token of each run of action tokens (each reply of a multi-turn episode)."""
    on = action_mask.bool()
    before = torch.zeros_like(on)
    before[:, 1:] = on[:, :-1]
    return on & ~before


def word_statistics(logits: torch.Tensor, token_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(action entropy, tail mass) per row of logits [N, V], in float32: the entropy of the words'
    renormalised probabilities and the probability outside all of them."""
    probabilities = torch.softmax(logits.float(), dim=-1)
    per_word = torch.stack([probabilities[:, list(ids)].sum(-1) for ids in token_ids], dim=-1)
    mass = per_word.sum(-1)
    renormalised = per_word / mass.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    entropy = -(renormalised * renormalised.clamp_min(torch.finfo(torch.float32).tiny).log()).sum(-1)
    return entropy, 1 - mass


class ReplyStartProbe:
    """Installed on one training rank's Actor (wraps its forward, keeping the host's signature)."""

    def __init__(self, actor: Any, token_ids: Sequence[Sequence[int]], all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]):
        from .trainer import action_rows

        self.token_ids = [list(ids) for ids in token_ids]
        self.all_reduce_sum = all_reduce_sum
        self._sums = torch.zeros(3, dtype=torch.float64)  # reply starts, action entropy, tail mass
        original = actor.forward

        @functools.wraps(original)
        def forward(sequences, action_mask=None, attention_mask=None, **kwargs):
            if not (torch.is_grad_enabled() and action_mask is not None and actor.training):
                return original(sequences, action_mask, attention_mask, **kwargs)
            wants_output = kwargs.get("return_output", False)
            kwargs["return_output"] = True
            log_probs, output = original(sequences, action_mask, attention_mask, **kwargs)
            with torch.no_grad():
                packed = bool(getattr(actor, "packing_samples", False))
                rows, _ = action_rows(sequences, attention_mask, action_mask, packed, reply_starts(action_mask))
                logits = output["logits"].detach()
                entropy, tail = word_statistics(logits.reshape(-1, logits.shape[-1])[rows], self.token_ids)
                self._sums += torch.stack([torch.tensor(float(len(rows))), entropy.sum().cpu(), tail.sum().cpu()]).double()
            return (log_probs, output) if wants_output else log_probs

        actor.forward = forward

    def end_step(self) -> dict[str, float]:
        """This step's means over every rank's reply starts; a collective: every rank calls it."""
        count, entropy, tail = self.all_reduce_sum(self._sums.clone()).tolist()
        self._sums.zero_()
        if count == 0:
            return {"probe/reply_starts": 0.0}
        return {"probe/action_entropy": entropy / count, "probe/tail_mass": tail / count, "probe/reply_starts": count}
