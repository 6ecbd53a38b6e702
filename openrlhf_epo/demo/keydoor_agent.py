"""KeyDoor as an OpenRLHF 0.11.2 multi-turn environment: `--train.agent_func_path` this file.

OpenRLHF loads the file by path, takes `AgentExecutor` from it and builds one `AgentInstance` per
rollout: `reset` once, then `step` after every generated reply until `done`. The demo runs it; on GPUs
it is a toy any chat model can play (`python -m openrlhf_epo.demo.keydoor_agent` prints its path).

Dataset row (`--data.input_key prompt --data.label_key label`): a non-empty prompt becomes a system
turn before the first observation (a chat model's instructions; the demo's tiny model gets none and
learns from reward alone); the label is a JSON object (or its string) {"seed": 7, "rooms": 5,
"max_turns": 15, "coin": 0.25}; only "seed" is required. "coin" > 0 turns on the trap task: a coin
in the start room whose taking ends the episode with that reward.

A reply's first word, in lower case, is the action (left, right, take, open); anything else wastes
the turn. Reward: 1.0 on the step that opens the door holding the key, `coin` on the step that takes
the coin, else 0. Logged per episode: env_success (the goal), env_trapped (the coin), env_turns,
env_invalid_actions. ChatML turn markers.
"""

import json
import sys
from pathlib import Path

import torch

from openrlhf.utils.agent import AgentInstanceBase, MultiTurnAgentExecutor

from openrlhf_epo.demo.env import KeyDoorConfig, KeyDoorEnv
from openrlhf_hooks.testing.tiny_model import IM_END, IM_START

LABEL_KEYS = ("seed", "rooms", "max_turns", "coin")


def user_turn(observation: str) -> str:
    return f"{IM_START}user\n{observation}{IM_END}\n{IM_START}assistant\n"


def first_turn(instructions: str, observation: str) -> str:
    system = f"{IM_START}system\n{instructions}{IM_END}\n" if instructions.strip() else ""
    return system + user_turn(observation)


def episode_from_label(label) -> KeyDoorEnv:
    if isinstance(label, str):
        label = json.loads(label)
    if not isinstance(label, dict) or "seed" not in label:
        raise ValueError(f"a KeyDoor label is a JSON object with a 'seed', got {label!r}")
    unknown = set(label) - set(LABEL_KEYS)
    if unknown:
        raise ValueError(f"unknown KeyDoor label keys {sorted(unknown)}; known: {list(LABEL_KEYS)}")
    sizes = {k: int(label[k]) for k in ("rooms", "max_turns") if label.get(k) is not None}
    coin = {"coin": float(label["coin"])} if label.get("coin") is not None else {}
    config = KeyDoorConfig(**sizes, **coin)
    return KeyDoorEnv(config, int(label["seed"]))


class AgentInstance(AgentInstanceBase):
    def __init__(self, *args, **kwargs):
        self.env = None
        self.invalid = 0

    async def reset(self, states: dict, **kwargs):
        self.env = episode_from_label(states["label"])
        return {"observation": first_turn(states["observation"] or "", self.env.reset())}

    async def step(self, states: dict, **kwargs):
        words = states["action_text"].split()
        action = words[0].lower() if words else ""
        observation, reward, done = self.env.step(action)
        self.invalid += observation.split()[2] == "invalid"
        return {
            "rewards": torch.tensor(reward, dtype=torch.float64),
            "scores": torch.tensor(reward),
            # The reply's stop token (<|im_end|>) is in the generated ids; the next turn opens a line later.
            "environment_feedback": "" if done else "\n" + user_turn(observation),
            "done": done,
            # Same keys every step: OpenRLHF keeps the last step's, so an episode cut short by the
            # context budget reports where it stood.
            "extra_logs": {
                "env_success": float(reward == 1.0),
                "env_trapped": float(self.env.trapped),
                "env_turns": float(self.env.turn),
                "env_invalid_actions": float(self.invalid),
            },
        }


class AgentExecutor(MultiTurnAgentExecutor):
    def __init__(self):
        super().__init__(AgentInstance)


if __name__ == "__main__":
    print(Path(__file__).resolve())
    sys.exit(0)
