"""K: how many RL steps train the actor, i.e. how many times OpenRLHF 0.11.2 calls the actor's `fit`.

The launcher counts it once, in the driver, before Ray starts, and hands it to every rank in the
host's args (settings["rl_steps"]). The arithmetic follows the host's own loop:

- prompts: `prepare_datasets` (openrlhf/trainer/ppo_trainer.py:26-49) loads
  `blending_datasets(..., max_count=data.max_samples)` and keeps `min(data.max_samples, len)` rows;
  PromptDataset keeps every row and its dataloader (batch 1, drop_last) drops none.
- batches: `SamplesGenerator.generate_samples` (trainer/ppo_utils/samples_generator.py:89-138)
  generates `rollout.vllm_generate_batch_size` prompts whenever its buffer holds less than one
  rollout batch and hands out at most `rollout.batch_size` prompts' samples per call; the last,
  partial batch is trained too. So an episode has ceil(prompts / min(batch, generate batch)) steps.
- episodes: `PPOTrainer.fit` (trainer/ppo_trainer.py:520-573) runs `train.num_episodes` of them;
  the async trainer (trainer/ppo_trainer_async.py:100-163, 202-232) trains one step per batch of
  the same generator loop.
- freezing: `BasePPOTrainer.ppo_train` (trainer/ppo_trainer.py:272) calls the actor's fit only
  when the 0-based global step > `critic.freezing_steps`, so F >= 0 skips the first F + 1 steps.
- `--algo.dynamic_filtering_enable` drops prompts by reward and draws replacements, so the count
  depends on pass rates: the formula is then an upper bound (every prompt passing), not K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional


class RLStepsError(ValueError):
    """The run would train the actor for no RL step (a one-line message naming the flag)."""


@dataclass(frozen=True)
class RLSteps:
    """steps: K (None when it cannot be counted); exact: False for an estimate; note: how, or why not."""

    steps: Optional[int]
    exact: bool
    note: str


def rl_steps(args: Any, prompts: int) -> RLSteps:
    """K for the host's hierarchized args and the number of prompts its dataset holds."""
    batch = args.rollout.batch_size
    # the host sets it to rollout.batch_size when not given (cli/train_ppo_ray.py:737-738)
    generate = args.rollout.vllm_generate_batch_size or batch
    per_call = min(batch, generate)
    episodes = args.train.num_episodes
    if prompts <= 0:
        raise RLStepsError(
            f"--data.prompt_dataset={args.data.prompt_dataset!r} holds no prompts "
            f"(--data.max_samples={args.data.max_samples}): the run has no RL step to train"
        )
    total = math.ceil(prompts / per_call) * episodes
    freezing = args.critic.freezing_steps
    frozen = min(total, max(0, freezing + 1))
    steps = total - frozen
    if steps <= 0:
        raise RLStepsError(
            f"--critic.freezing_steps={freezing} freezes the actor for all {total} RL steps of this run "
            f"({prompts} prompts, --rollout.batch_size {batch}, --train.num_episodes {episodes}): the actor "
            "would never train; lower --critic.freezing_steps"
        )
    how = (
        f"{prompts} prompts in batches of {per_call} = {math.ceil(prompts / per_call)} RL steps per episode "
        f"x {episodes} episode{'s' if episodes != 1 else ''}"
    )
    if frozen:
        how += f" - {frozen} with the actor frozen (--critic.freezing_steps={freezing})"
    if args.algo.dynamic_filtering_enable:
        return RLSteps(
            steps,
            False,
            f"at most {steps} RL steps ({how}): with --algo.dynamic_filtering_enable the count depends on "
            "how many prompts pass the filter",
        )
    return RLSteps(steps, True, f"{steps} RL steps ({how})")


def count_prompts(args: Any) -> int:
    """The number of prompts the host will train on, loaded with the host's own dataset functions."""
    from openrlhf.datasets.utils import blending_datasets
    from openrlhf.utils import get_strategy

    # the same calls as prepare_datasets (openrlhf/trainer/ppo_trainer.py:30-40); train() builds this
    # same strategy object from the same args right after (cli/train_ppo_ray.py:35)
    strategy = get_strategy(args)
    data = blending_datasets(
        args.data.prompt_dataset,
        args.data.prompt_probs,
        strategy,
        args.train.seed,
        max_count=args.data.max_samples,
        dataset_split=args.data.prompt_split,
    )
    data = data.select(range(min(args.data.max_samples, len(data))))
    return len(data)


def derive_rl_steps(args: Any) -> RLSteps:
    """K from the prompt dataset, or steps=None with the reason when the prompts cannot be counted.

    RLStepsError when the run would train the actor for no step."""
    dataset = args.data.prompt_dataset
    if not dataset:
        return RLSteps(None, False, "no --data.prompt_dataset to count prompts in")
    try:
        prompts = count_prompts(args)
    except Exception as exc:  # any loading failure: the host would meet it too, later; report it here
        detail = " ".join(str(exc).split())[:300]
        note = f"cannot count the prompts of --data.prompt_dataset={dataset!r}: {type(exc).__name__}: {detail}"
        return RLSteps(None, False, note)
    return rl_steps(args, prompts)
