"""TextWorld-Express as an OpenRLHF 0.11.2 multi-turn environment: `--train.agent_func_path` this file.

OpenRLHF loads this file by path, takes `AgentExecutor` from it, and builds one `AgentInstance` per
rollout; it calls `reset` once and `step` after every generated action until `done`.

Dataset row (`--data.input_key prompt --data.label_key label`):
  prompt  the instructions for the model (empty: the built-in DEFAULT_INSTRUCTIONS). Plain text
          becomes the system message; with `--data.apply_chat_template` the templated ChatML prompt is
          kept and the first observation is appended to its last user message.
  label   a JSON object (or its string): {"game": "coin", "seed": 7, "fold": "train",
          "params": "numLocations=5,includeDoors=1,numDistractorItems=0", "max_turns": 30}.
          Only "seed" is required; "game" defaults to "coin", "fold" to "train" (seeds 0-999 are train,
          10000+ dev), "params" to the game's defaults.

Reward: sparse success. Every step but the last gives 0; the last one (game won, game lost, or the
max_turns cap) gives 1.0 if the game was won, else 0.0. For `coin` that is taking the coin.

Chat format: ChatML (Qwen family). Another model family needs other turn markers below.
The JVM that each episode starts is shut down when the episode ends.
"""

import asyncio
import json
import re
from dataclasses import dataclass, field

import torch
from textworld_express import TextWorldExpressEnv

from openrlhf.utils.agent import AgentInstanceBase, MultiTurnAgentExecutor

DEFAULT_INSTRUCTIONS = (
    "You are playing a text adventure game. Each turn you receive an observation. Reply with exactly one "
    "action on a single line and nothing else, for example: move north\n"
    "Action forms: look around, inventory, move DIRECTION, open door to DIRECTION, "
    "close door to DIRECTION, take OBJ, put OBJ in OBJ."
)
DEFAULT_GAME = "coin"
DEFAULT_MAX_TURNS = 30
HINT_EXAMPLES = 12
INVALID_REPLY = "Unknown action"

# ChatML turn markers.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ASSISTANT_OPEN = f"{IM_START}assistant\n"
TEMPLATED_TAIL = f"{IM_END}\n{ASSISTANT_OPEN}"

_ACTION_PREFIX = re.compile(r"^(?:>\s*|action\s*:\s*)+", re.IGNORECASE)


def parse_action(text: str) -> str:
    """The action in a model reply: its first non-empty line, without a '> ' or 'Action:' prefix.
    Lower-cased: the game's parser matches lower-case commands only."""
    text = text.split("<|", 1)[0]  # any special token the decoder kept marks the end of the reply
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = _ACTION_PREFIX.sub("", line).strip().strip("`\"'").rstrip(".").strip()
    return " ".join(line.lower().split())


def first_turn(prompt: str, observation: str) -> str:
    """The opening context: the row's instructions, the first observation, then the assistant's turn."""
    if prompt.endswith(TEMPLATED_TAIL):
        head = prompt[: -len(TEMPLATED_TAIL)]
        if head.endswith(f"{IM_START}user\n"):  # the row's prompt was empty
            head += DEFAULT_INSTRUCTIONS
        return f"{head}\n\n{observation}{TEMPLATED_TAIL}"
    if IM_START in prompt:
        raise ValueError(
            "the prompt is chat-formatted but does not end with a ChatML generation prompt "
            f"({TEMPLATED_TAIL!r}); pass plain instructions, or a ChatML template"
        )
    system = prompt.strip() or DEFAULT_INSTRUCTIONS
    return f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{observation}{IM_END}\n{ASSISTANT_OPEN}"


def feedback_turn(observation: str) -> str:
    # No closing marker for the assistant's turn: its <|im_end|> is the stop token, which vLLM keeps in
    # the token ids (the ones trained on) though not in the text.
    return f"\n{IM_START}user\n{observation}{IM_END}\n{ASSISTANT_OPEN}"


@dataclass(frozen=True)
class GameSpec:
    seed: int
    game: str = DEFAULT_GAME
    fold: str = "train"
    params: str = ""
    max_turns: int = DEFAULT_MAX_TURNS

    @classmethod
    def from_label(cls, label) -> "GameSpec":
        if isinstance(label, str):
            if not label.strip():
                raise ValueError("empty label: set --data.label_key to the column holding the game JSON")
            label = json.loads(label)
        if not isinstance(label, dict):
            raise ValueError(f"label must be a JSON object, got {type(label).__name__}")
        # A dataset with a struct column fills keys missing from a row with None: those take defaults.
        given = {key: value for key, value in label.items() if value is not None}
        unknown = set(given) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown label keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        if "seed" not in given:
            raise ValueError("label needs a 'seed': it picks the game instance")
        spec = cls(
            seed=int(given["seed"]),
            game=str(given.get("game", DEFAULT_GAME)),
            fold=str(given.get("fold", "train")),
            params=str(given.get("params", "")),
            max_turns=int(given.get("max_turns", DEFAULT_MAX_TURNS)),
        )
        if spec.max_turns < 1:
            raise ValueError("label 'max_turns' must be at least 1")
        return spec


def initial_observation(task_description: str, observation: str) -> str:
    return f"Task: {task_description.strip()}\n\n{observation.strip()}"


def is_invalid(observation: str) -> bool:
    return observation.strip().startswith(INVALID_REPLY)


def invalid_action_feedback(action: str, reason: str, valid_actions) -> str:
    """Tells the model its action was not understood, with actions that would be."""
    shown = f'"{action}"' if action else "an empty reply"
    return (
        f"Invalid action: {shown}. {reason}\n"
        f"Valid actions here: {'; '.join(valid_actions[:HINT_EXAMPLES])}.\n"
        "Reply with exactly one action on one line."
    )


@dataclass
class Outcome:
    observation: str
    reward: float
    done: bool
    logs: dict = field(default_factory=dict)


class TextWorldExpressEpisode:
    """One game in its own JVM, synchronous: `start`, then `act` until `done`."""

    def __init__(self, spec: GameSpec):
        self.spec = spec
        self.env = None
        self.turns = 0
        self.invalid_actions = 0
        self.won = False
        self.valid_actions = []
        self.done = False

    def start(self) -> str:
        self.env = TextWorldExpressEnv(envStepLimit=self.spec.max_turns)
        try:
            observation, info = self.env.reset(
                seed=self.spec.seed, gameFold=self.spec.fold, gameName=self.spec.game, gameParams=self.spec.params
            )
        except Exception:
            self.close()
            raise
        self.valid_actions = info["validActions"]
        return initial_observation(info["taskDescription"], observation)

    def act(self, reply: str) -> Outcome:
        if self.done:
            raise RuntimeError("the episode is over")
        self.turns += 1
        action = parse_action(reply)
        completed = False
        if action:
            observation, _, completed, info = self.env.step(action)
            self.won, self.valid_actions = bool(info["tasksuccess"]), info["validActions"]
            invalid = is_invalid(observation)
        else:
            observation, invalid = "No action found in the reply.", True
        if invalid:
            self.invalid_actions += 1
            observation = invalid_action_feedback(action, observation.strip(), self.valid_actions)
        self.done = completed or self.turns >= self.spec.max_turns
        reward = float(self.won) if self.done else 0.0
        if self.done:
            self.close()
        return Outcome(observation.strip(), reward, self.done, self.logs())

    def logs(self) -> dict:
        # Same keys on every step: OpenRLHF keeps the last step's and batches them across episodes.
        return {
            "env_success": float(self.won),
            "env_invalid_actions": float(self.invalid_actions),
            "env_turns": float(self.turns),
        }

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            env.close()


class AgentInstance(AgentInstanceBase):
    """OpenRLHF's per-rollout environment. JVM calls block, so they run in a worker thread, off the
    rollout actor's event loop. A game OpenRLHF abandons (context budget spent) is closed by
    TextWorldExpressEnv's own finaliser when this instance is dropped."""

    def __init__(self, *args, **kwargs):
        self.episode = None

    async def reset(self, states: dict, **kwargs):
        self.episode = TextWorldExpressEpisode(GameSpec.from_label(states["label"]))
        observation = await asyncio.to_thread(self.episode.start)
        return {"observation": first_turn(states["observation"], observation)}

    async def step(self, states: dict, **kwargs):
        outcome = await asyncio.to_thread(self.episode.act, states["action_text"])
        return {
            "rewards": torch.tensor(outcome.reward),
            "scores": torch.tensor(outcome.reward),
            # Nothing follows the last action, so the sequence ends on it.
            "environment_feedback": "" if outcome.done else feedback_turn(outcome.observation),
            "done": outcome.done,
            "extra_logs": outcome.logs,
        }


class AgentExecutor(MultiTurnAgentExecutor):
    def __init__(self):
        super().__init__(AgentInstance)
