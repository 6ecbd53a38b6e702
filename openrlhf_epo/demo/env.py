"""KeyDoor: a small multi-turn text environment where the reward comes only at the end.

A row of `rooms` rooms with walls at both ends. A key lies in one room and a locked door in
another; the agent starts in a third. It sees only the room it stands in, so it must explore,
remember what it has seen, pick up the key and go back to open the door. Reward 1 when it opens
the door holding the key, else 0 when the turn budget runs out.

Why it suits EPO: the reward is sparse and delayed over 10+ turns; each turn gives an observation;
success needs exploration in both directions, so a policy whose entropy collapses early onto "always
walk right" solves only the layouts that lie to its right, while one that never settles wastes turns.

The trap (`coin` > 0): a coin lies in the start room; taking it ends the episode at once with reward
`coin`, a small sure win next to the far goal's 1.0. Under the model's prior the coin is found often
and the goal rarely; once every episode of a group takes the coin, the group's rewards are equal,
its group-normalised advantages are 0 and nothing pushes the policy out: the trap absorbs. An
entropy term is meant to keep exploring long enough to find the goal first.

Every observation is exactly OBSERVATION_WORDS words and every action one word, so a batch of
episodes shares one token layout (no padding) under the word-level tokenizer of policy.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ACTIONS = ("left", "right", "take", "open")
CONTENTS = ("empty", "key", "door")
TRAP_CONTENT = "coin"  # a room's content only when the trap is on
HOLDING = ("nokey", "haskey")
FEEDBACK = ("start", "moved", "bump", "taken", "nothing", "locked", "opened", "over", "invalid")
TASK = "find the key then open the door"
OBSERVATION_WORDS = 4  # content, holding, feedback, and the prompt marker "act"
MIN_TURNS = 10


@dataclass
class KeyDoorConfig:
    rooms: int = 5
    max_turns: int = 0  # 0 = 3 * rooms, at least MIN_TURNS
    coin: float = 0.0  # the trap's reward (0: no coin); an exact binary fraction (0.25) keeps the host's group_norm exact

    def __post_init__(self) -> None:
        if not isinstance(self.rooms, int) or self.rooms < 3:
            raise ValueError(f"--env.rooms={self.rooms!r} is invalid: need an integer >= 3 (key, door and start)")
        if self.max_turns == 0:
            self.max_turns = max(MIN_TURNS, 3 * self.rooms)
        if not isinstance(self.max_turns, int) or self.max_turns < MIN_TURNS:
            raise ValueError(f"--env.max_turns={self.max_turns!r} is invalid: need an integer >= {MIN_TURNS}")
        if isinstance(self.coin, bool) or not isinstance(self.coin, (int, float)) or not 0 <= self.coin < 1:
            raise ValueError(f"--env.coin={self.coin!r} is invalid: need a number in [0, 1) (the goal is worth 1)")
        self.coin = float(self.coin)


class KeyDoorEnv:
    """One episode. Deterministic for a seed: the seed alone fixes the layout."""

    def __init__(self, config: KeyDoorConfig, seed: int):
        self.config = config
        start, key, door = random.Random(seed).sample(range(config.rooms), 3)
        self.position, self.key_room, self.door_room = start, key, door
        self.has_key = False
        self.coin_room = start if config.coin > 0 else None
        self.trapped = False  # took the coin
        self.turn = 0
        self.done = False
        self.reward = 0.0

    def _observation(self, feedback: str) -> str:
        if self.position == self.door_room:
            content = "door"
        elif self.position == self.key_room and not self.has_key:
            content = "key"
        elif self.position == self.coin_room:
            content = TRAP_CONTENT
        else:
            content = "empty"
        return f"{content} {HOLDING[self.has_key]} {feedback} act"

    def reset(self) -> str:
        return f"{TASK} . " + self._observation("start")

    def step(self, action: str) -> tuple[str, float, bool]:
        """Apply one action word; returns (observation, reward, done). Reward is non-zero only at the end:
        1 for the open door, `coin` for the coin.
        Anything but an action word (a free-text policy can say anything) wastes the turn."""
        if self.done:
            raise RuntimeError("step() after the episode ended")
        self.turn += 1
        if action not in ACTIONS:
            feedback = "invalid"
        elif action in ("left", "right"):
            target = self.position + (1 if action == "right" else -1)
            if 0 <= target < self.config.rooms:
                self.position, feedback = target, "moved"
            else:
                feedback = "bump"
        elif action == "take":
            if self.position == self.coin_room:
                feedback, self.reward, self.done, self.trapped = "taken", self.config.coin, True, True
            elif self.position == self.key_room and not self.has_key:
                self.has_key, feedback = True, "taken"
            else:
                feedback = "nothing"
        elif self.position != self.door_room:
            feedback = "nothing"
        elif not self.has_key:
            feedback = "locked"
        else:
            feedback, self.reward, self.done = "opened", 1.0, True
        if not self.done and self.turn >= self.config.max_turns:
            feedback, self.done = "over", True
        return self._observation(feedback), self.reward if self.done else 0.0, self.done


def vocabulary(coin: bool = False) -> list[str]:
    """Every word the environment can say or accept, for training the tokenizer; `coin`: with the
    trap's word (left out by default, so the KeyDoor model's tokenizer stays as it was)."""
    contents = list(CONTENTS) + ([TRAP_CONTENT] if coin else [])
    words = TASK.split() + ["."] + list(ACTIONS) + contents + list(HOLDING) + list(FEEDBACK) + ["act"]
    return list(dict.fromkeys(words))


def solve(config: KeyDoorConfig, seed: int) -> list[str]:
    """A shortest action sequence for the layout of `seed` (used by tests and as a sanity bound)."""
    env = KeyDoorEnv(config, seed)

    def walk(frm: int, to: int) -> list[str]:
        return ["right" if to > frm else "left"] * abs(to - frm)

    return walk(env.position, env.key_room) + ["take"] + walk(env.key_room, env.door_room) + ["open"]
