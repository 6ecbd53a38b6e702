"""The demo's model for KeyDoor: a tiny random Qwen2 with a word-level ChatML tokenizer, built offline.

The tokenizer is trained on KeyDoor's conversations only: each of its words is one token, and the
vocabulary is a few dozen characters and words. The random model starts with a prior (openrlhf_hooks.testing.tiny_model's
fixed-logit rows): a reply's first token is each action word with ACTION_PROBABILITY, and after any
token the stop token has STOP_AFTER_TOKEN. So a typical reply is one action word and its stop token,
and episodes last many turns in a small context.

The stop token as a reply's first token gets STOP_AT_REPLY_START, next to nothing, on purpose. OpenRLHF
samples with vLLM's `min_tokens=1` (ppo_utils/samples_generator.py, `_dispatch_prompts_to_vllm`), which
masks the stop token there, so it is never sampled and never pushed down, while every sampled first
token is pushed down whenever its episode fails. Its probability then grows in proportion to itself:
from 0.05 it reached 1.0 within 40-60 steps in every seed (measured), the trainer's entropy and
log-probabilities then described a token vLLM never draws, and the runs degraded into wasted turns.
vLLM serves it (head_dim 64) and `from_pretrained(dir)` loads it, like any local model folder.
"""

from __future__ import annotations

from pathlib import Path

from openrlhf_hooks.testing.tiny_model import END_OF_TEXT, IM_END, IM_START, build_model

from .env import ACTIONS, vocabulary

ACTION_PROBABILITY = 0.23
STOP_AT_REPLY_START = 1e-6
STOP_AFTER_TOKEN = 0.9


def _corpus() -> list[str]:
    """KeyDoor conversations as the agent file writes them, with every word in every position."""
    words = vocabulary()
    replies = [*ACTIONS, *(f"{a} {b}" for a in ACTIONS for b in words)]
    turns = [f"{IM_START}user\n{' '.join(words[i:] + words[:i])}{IM_END}\n{IM_START}assistant\n" for i in range(len(words))]
    return [turn + reply + IM_END + "\n" for turn in turns for reply in replies]


def build_tokenizer(path: Path):
    """Byte-level BPE (what transformers' Qwen2 tokenizer class rebuilds any tokenizer.json into),
    trained until every KeyDoor word, with or without its leading space, is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=[END_OF_TEXT, IM_START, IM_END], show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=IM_END, pad_token=END_OF_TEXT, additional_special_tokens=[IM_START]
    ).save_pretrained(path)
    loaded = AutoTokenizer.from_pretrained(path)
    for word in vocabulary():
        for text in (word, f" {word}"):
            if len(loaded(text, add_special_tokens=False)["input_ids"]) != 1:
                raise RuntimeError(f"the KeyDoor tokenizer splits {text!r}")
    return loaded


def build_with_prior(path: Path, tokenizer, seed: int, action_probability: float, stop_at_reply_start: float, stop_after_token: float):
    """The random model for `tokenizer` with the KeyDoor prior: each action word (with its leading
    space) at a reply's first token with `action_probability`, the stop token there with
    `stop_at_reply_start`, and after any other token with `stop_after_token`."""
    # the words with their leading space: a position-free prior on the bare words would glue a reply's
    # words together ("takeright"); with the space the reply reads " take right"
    prior = {tokenizer(f" {word}", add_special_tokens=False)["input_ids"][0]: action_probability for word in ACTIONS}
    prior[tokenizer.eos_token_id] = stop_at_reply_start
    # the base prior holds after the newline token, which ends every user turn ("assistant\n"), so at
    # a reply's first token; after any other token the stop token has stop_after_token
    reply_start = tokenizer(f"{IM_START}assistant\n", add_special_tokens=False)["input_ids"][-1]
    after_token = (sorted(set(range(len(tokenizer))) - {reply_start}), {tokenizer.eos_token_id: stop_after_token})
    build_model(path, tokenizer, seed, prior, after_token, unit_embeddings=True)


def build(path: str | Path, seed: int = 0) -> Path:
    """Write the tokenizer and the model to `path` (created if needed); returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_with_prior(path, build_tokenizer(path), seed, ACTION_PROBABILITY, STOP_AT_REPLY_START, STOP_AFTER_TOKEN)
    return path
