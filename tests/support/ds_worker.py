"""One training rank on CPU: OpenRLHF's real DeepspeedStrategy, Actor, replay buffer, ActorPPOTrainer
(ppo_train and training_step) and DeepSpeed ZeRO engine, over gloo, with the loss plugin installed by
openrlhf_hooks.trainer. Each RL step appends this rank's rows of a fixed global batch to the host's
replay buffer and runs the host's ppo_train between the plugin's begin_step and end_step.

Usage (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set by the test):
    python ds_worker.py OUT.pt MODEL_DIR STEPS [launcher flags...]

The host's CUDA-only calls are replaced by CPU mode's replacements (openrlhf_hooks/cpu_mode.py,
REPLACEMENTS, each with the host's file:line), applied in this process with cpu_mode.activate():
the same ones a `--cpu` run uses, ZeRO-3's sequential parameter gathers included.
The process group is created over gloo before the strategy's own deepspeed.init_distributed call,
which then finds it initialised (DeepSpeed would otherwise pick its CPU backend, ccl).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from host_args import host_args, tiny_host_flags  # noqa: E402  (installs the stand-ins)

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402

import openrlhf.trainer.ray.ppo_actor as ppo_actor_module  # noqa: E402
from openrlhf.models import Actor  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.utils import get_strategy  # noqa: E402

from openrlhf_epo.core import step_statistic_parts  # noqa: E402
from openrlhf_hooks import cpu_mode  # noqa: E402
from openrlhf_hooks.trainer import ARGS_KEY, install  # noqa: E402

cpu_mode.activate()

LENGTH = 24
# turn layouts (runs of action tokens separated by observation tokens), cycled over the batch rows
TURNS = [[(3, 7), (10, 14), (18, 22)], [(3, 9), (12, 18)], [(3, 22)], [(5, 6), (8, 12), (15, 20)]]


def global_batch(step: int, rows: int, vocab: int):
    """The same multi-turn trajectories at every step, on every rank and in every run (ranks take
    their rows), so that the step statistic stays near its history; advantages vary by step."""
    g = torch.Generator().manual_seed(1000)
    sequences = torch.randint(3, vocab, (rows, LENGTH), generator=g)
    attention_mask = torch.ones(rows, LENGTH, dtype=torch.long)
    attention_mask[1, -3:] = 0  # right padding
    action_mask = torch.zeros(rows, LENGTH - 1, dtype=torch.bool)
    for row in range(rows):
        for start, end in TURNS[row % len(TURNS)]:
            action_mask[row, start:end] = True
    action_mask &= attention_mask[:, 1:].bool()
    old_log_probs = -torch.rand(rows, LENGTH - 1, generator=g) * 3
    advantages = torch.randn(rows, LENGTH - 1, generator=torch.Generator().manual_seed(2000 + step))
    if step == 0 or os.environ.get("EPO_TEST_ZERO_ADVANTAGES"):
        # zero advantages: the policy loss has no gradient and only EPO's term moves the model
        advantages.zero_()
    return sequences, attention_mask, action_mask, old_log_probs * action_mask, advantages * action_mask


def _float32_training(args):
    """EPO_TEST_FP32=1: train in float32 instead of the host's bf16, so that runs which split the
    same batch differently can be compared to 1e-5 instead of bf16's 1e-2 (the host offers only
    bf16 and fp16: its Actor loads the dtype convert_to_torch_dtype returns, and the DeepSpeed config
    enables neither when param_dtype is neither)."""
    import openrlhf.utils.utils as host_utils

    host_convert = host_utils.convert_to_torch_dtype
    host_utils.convert_to_torch_dtype = lambda dtype: torch.float32 if dtype == "fp32" else host_convert(dtype)
    args.ds.param_dtype = "fp32"


def main(out_path, model_dir, steps, flags):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    args = host_args([*tiny_host_flags(model_dir, world), *flags])
    if getattr(args, ARGS_KEY, None):
        getattr(args, ARGS_KEY)["rl_steps"] = steps  # what the launcher counts before Ray starts
    if os.environ.get("EPO_TEST_FP32"):
        _float32_training(args)
    # flash-attn's packing helpers, which the host switches on with dynamic batching, need CUDA;
    # the padded path computes the same thing
    args.ds.packing_samples = False
    deepspeed.init_distributed(dist_backend="gloo")
    strategy = get_strategy(args)
    strategy.setup_distributed()
    actor = Actor(
        str(model_dir),
        attn_implementation="eager",
        param_dtype=args.ds.param_dtype,
        ds_config=strategy.get_ds_train_config(),
        temperature=args.rollout.temperature,
    )
    actor_cfg = dict(
        optim=args.actor.optim,
        muon=vars(args.actor.muon),
        adam=vars(args.actor.adam),
        lr_scheduler=args.actor.lr_scheduler,
        lr_warmup_ratio=args.actor.lr_warmup_ratio,
        min_lr_ratio=args.actor.min_lr_ratio,
        max_norm=args.actor.max_norm,
        scheduler_steps=steps,
    )
    actor, optim, scheduler = strategy.prepare((actor, actor_cfg))
    trainer = ppo_actor_module.ActorPPOTrainer(
        strategy,
        actor,
        None,
        optim,
        scheduler,
        micro_train_batch_size=args.train.micro_batch_size,
        eps_clip=args.actor.eps_clip,
    )
    hooked = install(trainer, strategy)

    grads = []
    host_step = strategy.optimizer_step

    def optimizer_step(optimizer, model, scheduler, name="model", **kwargs):
        # full (all-gathered) gradients just before DeepSpeed's update; the host calls this after
        # every micro-batch and DeepSpeed updates only at the end of the accumulation
        if model.model.is_gradient_accumulation_boundary():
            grads.append(
                {n: deepspeed.utils.safe_get_full_grad(p).float().clone() for n, p in model.model.named_parameters()}
            )
        return host_step(optimizer, model, scheduler, name=name, **kwargs)

    strategy.optimizer_step = optimizer_step
    micro_batch_entropies = []  # each micro-batch's own L_H as the plugin saw it (training forward)
    plugin_policy_loss = hooked.rank_loss.policy_loss

    def policy_loss(host_outputs, *, action_mask, entropy, loss_batch_info):
        numerator, den = step_statistic_parts(entropy, action_mask, hooked.rank_loss.config.aggregation)[:2].tolist()
        micro_batch_entropies.append(numerator / den if den else None)
        return plugin_policy_loss(host_outputs, action_mask=action_mask, entropy=entropy, loss_batch_info=loss_batch_info)

    hooked.rank_loss.policy_loss = policy_loss
    vocab = actor.model.module.config.vocab_size
    rows = args.rollout.batch_size * args.rollout.n_samples_per_prompt
    records, losses = [], []
    per_rank = rows // world
    for step in range(steps):
        sequences, attention_mask, action_mask, old_log_probs, advantages = global_batch(step, rows, vocab)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        experience = Experience(
            sequences=sequences[mine],
            attention_mask=attention_mask[mine],
            action_mask=action_mask[mine],
            action_log_probs=old_log_probs[mine],
            advantages=advantages[mine],
            total_length=attention_mask[mine].sum(-1),
            response_length=action_mask[mine].sum(-1),
            info={},
        )
        trainer.replay_buffer.append(experience)
        hooked.begin_step()
        status = trainer.ppo_train(0.0)
        metrics = hooked.end_step()
        trainer.replay_buffer.clear()
        losses.append(float(status["policy_loss"]))
        records.append({"metrics": metrics, "history": hooked.rank_loss.history.state_dict()})
    result = {
        "rank": rank,
        "world": world,
        "records": records,
        "losses": losses,
        "grads": grads,
        "state": hooked.state(),
        "micro_batch_entropies": micro_batch_entropies,
        "gas": strategy.accumulated_gradient,
    }
    checkpoint_dir = os.environ.get("EPO_TEST_CKPT")
    if checkpoint_dir:
        result["restored"] = checkpoint_round_trip(strategy, actor, trainer, hooked, checkpoint_dir, steps)
    torch.save(result, out_path)
    dist.barrier()


def checkpoint_round_trip(strategy, actor, trainer, hooked, checkpoint_dir, steps):
    """Save through the hooked actor's save_checkpoint (the host's DeepSpeed path), load the way
    the host's init_model_from_pretrained does, and install the plugin again from those states."""
    from openrlhf_hooks.ray_actor import HookedPolicyModelActor

    rank_actor = HookedPolicyModelActor.__new__(HookedPolicyModelActor)
    rank_actor.strategy, rank_actor.actor, rank_actor.hooked = strategy, actor, hooked
    rank_actor.disable_ds_ckpt, rank_actor.save_hf_ckpt = False, False
    strategy.args.ckpt.path = checkpoint_dir
    rank_actor.save_checkpoint(f"global_step{steps}", {"global_step": steps})
    _, states = strategy.load_ckpt(actor.model, os.path.join(checkpoint_dir, "_actor"))
    # Installing a second time wraps the same trainer again; nothing trains after this check.
    restored = install(trainer, strategy, checkpoint_states=states)
    return {"global_step": states.get("global_step"), "state": restored.state(), "reference": restored.rank_loss.reference}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
