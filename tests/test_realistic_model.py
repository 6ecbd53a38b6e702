"""The realistic-vocabulary KeyDoor model (openrlhf_epo/demo/realistic_model.py): an 8192-token
byte-level BPE learned from ordinary text, in which every game word is one token, and a prior that
keeps about 1% of a reply's first token outside the 4 actions, spread thinly over the vocabulary."""

from __future__ import annotations

import json
import time

import pytest
import torch

from openrlhf_epo.demo.env import ACTIONS, KeyDoorConfig, KeyDoorEnv, vocabulary

TRAP = KeyDoorConfig(rooms=6, max_turns=18, coin=0.25)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model folder, seconds the build took), built once for the module."""
    from openrlhf_epo.demo.realistic_model import build

    start = time.perf_counter()
    path = build(tmp_path_factory.mktemp("realistic_model"), seed=0)
    return path, time.perf_counter() - start


@pytest.fixture(scope="module")
def loaded(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = built
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prompts(tokenizer) -> list[str]:
    """Real KeyDoor prompts with the trap on, as the agent file writes them: each layout's first
    turn, and the same conversation two replies later (other observations)."""
    from openrlhf_epo.demo.keydoor_agent import user_turn

    texts = []
    for seed in range(4):
        env = KeyDoorEnv(TRAP, seed)
        text = user_turn(env.reset())
        texts.append(text)
        for action in ("right", "left"):
            observation, _, _ = env.step(action)
            text += f" {action}{tokenizer.eos_token}\n" + user_turn(observation)
        texts.append(text)
    return texts


def conversations(tokenizer) -> list[list[int]]:
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompts(tokenizer)]


def next_token(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].double().softmax(-1)


def action_ids(tokenizer) -> list[int]:
    return [tokenizer(f" {a}", add_special_tokens=False)["input_ids"][0] for a in ACTIONS]


def test_build_is_fast(built):
    assert built[1] < 60


def test_vocabulary_is_realistic_and_each_game_word_is_one_token(built, loaded):
    from openrlhf_epo.demo.realistic_model import VOCAB_SIZE

    tokenizer, _ = loaded
    assert len(tokenizer) >= 8192 and len(tokenizer) == VOCAB_SIZE
    for word in vocabulary(coin=True):
        for text in (word, f" {word}"):
            assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1, text
    # learned from ordinary text: English prose takes several characters per token, not one per byte
    prose = "Return a new list containing all items from the iterable in ascending order."
    assert len(tokenizer(prose, add_special_tokens=False)["input_ids"]) < len(prose) / 3
    for text in prompts(tokenizer):
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    config = json.loads((built[0] / "config.json").read_text())
    assert config["head_dim"] == 64 and config["vocab_size"] == len(tokenizer)  # what vLLM's CPU attention needs


def test_chat_template_writes_the_agent_files_turns(loaded):
    from openrlhf_epo.demo.keydoor_agent import user_turn

    tokenizer, _ = loaded
    observation = KeyDoorEnv(TRAP, 0).reset()
    message = [{"role": "user", "content": observation}]
    assert tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=False) == user_turn(observation)


def test_reply_start_puts_about_99_percent_on_the_actions_and_a_thin_tail_on_the_rest(loaded):
    tokenizer, model = loaded
    actions = action_ids(tokenizer)
    stop = tokenizer.eos_token_id
    for ids in conversations(tokenizer):
        probabilities = next_token(model, ids)
        on_actions = probabilities[actions]
        assert 0.98 <= float(on_actions.sum()) <= 0.995
        assert float(on_actions.max() / on_actions.min()) < 1.3
        # vLLM never samples the stop token first (min_tokens=1), so it must start negligible there
        assert float(probabilities[stop]) < 1e-4
        rest = probabilities.clone()
        rest[actions] = 0
        tail = float(rest.sum())
        assert 0 < tail and float(rest.max()) < 1e-3
        # spread thinly: more than 8000 tokens each hold at least a tenth of an even share of the tail
        assert int((rest > 0.1 * tail / len(rest)).sum()) > 8000


def test_after_a_token_of_the_reply_the_stop_token_takes_over(loaded):
    tokenizer, model = loaded
    stop = tokenizer.eos_token_id
    other = tokenizer(" door", add_special_tokens=False)["input_ids"][0]  # a reply can start with any token
    ids = conversations(tokenizer)[0]
    for token in [*action_ids(tokenizer), other]:
        assert 0.99 <= float(next_token(model, ids + [token])[stop]) <= 0.999, tokenizer.decode([token])


def test_the_same_seed_builds_the_same_model(tmp_path, built, loaded):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from openrlhf_epo.demo.realistic_model import build

    first = built[0]
    # within one process the standard library's text is parsed once (cached): this checks the BPE
    # training and the weights, which draw on hash maps and random generators
    again = build(tmp_path / "again", seed=0)
    assert (again / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    weights, weights_again = load_file(first / "model.safetensors"), load_file(again / "model.safetensors")
    assert weights.keys() == weights_again.keys()
    assert all(torch.equal(weights[name], weights_again[name]) for name in weights)
    tokenizer, model = loaded
    ids = conversations(tokenizer)[0]
    rebuilt = AutoModelForCausalLM.from_pretrained(again, dtype=torch.float32).eval()
    assert torch.equal(next_token(model, ids), next_token(rebuilt, ids))
    other = load_file(build(tmp_path / "other", seed=1) / "model.safetensors")
    assert not torch.equal(weights["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
