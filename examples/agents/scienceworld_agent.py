"""ScienceWorld as an OpenRLHF 0.11.2 multi-turn environment: `--train.agent_func_path` this file.

OpenRLHF loads this file by path, takes `AgentExecutor` from it, and builds one `AgentInstance` per
rollout; it calls `reset` once and `step` after every generated action until `done`.

Dataset row (`--data.input_key prompt --data.label_key label`):
  prompt  the instructions for the model (empty: the built-in DEFAULT_INSTRUCTIONS). Plain text
          becomes the system message; with `--data.apply_chat_template` the templated ChatML prompt is
          kept and the first observation is appended to its last user message.
  label   a JSON object (or its string): {"task": "find-non-living-thing", "variation": 0,
          "simplifications": "", "max_turns": 40, "reward": "score"}. Only "task" is required; "task"
          is any ScienceWorld task name or id.

Reward: OpenRLHF sums the step rewards, and stops an episode after any step once its context budget
(--data.max_len) is spent, so each step pays what the episode earned since the last one. "reward": "score"
(the default, ScienceWorld's own metric, partial credit for sub-goals): the rewards so far always sum to
max(score, 0) / 100, so an episode cut short keeps its credit (and a failed task, score below 0, gives it
back). "reward": "success": 1.0 on the step that reaches a full score, else 0 (an episode cut short has not
succeeded).

Chat format: ChatML (Qwen family). Another model family needs other turn markers (in text_game_agent.py).
The JVM that each episode starts is shut down when the episode ends.
"""

import random
import sys
from dataclasses import dataclass
from pathlib import Path

from scienceworld import ScienceWorldEnv

from openrlhf.utils.agent import MultiTurnAgentExecutor

# OpenRLHF loads this file by path, not as part of a package: make its sibling importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))
# parse_action and feedback_turn are part of this file's interface too (the tests call them here).
from text_game_agent import EpisodeAgentInstance, GameEpisode, feedback_turn, initial_observation, label_fields, parse_action  # noqa: E402,F401
from text_game_agent import first_turn as chatml_first_turn  # noqa: E402

DEFAULT_INSTRUCTIONS = (
    "You are an agent in ScienceWorld, a text simulation of elementary science experiments. "
    "Each turn you receive an observation. Reply with exactly one action on a single line and nothing "
    "else, for example: open door to kitchen\n"
    "Action forms: look around, look at OBJ, look in OBJ, open OBJ, close OBJ, go to LOCATION, "
    "pick up OBJ, put down OBJ, move OBJ to OBJ, pour OBJ in OBJ, mix OBJ, activate OBJ, deactivate OBJ, "
    "use OBJ on OBJ, connect OBJ to OBJ, read OBJ, eat OBJ, inventory, wait, focus on OBJ.\n"
    "Focus on an object only when the task asks for it: focusing on the wrong one can fail the task. "
    "When the game lists numbered choices, reply with the number."
)
DEFAULT_MAX_TURNS = 40
REWARD_MODES = ("score", "success")

# Resetting would wipe the episode the reward is computed from; the model is not offered it.
BLOCKED_ACTIONS = frozenset({"reset task"})
# Left out of the hint's examples: "focus on" can end the task, the others swamp the list.
HINT_SKIPPED_VERBS = ("focus on", "connect", "disconnect", "reset task", "wait1")
HINT_EXAMPLES = 6
INVALID_REPLIES = ("No known action matches that input.", "Unknown action.")


def first_turn(prompt: str, observation: str) -> str:
    """The opening context: the row's instructions (or DEFAULT_INSTRUCTIONS), the first observation,
    then the assistant's turn."""
    return chatml_first_turn(prompt, observation, DEFAULT_INSTRUCTIONS)


@dataclass(frozen=True)
class TaskSpec:
    task: str
    variation: int = 0
    simplifications: str = ""
    max_turns: int = DEFAULT_MAX_TURNS
    reward: str = "score"

    @classmethod
    def from_label(cls, label) -> "TaskSpec":
        given = label_fields(label, cls.__dataclass_fields__, "task", "a ScienceWorld task name or id", "task")
        spec = cls(
            task=str(given["task"]),
            variation=int(given.get("variation", 0)),
            simplifications=str(given.get("simplifications", "")),
            max_turns=int(given.get("max_turns", DEFAULT_MAX_TURNS)),
            reward=str(given.get("reward", "score")),
        )
        if spec.reward not in REWARD_MODES:
            raise ValueError(f"label 'reward' must be one of {REWARD_MODES}, got {spec.reward!r}")
        if spec.max_turns < 1:
            raise ValueError("label 'max_turns' must be at least 1")
        return spec


def is_invalid(observation: str) -> bool:
    return observation.strip().startswith(INVALID_REPLIES)


def invalid_action_feedback(action: str, reason: str, valid_actions, rng: random.Random) -> str:
    """Tells the model its action was not understood, with a few actions that would be."""
    candidates = [a for a in valid_actions if not a.startswith(HINT_SKIPPED_VERBS)]
    examples = rng.sample(candidates, min(HINT_EXAMPLES, len(candidates)))
    shown = f'"{action}"' if action else "an empty reply"
    return (
        f"Invalid action: {shown}. {reason}\n"
        f"Some valid actions here: {'; '.join(examples)}.\n"
        "Reply with exactly one action on one line."
    )


def terminal_reward(score: int, mode: str) -> float:
    """Episode reward from ScienceWorld's 0..100 score (negative when the task was failed). In "score" mode
    it is also the credit earned so far while the episode runs."""
    if mode == "success":
        return 1.0 if score >= 100 else 0.0
    return max(score, 0) / 100.0


class ScienceWorldEpisode(GameEpisode):
    """One ScienceWorld episode in its own JVM."""

    def __init__(self, spec: TaskSpec):
        super().__init__(spec)
        self.score = 0
        self.paid = 0.0  # the sum of the rewards returned so far, as OpenRLHF adds them up
        self._rng = random.Random(f"{spec.task}/{spec.variation}")

    def _reset(self) -> str:
        self.env = ScienceWorldEnv("", envStepLimit=self.spec.max_turns)
        self.env.load(self.spec.task, self.spec.variation, self.spec.simplifications)
        look, info = self.env.reset()
        self.valid_actions = info["valid"]
        return initial_observation(self.env.get_task_description(), look)

    def _step(self, action: str):
        if action in BLOCKED_ACTIONS:
            return f'"{action}" is not available in this episode.', False, True
        observation, _, completed, info = self.env.step(action)
        self.score, self.valid_actions = info["score"], info["valid"]
        return observation, completed, is_invalid(observation)

    def _invalid_feedback(self, action: str, reason: str) -> str:
        return invalid_action_feedback(action, reason, self.valid_actions, self._rng)

    def _reward(self) -> float:
        # OpenRLHF may stop after this step without a `done` (context budget spent) and keeps the sum of the
        # rewards so far, so pay what was earned and not yet paid (negative when a failure takes it back).
        reward = self.earned() - self.paid
        self.paid += reward
        return reward

    def earned(self) -> float:
        """The episode's reward if it stopped now: the score's partial credit counts at once, success only
        once the game is over."""
        if self.spec.reward == "score" or self.done:
            return terminal_reward(self.score, self.spec.reward)
        return 0.0

    def logs(self) -> dict:
        # Same keys on every step: OpenRLHF keeps the last step's and batches them across episodes.
        return {
            "env_score": max(self.score, 0) / 100.0,
            "env_success": float(self.score >= 100),
            "env_invalid_actions": float(self.invalid_actions),
            "env_turns": float(self.turns),
        }


class AgentInstance(EpisodeAgentInstance):
    """One ScienceWorld episode per rollout. An episode OpenRLHF abandons (context budget spent) is closed
    by ScienceWorldEnv's own finaliser when this instance is dropped."""

    instructions = DEFAULT_INSTRUCTIONS

    def new_episode(self, label):
        return ScienceWorldEpisode(TaskSpec.from_label(label))


class AgentExecutor(MultiTurnAgentExecutor):
    def __init__(self):
        super().__init__(AgentInstance)
