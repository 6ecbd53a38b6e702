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

Chat format: ChatML (Qwen family). Another model family needs other turn markers (in text_game_agent.py).
The JVM that each episode starts is shut down when the episode ends.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from textworld_express import TextWorldExpressEnv

from openrlhf.utils.agent import MultiTurnAgentExecutor

# OpenRLHF loads this file by path, not as part of a package: make its sibling importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))
# parse_action and feedback_turn are part of this file's interface too (the tests call them here).
from text_game_agent import EpisodeAgentInstance, GameEpisode, feedback_turn, initial_observation, label_fields, parse_action  # noqa: E402,F401
from text_game_agent import first_turn as chatml_first_turn  # noqa: E402

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


def first_turn(prompt: str, observation: str) -> str:
    """The opening context: the row's instructions (or DEFAULT_INSTRUCTIONS), the first observation,
    then the assistant's turn."""
    return chatml_first_turn(prompt, observation, DEFAULT_INSTRUCTIONS)


@dataclass(frozen=True)
class GameSpec:
    seed: int
    game: str = DEFAULT_GAME
    fold: str = "train"
    params: str = ""
    max_turns: int = DEFAULT_MAX_TURNS

    @classmethod
    def from_label(cls, label) -> "GameSpec":
        given = label_fields(label, cls.__dataclass_fields__, "seed", "it picks the game instance", "game")
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


class TextWorldExpressEpisode(GameEpisode):
    """One TextWorld-Express game in its own JVM."""

    def __init__(self, spec: GameSpec):
        super().__init__(spec)
        self.won = False

    def _reset(self) -> str:
        self.env = TextWorldExpressEnv(envStepLimit=self.spec.max_turns)
        observation, info = self.env.reset(
            seed=self.spec.seed, gameFold=self.spec.fold, gameName=self.spec.game, gameParams=self.spec.params
        )
        self.valid_actions = info["validActions"]
        return initial_observation(info["taskDescription"], observation)

    def _step(self, action: str):
        observation, _, completed, info = self.env.step(action)
        self.won, self.valid_actions = bool(info["tasksuccess"]), info["validActions"]
        return observation, completed, is_invalid(observation)

    def _invalid_feedback(self, action: str, reason: str) -> str:
        return invalid_action_feedback(action, reason, self.valid_actions)

    def _reward(self) -> float:
        return float(self.won) if self.done else 0.0

    def logs(self) -> dict:
        # Same keys on every step: OpenRLHF keeps the last step's and batches them across episodes.
        return {
            "env_success": float(self.won),
            "env_invalid_actions": float(self.invalid_actions),
            "env_turns": float(self.turns),
        }


class AgentInstance(EpisodeAgentInstance):
    """One TextWorld-Express game per rollout. A game OpenRLHF abandons (context budget spent) is closed
    by TextWorldExpressEnv's own finaliser when this instance is dropped."""

    instructions = DEFAULT_INSTRUCTIONS

    def new_episode(self, label):
        return TextWorldExpressEpisode(GameSpec.from_label(label))


class AgentExecutor(MultiTurnAgentExecutor):
    def __init__(self):
        super().__init__(AgentInstance)
