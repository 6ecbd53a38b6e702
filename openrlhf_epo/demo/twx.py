"""TextWorld-Express for `--model smollm2`: one text game per episode, played by a pretrained
instruct model that writes one action per turn.

The `textworld_express` package runs each game in a JVM of its own (one `TextWorldExpressEnv` holds
one game), so every episode here owns one JVM: it starts in `reset` (about 0.7 s of CPU on the
demo machine) and shuts down as soon as the episode ends, or on `close`, whichever comes first.

Reward is sparse: 0 on every step except the last, which gives 1.0 if the game was won. An episode
ends when the game is won or lost, or after `max_turns` actions.

Every observation lists the actions the game accepts right now (sorted, so a seed fixes the text):
a 135M-parameter model rarely guesses the game's command grammar on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

import textworld_express
from textworld_express import GAME_NAMES

INSTRUCTIONS = (
    "You are playing a text adventure game. Each turn, reply with exactly one action on one line and "
    "nothing else. Actions look like: look around, inventory, move north, take coin, open door to west."
)
LISTED_ACTIONS = 12  # cooking games accept dozens of actions; the first few keep each turn short


@dataclass(frozen=True)
class TWXConfig:
    game: str = "coin"
    # Two rooms, no doors, no distractors: the coin is in the start room or the next one, so a won
    # game takes one or two actions and a fresh instruct model sometimes wins it.
    params: str = "numLocations=2,includeDoors=0,numDistractorItems=0"
    max_turns: int = 10


def twx_config(**values: Any) -> TWXConfig:
    """A TWXConfig from `--env.<field>` values; each error is one line that names the flag."""
    known = [f.name for f in fields(TWXConfig)]
    for key in values:
        if key not in known:
            raise ValueError(f"--env.{key} is invalid: not a TextWorld-Express option; options: {', '.join(known)}")
    config = TWXConfig(**values)
    if config.game not in GAME_NAMES:
        raise ValueError(f"--env.game={config.game!r} is invalid: choose one of {', '.join(sorted(GAME_NAMES))}")
    if not isinstance(config.params, str) or any(
        "=" not in item or not item.split("=", 1)[0].strip() for item in config.params.split(",") if item.strip()
    ):
        raise ValueError(f"--env.params={config.params!r} is invalid: expected comma-separated NAME=VALUE pairs")
    if isinstance(config.max_turns, bool) or not isinstance(config.max_turns, int) or config.max_turns < 1:
        raise ValueError(f"--env.max_turns={config.max_turns!r} is invalid: need an integer >= 1")
    return config


def parse_action(reply: str) -> str:
    """The command in a model reply: its first non-empty line, lower-cased (the game's parser only
    knows lower case), without the prompt marker, quotes or full stop that models wrap it in."""
    line = next((line for line in reply.splitlines() if line.strip()), "")
    return " ".join(line.strip(" \t>.\"'`").lower().split())


class TextWorldExpressEnv:
    """One episode of a TextWorld-Express game. Deterministic for a seed: the seed picks the game
    instance and the text of every turn."""

    def __init__(self, config: TWXConfig, seed: int):
        self.config = config
        self.seed = seed
        self.game: Optional[Any] = None  # the package's env, with its JVM, between reset and the end
        self.turn = 0
        self.done = False
        self.valid_actions: list[str] = []

    def _describe(self, text: str) -> str:
        # the game pads sentences with double and trailing spaces: each one is a token in the context
        lines = [" ".join(line.split()) for line in text.strip().splitlines()]
        return "\n".join(lines + [f"Valid actions: {', '.join(self.valid_actions[:LISTED_ACTIONS])}."])

    def reset(self) -> str:
        self.close()
        self.turn, self.done = 0, False
        self.game = textworld_express.TextWorldExpressEnv()  # step counts turns itself, not via its limit
        try:
            text, info = self.game.reset(
                seed=self.seed, gameFold="train", gameName=self.config.game, gameParams=self.config.params
            )
        except ValueError as exc:  # the game rejects parameters it does not know or cannot build
            self.close()
            raise ValueError(f"--env.params={self.config.params!r} is invalid: {' '.join(str(exc).split())}") from None
        except BaseException:
            self.close()
            raise
        self.valid_actions = sorted(info["validActions"])
        return f"{INSTRUCTIONS}\nTask: {' '.join(info['taskDescription'].split())}\n{self._describe(text)}"

    def step(self, action: str) -> tuple[str, float, bool]:
        """Send one reply to the game; returns (observation, reward, done)."""
        if self.done or self.game is None:
            raise RuntimeError("step() before reset() or after the episode ended")
        self.turn += 1
        command = parse_action(action)
        if command:
            text, _, _, info = self.game.step(command)
            won, lost = bool(info["tasksuccess"]), bool(info["taskfailure"])
            self.valid_actions = sorted(info["validActions"])
        else:  # an empty reply is a wasted turn, and the game has nothing to say to it
            text, won, lost = "You did not write an action.", False, False
        self.done = won or lost or self.turn >= self.config.max_turns
        observation = self._describe(text)
        if self.done:
            self.close()
        return observation, 1.0 if (self.done and won) else 0.0, self.done

    def close(self) -> None:
        """Shut the episode's JVM down; safe to call more than once."""
        game, self.game = self.game, None
        if game is not None:
            game.close()
