"""How much probability a KeyDoor model folder gives its stop token as a reply's first token.

    .venv/bin/python scripts/stop_at_reply_start.py RUN/final [MODEL_DIR ...]

OpenRLHF samples replies with vLLM's `min_tokens=1`, so vLLM never draws the stop token there, but
the trainer's log-probabilities and entropy use the full softmax. This reads a trained (or freshly
built) model at the first token of 40 replies (8 layouts, 5 turns each, along a fixed walk) and
prints the mean and median probability of the stop token there, one line per folder.
docs/demo-evidence.md ("Before the fix") quotes it for the runs of the demo's earlier model.
"""

from __future__ import annotations

import argparse
import statistics
import sys

WALK = ("right", "left", "right", "left", "take")
LAYOUTS = 8


def stop_at_reply_start(model_dir: str) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from openrlhf_epo.demo.env import KeyDoorConfig, KeyDoorEnv
    from openrlhf_epo.demo.keydoor_agent import user_turn

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    found = []
    for layout in range(LAYOUTS):
        env = KeyDoorEnv(KeyDoorConfig(rooms=4, max_turns=20), 777_000 + layout)
        text = user_turn(env.reset())
        for action in WALK:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
            with torch.no_grad():
                found.append(float(model(ids).logits[0, -1].softmax(-1)[tokenizer.eos_token_id]))
            observation, _, _ = env.step(action)
            text += f" {action}{tokenizer.eos_token}\n" + user_turn(observation)
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dirs", nargs="+", metavar="MODEL_DIR")
    args = parser.parse_args(argv)
    for model_dir in args.model_dirs:
        values = stop_at_reply_start(model_dir)
        print(f"{model_dir}: p(stop as first token) mean {statistics.fmean(values):.3f}, median {statistics.median(values):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
