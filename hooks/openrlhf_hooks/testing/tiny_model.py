"""python -m openrlhf_hooks.testing.tiny_model DIR: a tiny random-weight Qwen2 chat model for CPU smoke runs.

Built offline in a few seconds: a byte-level BPE tokenizer trained here with ChatML's special tokens
and a Qwen-style chat template, and a 2-layer Qwen2 (head_dim 64, which vLLM's CPU attention needs).
It loads with `from_pretrained(DIR)` and vLLM serves it, so `--actor.model_name_or_path DIR` runs
OpenRLHF's whole loop in CPU mode (`--cpu`) on a laptop.

A random model almost never emits its stop token, and OpenRLHF's multi-turn executor then spends all
of `--data.max_len` on one turn. So the stop token `<|im_end|>` gets a fixed probability (STOP_PROBABILITY
per token): one residual dimension holds a constant that no layer writes to, and only the stop
token's output row reads it. Training moves the weights, so the probability drifts from there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VOCAB_SIZE = 512
HIDDEN = 128
STOP_PROBABILITY = 0.25

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Text the tokenizer learns its merges from: the words of text games and their instructions.
_CORPUS = """
You are playing a text adventure game. Each turn you receive an observation. Reply with exactly one
action on a single line and nothing else, for example: move north. look around, inventory, move east,
move west, move south, open door to north, close door to south, take coin, put apple in box, focus on
Task: You are hungry! Let's cook a delicious meal. Find the coin. You are in the kitchen. In one part
of the room you see a fridge that is closed. There is also a counter. To the North you see a door.
Invalid action. Valid actions here. system user assistant science thermometer water boil freeze melt
"""


def tiny_qwen2(path: str | Path, initializer_range: float = 0.02, vocab_size: int = 128) -> Path:
    """A 2-layer Qwen2 saved to `path` (no tokenizer: training reads token ids only). A larger
    initializer_range gives sharper next-token distributions, so samples differ in entropy."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return Path(path)


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[END_OF_TEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START],
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(path)
    return fast


def _target_logits(prior: dict[int, float], vocab_size: int) -> dict[int, float]:
    """Logits that give each token of `prior` its probability when every other logit is about 0."""
    rest = 1 - sum(prior.values())
    if not (0 < rest < 1 and len(prior) < vocab_size):
        raise ValueError(f"prior {prior} must leave the other tokens a probability between 0 and 1")
    each_other = rest / (vocab_size - len(prior))
    return {token: math.log(probability / each_other) for token, probability in prior.items()}


def build_model(
    path: Path,
    tokenizer,
    seed: int = 0,
    prior: dict[int, float] | None = None,
    after: tuple[list[int], dict[int, float]] | None = None,
    unit_embeddings: bool = False,
):
    """A random 2-layer Qwen2 for `tokenizer`, saved to `path`.

    prior: token id -> probability for the next token anywhere (default: the stop token at
    STOP_PROBABILITY); the other tokens share the rest about evenly. after: (trigger ids, prior) for
    the token right after a trigger token instead; a token of `prior` not named there falls to the
    level of the others. Both work through residual dimensions that no layer writes to: one holds a
    constant, one flags the trigger tokens, and only the favoured output rows read them.
    unit_embeddings: scale the embeddings to unit RMS (default: the init's 0.02). Adam moves every
    weight by about the learning rate per step; against the 0.02 scale a few steps rewrite the
    reserved dimensions and with them the prior (what a model meant to learn stably needs), while the
    default scale makes one step change the policy visibly (what a weight-sync smoke test needs)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    stop = tokenizer.eos_token_id
    prior = {stop: STOP_PROBABILITY} if prior is None else dict(prior)
    base = _target_logits(prior, len(tokenizer))
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=HIDDEN // 2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=stop,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    constant_dim, flag_dim = HIDDEN - 1, HIDDEN - 2
    reserved = [constant_dim] if after is None else [constant_dim, flag_dim]
    sample = torch.randint(0, len(tokenizer), (4, 64), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        free = HIDDEN - len(reserved)
        if unit_embeddings:
            embed.mul_(1 / embed[:, :free].pow(2).mean().sqrt())
        others = embed[:, :free].pow(2).mean().sqrt()
        # the constant carries half the residual's energy, so after the final RMSNorm it reads
        # about sqrt(HIDDEN / 2) whatever the token
        embed[:, reserved] = 0
        embed[:, constant_dim] = others * math.sqrt(free)
        if after is not None:
            triggers, _ = after
            embed[triggers, flag_dim] = embed[triggers, constant_dim]
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[reserved] = 0
            layer.mlp.down_proj.weight[reserved] = 0
        head = model.lm_head.weight
        head[:, reserved] = 0
        favoured = set(base) | (set(after[1]) if after else set())
        head[sorted(favoured)] = 0
        # the layers' writes to the other dimensions shrink the reserved ones after the final norm:
        # read their actual values on random text, then set the favoured rows to give the target logits
        flagged = torch.zeros_like(sample, dtype=torch.bool)
        if after is not None:
            # alternate trigger and other tokens, so one pass reads both kinds of position (the hidden
            # states do not depend on the head rows set below)
            triggers = torch.tensor(after[0])
            plain = torch.tensor(sorted(set(range(len(tokenizer))) - set(after[0])))
            if not len(plain):
                raise ValueError("after: the trigger tokens cover the whole vocabulary, so the base prior holds nowhere")
            sample[:, ::2] = triggers[torch.arange(sample[:, ::2].numel()) % len(triggers)].view(4, -1)
            sample[:, 1::2] = plain[torch.arange(sample[:, 1::2].numel()) % len(plain)].view(4, -1)
            flagged = torch.isin(sample, triggers)
        hidden = model(sample, output_hidden_states=True).hidden_states[-1]
        constant = hidden[..., constant_dim][~flagged].mean()
        for token, logit in base.items():
            head[token, constant_dim] = logit / constant
        if after is not None:
            after_prior = after[1]
            flag = hidden[..., flag_dim][flagged].mean()
            wanted = _target_logits(after_prior, len(tokenizer))
            # at a trigger the constant reads lower (the flag adds energy): correct with its value there
            constant_there = hidden[..., constant_dim][flagged].mean()
            for token in favoured:
                now = base.get(token, 0.0) * constant_there / constant
                head[token, flag_dim] = (wanted.get(token, 0.0) - now) / flag
    model.to(torch.bfloat16).save_pretrained(path)
    GenerationConfig(eos_token_id=stop, pad_token_id=tokenizer.pad_token_id).save_pretrained(path)
    return model


def build(path: str | Path, seed: int = 0) -> Path:
    """Write the tokenizer and the model to `path` (created if needed); returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path)
    build_model(path, tokenizer, seed)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m openrlhf_hooks.testing.tiny_model", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="folder to write the model and tokenizer to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build(args.path, args.seed)
    print(json.dumps({"model": str(path), "vocab_size": VOCAB_SIZE, "stop_probability": STOP_PROBABILITY}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
