"""What the text-game agent files here share: the ChatML turn format, reply parsing, label decoding,
and the OpenRLHF AgentInstance that runs one synchronous game episode per rollout.

Not an agent file itself: the game files import it (OpenRLHF loads an agent file by path, so each
puts this folder on sys.path first).
"""

import asyncio
import json
import re
from dataclasses import dataclass, field

import torch

from openrlhf.utils.agent import AgentInstanceBase

# ChatML turn markers.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ASSISTANT_OPEN = f"{IM_START}assistant\n"
TEMPLATED_TAIL = f"{IM_END}\n{ASSISTANT_OPEN}"

_ACTION_PREFIX = re.compile(r"^(?:>\s*|action\s*:\s*)+", re.IGNORECASE)


def parse_action(text: str) -> str:
    """The action in a model reply: its first non-empty line, without a '> ' or 'Action:' prefix.
    Lower-cased: the games' parsers match lower-case commands only."""
    text = text.split("<|", 1)[0]  # any special token the decoder kept marks the end of the reply
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    line = _ACTION_PREFIX.sub("", line).strip().strip("`\"'").rstrip(".").strip()
    return " ".join(line.lower().split())


def first_turn(prompt: str, observation: str, instructions: str) -> str:
    """The opening context: the row's instructions (or `instructions` when it has none), the first
    observation, then the assistant's turn."""
    if prompt.endswith(TEMPLATED_TAIL):
        head = prompt[: -len(TEMPLATED_TAIL)]
        if head.endswith(f"{IM_START}user\n"):  # the row's prompt was empty
            head += instructions
        return f"{head}\n\n{observation}{TEMPLATED_TAIL}"
    if IM_START in prompt:
        raise ValueError(
            "the prompt is chat-formatted but does not end with a ChatML generation prompt "
            f"({TEMPLATED_TAIL!r}); pass plain instructions, or a ChatML template"
        )
    system = prompt.strip() or instructions
    return f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{observation}{IM_END}\n{ASSISTANT_OPEN}"


def feedback_turn(observation: str) -> str:
    # No closing marker for the assistant's turn: its <|im_end|> is the stop token, which vLLM keeps in
    # the token ids (the ones trained on) though not in the text.
    return f"\n{IM_START}user\n{observation}{IM_END}\n{ASSISTANT_OPEN}"


def label_fields(label, known, required: str, why: str, what: str) -> dict:
    """A dataset row's label (a JSON object or its string) as {key: value}, checked against the
    `known` keys; `required` must be present (`why` says what it is for)."""
    if isinstance(label, str):
        if not label.strip():
            raise ValueError(f"empty label: set --data.label_key to the column holding the {what} JSON")
        label = json.loads(label)
    if not isinstance(label, dict):
        raise ValueError(f"label must be a JSON object, got {type(label).__name__}")
    # A dataset with a struct column fills keys missing from a row with None: those take defaults.
    given = {key: value for key, value in label.items() if value is not None}
    unknown = set(given) - set(known)
    if unknown:
        raise ValueError(f"unknown label keys {sorted(unknown)}; known: {sorted(known)}")
    if required not in given:
        raise ValueError(f"label needs a '{required}' ({why})")
    return given


def initial_observation(task_description: str, observation: str) -> str:
    return f"Task: {task_description.strip()}\n\n{observation.strip()}"


@dataclass
class Outcome:
    observation: str
    reward: float  # this step's part of the episode reward: OpenRLHF adds up the steps' parts
    done: bool
    logs: dict = field(default_factory=dict)


class GameEpisode:
    """One game in its own JVM, synchronous: `start`, then `act` until `done`. A game file's subclass
    provides `_reset()` (starts `self.env`, returns the first observation), `_step(action)` (returns
    the observation, whether the game is over, whether the action was invalid), `_invalid_feedback`,
    `_reward()` (this step's part of the episode reward, once `done` is set) and `logs()`."""

    def __init__(self, spec):
        self.spec = spec  # has max_turns
        self.env = None
        self.turns = 0
        self.invalid_actions = 0
        self.valid_actions = []
        self.done = False

    def start(self) -> str:
        try:
            return self._reset()
        except Exception:
            self.close()
            raise

    def act(self, reply: str) -> Outcome:
        if self.done:
            raise RuntimeError("the episode is over")
        self.turns += 1
        action = parse_action(reply)
        if action:
            observation, completed, invalid = self._step(action)
        else:
            observation, completed, invalid = "No action found in the reply.", False, True
        if invalid:
            self.invalid_actions += 1
            observation = self._invalid_feedback(action, observation.strip())
        self.done = completed or self.turns >= self.spec.max_turns
        reward = self._reward()
        if self.done:
            self.close()
        return Outcome(observation.strip(), reward, self.done, self.logs())

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            env.close()


class EpisodeAgentInstance(AgentInstanceBase):
    """OpenRLHF's per-rollout environment around one game episode (`start()`, then `act(text)` until
    done). Game calls block on their JVM, so they run in a worker thread, off the rollout actor's
    event loop. A subclass sets `instructions` and `new_episode(label)`."""

    instructions = ""

    def __init__(self, *args, **kwargs):
        self.episode = None
        self.total_reward = 0.0

    async def reset(self, states: dict, **kwargs):
        self.episode = self.new_episode(states["label"])
        self.total_reward = 0.0
        observation = await asyncio.to_thread(self.episode.start)
        return {"observation": first_turn(states["observation"], observation, self.instructions)}

    async def step(self, states: dict, **kwargs):
        outcome = await asyncio.to_thread(self.episode.act, states["action_text"])
        self.total_reward += outcome.reward
        return {
            # OpenRLHF sums the step rewards (float64, so that its sum is exactly total_reward) but keeps only
            # the last step's scores: the scores are the episode's reward so far.
            "rewards": torch.tensor(outcome.reward, dtype=torch.float64),
            "scores": torch.tensor(self.total_reward),
            # Nothing follows the last action, so the sequence ends on it.
            "environment_feedback": "" if outcome.done else feedback_turn(outcome.observation),
            "done": outcome.done,
            "extra_logs": outcome.logs,
        }
