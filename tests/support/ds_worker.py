"""One training rank on CPU: OpenRLHF's real DeepspeedStrategy, Actor, replay buffer, ActorPPOTrainer
(ppo_train and training_step) and DeepSpeed ZeRO engine, over gloo, with the loss plugin installed by
openrlhf_hooks.trainer. Each RL step appends this rank's rows of a fixed global batch to the host's
replay buffer and runs the host's ppo_train between the plugin's begin_step and end_step.

Usage (env RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set by the test):
    python ds_worker.py OUT.pt MODEL_DIR STEPS [launcher flags...]

The host's CUDA-only calls are replaced by CPU mode's replacements (hooks/openrlhf_hooks/cpu_mode.py,
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

from openrlhf_epo.core import step_statistic_parts  # noqa: E402
from openrlhf_hooks import cpu_mode  # noqa: E402
from openrlhf_hooks.testing import build_rank, rank_experience, record_gradients, train_float32  # noqa: E402
from openrlhf_hooks.trainer import ARGS_KEY, install  # noqa: E402

cpu_mode.activate()


def main(out_path, model_dir, steps, flags):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    args = host_args([*tiny_host_flags(model_dir, world), *flags])
    if getattr(args, ARGS_KEY, None):
        getattr(args, ARGS_KEY)["rl_steps"] = steps  # what the launcher counts before Ray starts
    if os.environ.get("EPO_TEST_FP32"):
        # runs that split the same batch differently compare to 1e-5 in float32, not bf16's 1e-2
        train_float32()
        args.ds.param_dtype = "fp32"
    deepspeed.init_distributed(dist_backend="gloo")
    strategy, actor, trainer, hooked = build_rank(args, scheduler_steps=steps)
    grads = record_gradients(strategy)
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
    for step in range(steps):
        # zero advantages at step 0 (or always): the policy loss has no gradient, only EPO's term moves the model
        zero = step == 0 or bool(os.environ.get("EPO_TEST_ZERO_ADVANTAGES"))
        trainer.replay_buffer.append(rank_experience(step, rows, vocab, zero, rank, world))
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
