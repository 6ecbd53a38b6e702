"""The demo's model for KeyDoor: a tiny random Qwen2 with a word-level ChatML tokenizer, built offline.

The tokenizer is trained on KeyDoor's conversations only: each of its words is one token, and the
vocabulary is a few dozen characters and words. The random model starts with a prior (openrlhf_hooks.tiny_model's
fixed-logit rows): each action word ACTION_PROBABILITY and the stop token STOP_PROBABILITY, except right
after an action word, where the stop token has STOP_AFTER_ACTION. So a typical reply is one action word
and its stop token, and episodes last many turns in a small context.
vLLM serves it (head_dim 64) and `from_pretrained(dir)` loads it, like any local model folder.
"""

from __future__ import annotations

from pathlib import Path

from openrlhf_hooks.tiny_model import build_model

from .env import ACTIONS, vocabulary

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
ACTION_PROBABILITY = 0.2
STOP_PROBABILITY = 0.05
STOP_AFTER_ACTION = 0.9


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


def build(path: str | Path, seed: int = 0) -> Path:
    """Write the tokenizer and the model to `path` (created if needed); returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    # the words with their leading space: a position-free prior on the bare words would glue a reply's
    # words together ("takeright"); with the space the reply reads " take right"
    prior = {tokenizer(f" {word}", add_special_tokens=False)["input_ids"][0]: ACTION_PROBABILITY for word in ACTIONS}
    prior[tokenizer.eos_token_id] = STOP_PROBABILITY
    after_action = (sorted(set(prior) - {tokenizer.eos_token_id}), {tokenizer.eos_token_id: STOP_AFTER_ACTION})
    build_model(path, tokenizer, seed, prior, after_action, unit_embeddings=True)
    return path
