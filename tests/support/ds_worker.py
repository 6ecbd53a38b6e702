"""One training rank on CPU: OpenRLHF's real DeepspeedStrategy, Actor, ActorPPOTrainer.training_step
and DeepSpeed ZeRO engine, over gloo, with the loss plugin installed by openrlhf_hooks.trainer.

Usage (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set by the test):
    python ds_worker.py OUT.pt MODEL_DIR STEPS [launcher flags...]

Replaced host calls, each only because it is CUDA-only and has no CPU meaning:
- torch.cuda.set_device (DeepspeedStrategy.setup_distributed) -> no-op;
- init_device_mesh("cuda", ...) (same method) -> the same mesh on "cpu";
- torch.cuda.current_device (NaiveReplayBuffer.__init__, which only records a target device) -> 0;
- torch.cuda.synchronize (torch_dist_barrier_and_cuda_sync, after the barrier in
  ActorPPOTrainer.__init__ and PolicyModelActor.save_checkpoint) -> no-op.
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
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

import openrlhf.trainer.ray.ppo_actor as ppo_actor_module  # noqa: E402
import openrlhf.utils.deepspeed.deepspeed as strategy_module  # noqa: E402
from openrlhf.models import Actor  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.utils.loss_utils import iter_grad_accum_global_norm  # noqa: E402
from openrlhf.utils import get_strategy  # noqa: E402

from openrlhf_hooks.trainer import install  # noqa: E402

torch.cuda.set_device = lambda device: None
torch.cuda.current_device = lambda: 0
strategy_module.init_device_mesh = lambda device_type, *a, **k: init_device_mesh("cpu", *a, **k)
torch.cuda.synchronize = lambda device=None: None

BATCH, LENGTH, PROMPT = 4, 24, 4


def global_batch(step: int, vocab: int):
    """The same 4 multi-turn trajectories on every rank and run; ranks take their rows."""
    g = torch.Generator().manual_seed(1000 + step)
    sequences = torch.randint(3, vocab, (BATCH, LENGTH), generator=g)
    attention_mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    attention_mask[1, -3:] = 0  # right padding
    action_mask = torch.zeros(BATCH, LENGTH - 1, dtype=torch.bool)
    # turns: runs of action tokens separated by observation tokens
    for row, spans in enumerate([[(3, 7), (10, 14), (18, 22)], [(3, 9), (12, 18)], [(3, 22)], [(5, 6), (8, 12), (15, 20)]]):
        for start, end in spans:
            action_mask[row, start:end] = True
    action_mask &= attention_mask[:, 1:].bool()
    old_log_probs = -torch.rand(BATCH, LENGTH - 1, generator=g) * 3
    # step 0: zero advantages, so the policy loss has no gradient and only EPO's term moves the model
    advantages = torch.zeros(BATCH, LENGTH - 1) if step == 0 else torch.randn(BATCH, LENGTH - 1, generator=g)
    return sequences, attention_mask, action_mask, old_log_probs * action_mask, advantages * action_mask


def main(out_path, model_dir, steps, flags):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    args = host_args([*tiny_host_flags(model_dir, world), *flags])
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
    hooked = install(trainer, strategy, total_steps_hint=steps, checkpoint_states=None)

    grads, losses = [], []
    host_step = strategy.optimizer_step

    def optimizer_step(optimizer, model, scheduler, name="model", **kwargs):
        # full (all-gathered) gradients just before DeepSpeed's update
        grads.append(
            {n: deepspeed.utils.safe_get_full_grad(p).float().clone() for n, p in model.model.named_parameters()}
        )
        return host_step(optimizer, model, scheduler, name=name, **kwargs)

    strategy.optimizer_step = optimizer_step
    vocab = actor.model.module.config.vocab_size
    records = []
    per_rank = BATCH // world
    for step in range(steps):
        sequences, attention_mask, action_mask, old_log_probs, advantages = global_batch(step, vocab)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        experience = Experience(
            sequences=sequences[rows],
            attention_mask=attention_mask[rows],
            action_mask=action_mask[rows],
            action_log_probs=old_log_probs[rows],
            advantages=advantages[rows],
            info={},
        )
        hooked.begin_step()
        for item, info in iter_grad_accum_global_norm([experience], strategy, strategy.accumulated_gradient, lambda e: e.action_mask):
            status = trainer.training_step(item, 0.0, 0, info)
            losses.append(float(status["metrics"]["policy_loss"]))
        metrics = hooked.end_step()
        records.append({"metrics": metrics, "history": hooked.rank_loss.history.state_dict()})
    result = {"rank": rank, "world": world, "records": records, "losses": losses, "grads": grads, "state": hooked.state()}
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
    restored = install(trainer, strategy, total_steps_hint=steps, checkpoint_states=states)
    return {"global_step": states.get("global_step"), "state": restored.state(), "reference": restored.rank_loss.reference}


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
