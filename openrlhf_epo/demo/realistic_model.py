"""A KeyDoor model with a realistic vocabulary: the trap task's tiny random Qwen2, with an 8192-token
byte-level BPE learned from ordinary text instead of keydoor_model.py's ~130 game tokens.

Why not keydoor_model.py: its prior gives the 4 action words 0.23 each, so 8% of a reply's first
token lies on the ~125 other tokens of its 130, and a reply's second token (the stop token, 0.9) keeps
a 10% tail of the same few tokens. Over a typical reply (an action word, then the stop token) the
mean token entropy is 1.26 nats, and 49% of it is not the choice between actions. An entropy
regulariser on that model spends much of its effort on junk tokens. A real chat model after SFT has
a 32k-150k vocabulary and keeps well under 1% of a reply's first token outside meaningful replies:
its token entropy is nearly all action entropy, with a thin tail over thousands of tokens. This
model has that shape at demo size (seed 0, HF float32 forward on a first KeyDoor turn with the coin;
nats; ln 4 = 1.386 is the action entropy of both):

                      tokens | reply start: entropy  actions  tail's perplexity | after " left": stop  entropy
    keydoor_model.py     130 |                1.94     0.920                 124 |                0.932     0.58
    this model          8192 |                1.52     0.990                8082 |                0.994     0.08

so the part of a reply's mean token entropy that is not the action choice falls from 49% to 14%.

The tokenizer learns from the docstrings of Python's standard library (offline and deterministic
for a given Python; capped at TEXT_CHARS) plus KeyDoor conversations, including the trap's word
"coin", repeated GAME_REPEATS times so that every game word, with and without its leading space, is
one token (the build checks it). The prior comes from openrlhf_hooks.testing.tiny_model.build_model
as in keydoor_model.py: at a reply's first token each action word has ACTION_PROBABILITY and the
stop token STOP_AT_REPLY_START (next to nothing: vLLM's min_tokens=1 masks it there, see
keydoor_model.py); after any other token the stop token has STOP_AFTER_TOKEN, so a typical reply is
one action word and its stop token. Building takes about 7 s on 2 CPU cores; head_dim is 64, so vLLM
serves it, and `from_pretrained(dir)` loads it offline.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
from pathlib import Path

from openrlhf_hooks.testing.tiny_model import CHAT_TEMPLATE, END_OF_TEXT, IM_END, IM_START

from .env import ACTIONS, vocabulary
from .keydoor_model import build_with_prior

VOCAB_SIZE = 8192
ACTION_MASS = 0.99  # the 4 action words together at a reply's first token; the rest is the tail
ACTION_PROBABILITY = ACTION_MASS / len(ACTIONS)
STOP_AT_REPLY_START = 1e-6
STOP_AFTER_TOKEN = 0.995
TEXT_CHARS = 3_000_000  # Python 3.11's stdlib has ~1.8 MB of docstrings; the cap bounds other versions
GAME_REPEATS = 8  # 2 already makes every game word one token (measured); 8 leaves a margin
# test suites and third-party packages: not part of the standard library proper, and site-packages
# differs from one install to the next
SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}


@functools.lru_cache(maxsize=1)  # parsing takes most of a build; the library does not change in a process
def ordinary_text(limit: int = TEXT_CHARS) -> tuple[str, ...]:
    """The docstrings of the standard library's modules, classes and functions, in sorted path order,
    until `limit` characters."""
    texts, total = [], 0
    for folder, dirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = sorted(name for name in dirs if name not in SKIPPED_DIRS)  # os.walk descends in this order
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                tree = ast.parse(Path(folder, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):  # a few files are deliberately broken
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        if total + len(doc) > limit:
                            return tuple(texts)
                        texts.append(doc)
                        total += len(doc)
    return tuple(texts)


def game_text() -> list[str]:
    """KeyDoor conversations in the agent file's ChatML: a user turn of every game word (rotated, so
    each also opens a line without its leading space) and a one-action reply."""
    words = vocabulary(coin=True)
    turns = [f"{IM_START}user\n{' '.join(words[i:] + words[:i])}{IM_END}\n{IM_START}assistant\n" for i in range(len(words))]
    return [turn + action + IM_END + "\n" for turn in turns for action in ACTIONS]


def build_tokenizer(path: Path):
    """Byte-level BPE of VOCAB_SIZE tokens saved to `path`; raises unless every game word is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[END_OF_TEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text encodes, as in a real byte-level BPE
        show_progress=False,
    )
    tokenizer.train_from_iterator([*ordinary_text(), *game_text() * GAME_REPEATS], trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(path)
    loaded = AutoTokenizer.from_pretrained(path)
    if len(loaded) != VOCAB_SIZE:
        raise RuntimeError(f"the tokenizer has {len(loaded)} tokens, not {VOCAB_SIZE}: too little text to learn from")
    for word in vocabulary(coin=True):
        for text in (word, f" {word}"):
            if len(loaded(text, add_special_tokens=False)["input_ids"]) != 1:
                raise RuntimeError(f"the tokenizer splits {text!r}: raise GAME_REPEATS")
    return loaded


def build(path: str | Path, seed: int = 0) -> Path:
    """Write the tokenizer and the model to `path` (created if needed); returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_with_prior(path, build_tokenizer(path), seed, ACTION_PROBABILITY, STOP_AT_REPLY_START, STOP_AFTER_TOKEN)
    return path
