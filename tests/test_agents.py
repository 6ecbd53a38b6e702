"""The example agents in examples/agents/, played in the real ScienceWorld and TextWorld-Express games.

Each file is loaded by path, as OpenRLHF loads an agent file (once through OpenRLHF's own loader), and
driven through its async AgentInstance or through OpenRLHF's MultiTurnAgentExecutor with a scripted
engine in place of vLLM. Every episode starts a real JVM; the tests check that it is shut down.
"""

import asyncio
import gc
import importlib.util
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import scienceworld
import stand_ins
import textworld_express
import torch

stand_ins.install()  # OpenRLHF's vLLM engine module, whose agent loader is used below, imports vllm

from openrlhf.trainer.ray.vllm_engine import _load_agent_executor  # noqa: E402
from openrlhf.utils.agent import MultiTurnAgentExecutor  # noqa: E402

AGENTS = Path(__file__).resolve().parents[1] / "examples" / "agents"
SW_FILE = AGENTS / "scienceworld_agent.py"
TWX_FILE = AGENTS / "textworld_express_agent.py"

# Short gold paths: five steps in ScienceWorld, a few in a three-room coin game (TextWorld-Express
# draws its gold path at random, so its length varies).
SW_TASK = {"task": "find-non-living-thing", "variation": 0}
# Scoring steps in SW_TASK: 8, 25, 25 and 75 points after each (the gold path's non-living thing varies).
SW_SCORING_ACTIONS = ["open door to kitchen", "go to kitchen", "look around", "focus on bowl"]
# A failed task: the door and the kitchen score 8, then 25 points; focusing on the air (not alive) fails the
# task, at -100.
SW_FAILING_TASK = {"task": "find-living-thing", "variation": 0}
SW_FAILING_ACTIONS = ["open door to kitchen", "go to kitchen", "focus on air"]
TWX_GAME = {"game": "coin", "seed": 0, "params": "numLocations=3,includeDoors=1,numDistractorItems=2"}
CHATML_PROMPT = (
    "<|im_start|>system\nYou are a helpful agent.<|im_end|>\n"
    "<|im_start|>user\nPlay the game.<|im_end|>\n<|im_start|>assistant\n"
)


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def track_jvms(monkeypatch, package, name):
    """Replaces the package's env class with one that records each JVM it starts. Patch before loading
    an agent file: the file binds the class when it runs."""
    started = []
    base = getattr(package, name)

    class Tracked(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self._gateway.java_process)

    monkeypatch.setattr(package, name, Tracked)
    return started


def exited(process, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return process.poll() is not None


def act(text: str) -> dict:
    # What MultiTurnAgentExecutor hands to step(); the agents read only the action.
    return {"observation_text": "", "action_text": text, "label": None, "sampling_params": None}


class CharTokenizer:
    """One token per character, so token ranges can be read back as text."""

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        return {"input_ids": torch.tensor([[ord(c) for c in text]], dtype=torch.long)}


class ScriptedEngine:
    """Stands in for vLLM's engine: replies from a script, cut to the token budget as vLLM would."""

    def __init__(self, replies):
        self.replies = iter(replies)
        self.contexts = []

    async def generate(self, token_ids, sampling_params, multi_modal_data=None):
        self.contexts.append("".join(map(chr, token_ids)))
        text = next(self.replies)
        finish = "length" if len(text) >= sampling_params.max_tokens else "stop"
        text = text[: sampling_params.max_tokens]
        output = SimpleNamespace(text=text, token_ids=[ord(c) for c in text], finish_reason=finish, logprobs=None)
        return SimpleNamespace(outputs=[output])


def execute(executor, prompt, label, replies, max_length):
    engine = ScriptedEngine(replies)
    params = SimpleNamespace(max_tokens=None, logprobs=None)
    result = asyncio.run(executor.execute(prompt, label, params, max_length, CharTokenizer(), engine))
    return result, engine


@pytest.fixture(scope="module", autouse=True)
def quick_jvm_start():
    # The games' JVMs live a few seconds here: skipping the optimising JIT compiler saves CPU time.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAVA_TOOL_OPTIONS", "-XX:TieredStopAtLevel=1")
        yield


@pytest.fixture(scope="module", params=[SW_FILE, TWX_FILE], ids=["scienceworld", "textworld_express"])
def agent_module(request):
    return load(request.param, f"agent_under_test_{request.param.stem}")


@pytest.fixture(scope="module")
def sw_gold():
    env = scienceworld.ScienceWorldEnv("", envStepLimit=100)
    try:
        env.load(SW_TASK["task"], SW_TASK["variation"], "", generateGoldPath=True)
        return env.get_gold_action_sequence()
    finally:
        env.close()


@pytest.fixture(scope="module")
def twx_gold():
    env = textworld_express.TextWorldExpressEnv(envStepLimit=100)
    try:
        env.reset(
            seed=TWX_GAME["seed"], gameFold="train", gameName="coin", gameParams=TWX_GAME["params"],
            generateGoldPath=True,
        )
        gold = env.getGoldActionSequence()
    finally:
        env.close()
    assert gold[0] == "look around"  # stands for the reset, not a move
    return gold[1:]


# Parsing and formatting, no game needed.


@pytest.mark.parametrize(
    "reply, action",
    [
        ("open door to kitchen", "open door to kitchen"),
        ("> Open door to kitchen", "open door to kitchen"),
        ("Action: go to kitchen.\nI go there because the box is there.", "go to kitchen"),
        ("\n\n  action:  `look   around`<|im_end|>", "look around"),
        (">> take coin<|endoftext|>", "take coin"),
        ("   \n", ""),
        ("<|im_end|>", ""),
    ],
)
def test_parse_action(agent_module, reply, action):
    assert agent_module.parse_action(reply) == action


def test_first_turn_plain_prompt_builds_chatml_with_default_instructions(agent_module):
    text = agent_module.first_turn("", "Task: find it\n\nA room.")
    assert text == (
        f"<|im_start|>system\n{agent_module.DEFAULT_INSTRUCTIONS}<|im_end|>\n"
        "<|im_start|>user\nTask: find it\n\nA room.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert agent_module.first_turn("Be brief.", "obs").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_first_turn_templated_prompt_gets_the_observation_in_its_user_turn(agent_module):
    text = agent_module.first_turn(CHATML_PROMPT, "A room.")
    assert text == CHATML_PROMPT.replace("Play the game.<|im_end|>", "Play the game.\n\nA room.<|im_end|>")
    empty = CHATML_PROMPT.replace("Play the game.", "")
    assert agent_module.first_turn(empty, "A room.") == empty.replace(
        "user\n<|im_end|>", f"user\n{agent_module.DEFAULT_INSTRUCTIONS}\n\nA room.<|im_end|>"
    )
    with pytest.raises(ValueError, match="ChatML generation prompt"):
        agent_module.first_turn("<|im_start|>user\nhi<|im_end|>\n", "A room.")


def test_feedback_turn_opens_a_user_and_then_an_assistant_turn(agent_module):
    assert agent_module.feedback_turn("You see a coin.") == (
        "\n<|im_start|>user\nYou see a coin.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_scienceworld_label_parsing():
    sw = load(SW_FILE, "sw_labels")
    spec = sw.TaskSpec.from_label(json.dumps({"task": "boil", "variation": 3, "reward": "success"}))
    assert (spec.task, spec.variation, spec.simplifications, spec.max_turns, spec.reward) == (
        "boil", 3, "", sw.DEFAULT_MAX_TURNS, "success")
    # A dataset struct column gives None for keys a row lacks.
    assert sw.TaskSpec.from_label({"task": "melt", "variation": None, "max_turns": 5}).variation == 0
    for bad, message in [
        ("", "label_key"),
        ({"variation": 1}, "needs a 'task'"),
        ({"task": "boil", "varation": 1}, "unknown label keys"),
        ({"task": "boil", "reward": "dense"}, "must be one of"),
        ({"task": "boil", "max_turns": 0}, "at least 1"),
        ("[1, 2]", "JSON object"),
    ]:
        with pytest.raises(ValueError, match=message):
            sw.TaskSpec.from_label(bad)


def test_textworld_express_label_parsing():
    twx = load(TWX_FILE, "twx_labels")
    spec = twx.GameSpec.from_label('{"seed": 12}')
    assert (spec.seed, spec.game, spec.fold, spec.params, spec.max_turns) == (
        12, "coin", "train", "", twx.DEFAULT_MAX_TURNS)
    for bad, message in [({"game": "coin"}, "needs a 'seed'"), ({"seed": 1, "gme": "x"}, "unknown label keys")]:
        with pytest.raises(ValueError, match=message):
            twx.GameSpec.from_label(bad)


def test_scienceworld_terminal_reward():
    sw = load(SW_FILE, "sw_reward")
    assert [sw.terminal_reward(s, "score") for s in (-100, 0, 25, 100)] == [0.0, 0.0, 0.25, 1.0]
    assert [sw.terminal_reward(s, "success") for s in (-100, 25, 99, 100)] == [0.0, 0.0, 0.0, 1.0]


# Real games.


def test_both_files_load_through_openrlhfs_own_loader():
    for path in (SW_FILE, TWX_FILE):
        executor = _load_agent_executor(str(path))
        assert isinstance(executor, MultiTurnAgentExecutor)
        assert executor.agent_instance_cls.__name__ == "AgentInstance"


def test_scienceworld_gold_path_with_invalid_actions(monkeypatch, sw_gold):
    jvms = track_jvms(monkeypatch, scienceworld, "ScienceWorldEnv")
    sw = load(SW_FILE, "sw_gold_path")
    agent = sw.AgentInstance()

    first = asyncio.run(agent.reset({"observation": "", "label": json.dumps(SW_TASK)}))["observation"]
    assert first.startswith(f"<|im_start|>system\n{sw.DEFAULT_INSTRUCTIONS}<|im_end|>\n<|im_start|>user\nTask: ")
    assert "find a(n) non-living thing" in first and "This room is called the hallway" in first
    assert first.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert len(jvms) == 1

    bad = asyncio.run(agent.step(act("dance wildly")))
    assert bad["rewards"].item() == 0.0 and not bad["done"]
    feedback = bad["environment_feedback"]
    assert feedback.startswith(
        '\n<|im_start|>user\nInvalid action: "dance wildly". No known action matches that input.'
    )
    assert feedback.endswith("<|im_end|>\n<|im_start|>assistant\n")
    examples = feedback.split("Some valid actions here: ")[1].split(".\n")[0].split("; ")
    assert len(examples) == sw.HINT_EXAMPLES
    assert set(examples) <= set(agent.episode.valid_actions)
    assert not any(e.startswith("focus on") for e in examples)

    blocked = asyncio.run(agent.step(act("Action: reset task")))
    assert 'Invalid action: "reset task"' in blocked["environment_feedback"] and not blocked["done"]

    rewards = [bad["rewards"].item(), blocked["rewards"].item()]
    for i, action in enumerate(sw_gold):
        reply = f"> {action}\nThat should help." if i % 2 else action.capitalize() + "."
        out = asyncio.run(agent.step(act(reply)))
        rewards.append(out["rewards"].item())
        last = i == len(sw_gold) - 1
        assert out["done"] is last
        # After every step the rewards so far (summed as OpenRLHF sums them) are the clipped score: an
        # episode that OpenRLHF cut here would keep its credit.
        earned = max(agent.episode.score, 0) / 100
        assert sum(rewards) == earned == out["extra_logs"]["env_score"]
        assert out["scores"].item() == pytest.approx(earned)
        if not last:
            assert out["environment_feedback"].endswith("<|im_start|>assistant\n")
            assert "Invalid action" not in out["environment_feedback"]
    assert rewards[:2] == [0.0, 0.0] and rewards[2] > 0.0  # the first gold step already scores
    assert sum(rewards) == 1.0 == sw.terminal_reward(100, "score") and out["scores"].item() == 1.0
    assert out["environment_feedback"] == ""
    assert out["extra_logs"] == {
        "env_score": 1.0, "env_success": 1.0, "env_invalid_actions": 2.0, "env_turns": float(len(sw_gold) + 2),
    }
    assert agent.episode.env is None and exited(jvms[0])
    with pytest.raises(RuntimeError, match="over"):
        asyncio.run(agent.step(act("look around")))


def test_scienceworld_turn_cap_ends_with_the_partial_score_or_no_success(monkeypatch, sw_gold):
    jvms = track_jvms(monkeypatch, scienceworld, "ScienceWorldEnv")
    sw = load(SW_FILE, "sw_cap")

    async def capped(mode):
        # Two gold steps under a two-turn cap: progress made, task not done.
        agent = sw.AgentInstance()
        await agent.reset({"observation": "", "label": {**SW_TASK, "max_turns": 2, "reward": mode}})
        return [await agent.step(act(action)) for action in sw_gold[:2]]

    async def both():  # concurrently, as a rollout actor runs its episodes
        return await asyncio.gather(capped("score"), capped("success"))

    for mode, (one, two) in zip(["score", "success"], asyncio.run(both())):
        assert not one["done"]
        assert two["done"] and two["extra_logs"]["env_turns"] == 2.0 and two["extra_logs"]["env_success"] == 0.0
        first, partial = one["extra_logs"]["env_score"], two["extra_logs"]["env_score"]
        assert 0.0 < first < partial < 1.0
        # Score mode pays the credit as it comes; success mode has none to pay.
        assert one["rewards"].item() == (first if mode == "score" else 0.0)
        assert one["rewards"].item() + two["rewards"].item() == (partial if mode == "score" else 0.0)
        assert two["scores"].item() == pytest.approx(partial if mode == "score" else 0.0)
    assert len(jvms) == 2 and all(exited(jvm) for jvm in jvms)


def test_scienceworld_failed_task_gives_its_credit_back_and_success_pays_only_a_win(monkeypatch, sw_gold):
    jvms = track_jvms(monkeypatch, scienceworld, "ScienceWorldEnv")
    sw = load(SW_FILE, "sw_modes")

    async def play(task, mode, actions):
        agent = sw.AgentInstance()
        await agent.reset({"observation": "", "label": {**task, "reward": mode}})
        outs, scores = [], []
        for action in actions:
            outs.append(await agent.step(act(action)))
            scores.append(agent.episode.score)
        return [o["rewards"].item() for o in outs], scores, outs[-1]

    async def all_three():  # concurrently, as a rollout actor runs its episodes
        return await asyncio.gather(
            play(SW_FAILING_TASK, "score", SW_FAILING_ACTIONS),
            play(SW_FAILING_TASK, "success", SW_FAILING_ACTIONS),
            play(SW_TASK, "success", sw_gold),
        )

    (failed, failed_scores, failed_last), (failed_success, _, _), (won, won_scores, won_last) = asyncio.run(all_three())
    assert failed_scores == [8, 25, -100] and failed_last["done"]
    # Score mode: credit paid as it comes, taken back by the failure; the total is the clipped final score,
    # as when the whole reward came at the end.
    assert failed == [0.08, 0.25 - 0.08, -0.25]
    assert [sum(failed[:k]) for k in (1, 2, 3)] == [0.08, 0.25, 0.0] == [max(s, 0) / 100 for s in failed_scores]
    assert failed_last["scores"].item() == 0.0 and failed_last["extra_logs"]["env_score"] == 0.0
    # Success mode: 0/1 is known only when the game is over, so nothing before; a cut episode earns 0.
    assert failed_success == [0.0, 0.0, 0.0]
    assert 0 < won_scores[0] and won_scores[-1] == 100 and won_last["done"]
    assert won == [0.0] * (len(sw_gold) - 1) + [1.0] and won_last["scores"].item() == 1.0
    assert len(jvms) == 3 and all(exited(jvm) for jvm in jvms)


def test_scienceworld_through_openrlhfs_executor(monkeypatch, sw_gold):
    jvms = track_jvms(monkeypatch, scienceworld, "ScienceWorldEnv")
    executor = _load_agent_executor(str(SW_FILE))
    replies = [f"Action: {a}" for a in sw_gold]
    result, engine = execute(executor, CHATML_PROMPT, json.dumps(SW_TASK), replies, max_length=20000)

    assert result["reward"] == 1.0 and float(result["scores"]) == 1.0
    assert result["extra_logs"]["env_success"] == 1.0 and not result["truncated"]
    assert "Play the game.\n\nTask: Your task is to find a(n) non-living thing" in engine.contexts[0]
    tokens = result["observation_tokens"]
    ranges = result["action_ranges"]
    assert ["".join(map(chr, tokens[s:e])) for s, e in ranges] == replies
    assert ranges[-1][1] == len(tokens)  # the sequence ends on the last action
    # Each later context is the previous one, the action, and the game's reply as a user turn.
    for (_, end), context in zip(ranges[:-1], engine.contexts[1:]):
        assert context[end:].startswith("\n<|im_start|>user\n") and context.endswith("<|im_start|>assistant\n")
    assert exited(jvms[0])


def test_scienceworld_episode_cut_by_the_token_budget_keeps_its_credit(monkeypatch):
    jvms = track_jvms(monkeypatch, scienceworld, "ScienceWorldEnv")
    executor = _load_agent_executor(str(SW_FILE))

    # The fourth reply runs into the context limit: OpenRLHF steps it (its first line is the action), then
    # stops without `done`.
    replies = SW_SCORING_ACTIONS[:3] + [SW_SCORING_ACTIONS[3] + "\n" + "z" * 100_000]
    result, engine = execute(executor, "", SW_TASK, replies, max_length=20000)
    assert result["truncated"] and len(result["action_ranges"]) == 4
    assert result["reward"] == 0.75 and float(result["scores"]) == pytest.approx(0.75)
    assert result["extra_logs"]["env_score"] == 0.75 and result["extra_logs"]["env_success"] == 0.0

    # The context before the fourth reply fills the budget: OpenRLHF stops after three steps, no reply cut.
    budget = len(engine.contexts[3])
    for mode, reward in [("score", 0.25), ("success", 0.0)]:
        result, engine = execute(executor, "", {**SW_TASK, "reward": mode}, SW_SCORING_ACTIONS, max_length=budget)
        assert len(engine.contexts) == 3 and len(result["action_ranges"]) == 3 and not result["truncated"]
        assert result["reward"] == reward and float(result["scores"]) == pytest.approx(reward)
        assert result["extra_logs"]["env_score"] == 0.25
    gc.collect()
    assert len(jvms) == 3 and all(exited(jvm) for jvm in jvms)


def test_textworld_express_gold_path_with_invalid_actions(monkeypatch, twx_gold):
    jvms = track_jvms(monkeypatch, textworld_express, "TextWorldExpressEnv")
    twx = load(TWX_FILE, "twx_gold_path")
    agent = twx.AgentInstance()

    first = asyncio.run(agent.reset({"observation": CHATML_PROMPT, "label": TWX_GAME}))["observation"]
    assert first.startswith(CHATML_PROMPT.split("Play the game.")[0])
    assert "Play the game.\n\nTask: Your task is to search the environment and find the coin." in first
    assert "You are in the" in first and first.endswith("<|im_end|>\n<|im_start|>assistant\n")

    bad = asyncio.run(agent.step(act("Take the golden coin")))
    assert bad["rewards"].item() == 0.0 and not bad["done"]
    feedback = bad["environment_feedback"]
    assert 'Invalid action: "take the golden coin". Unknown action' in feedback
    listed = feedback.split("Valid actions here: ")[1].split(".\n")[0].split("; ")
    assert "look around" in listed and twx_gold[0] in listed

    empty = asyncio.run(agent.step(act("\n\n")))
    assert "Invalid action: an empty reply. No action found" in empty["environment_feedback"]

    # The gold path, written the ways a model might write it.
    forms = ["{}", "{}.", "> {}", "Action: {}<|im_end|>", "{}\nbecause it is there"]
    replies = [forms[i % len(forms)].format(a.title() if i % 2 else a) for i, a in enumerate(twx_gold)]
    outs = [asyncio.run(agent.step(act(r))) for r in replies]
    assert [o["done"] for o in outs] == [False] * (len(outs) - 1) + [True]
    assert [o["rewards"].item() for o in outs] == [0.0] * (len(outs) - 1) + [1.0]
    assert "Invalid action" not in "".join(o["environment_feedback"] for o in outs)
    assert outs[-1]["environment_feedback"] == ""
    assert outs[-1]["extra_logs"] == {
        "env_success": 1.0, "env_invalid_actions": 2.0, "env_turns": float(len(twx_gold) + 2),
    }
    assert exited(jvms[0])


def test_textworld_express_turn_cap_gives_zero(monkeypatch, twx_gold):
    jvms = track_jvms(monkeypatch, textworld_express, "TextWorldExpressEnv")
    twx = load(TWX_FILE, "twx_cap")
    agent = twx.AgentInstance()
    asyncio.run(agent.reset({"observation": "", "label": {**TWX_GAME, "max_turns": 2}}))
    outs = [asyncio.run(agent.step(act(a))) for a in twx_gold[:2]]
    assert [o["done"] for o in outs] == [False, True]
    assert outs[-1]["rewards"].item() == 0.0 and outs[-1]["extra_logs"]["env_success"] == 0.0
    assert exited(jvms[0])


def test_textworld_express_episode_cut_by_the_token_budget_still_frees_its_jvm(monkeypatch):
    jvms = track_jvms(monkeypatch, textworld_express, "TextWorldExpressEnv")
    executor = _load_agent_executor(str(TWX_FILE))
    # One reply that runs into the context limit: OpenRLHF stops without another step().
    result, _ = execute(executor, "", TWX_GAME, ["look around\n" + "z" * 100_000], max_length=4096)
    assert result["truncated"] and len(result["action_ranges"]) == 1
    assert result["reward"] == 0.0
    gc.collect()
    assert len(jvms) == 1 and exited(jvms[0])
