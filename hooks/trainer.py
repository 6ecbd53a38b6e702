"""Rank side: put a loss plugin into OpenRLHF 0.11.2's ActorPPOTrainer on one training rank.

Two wrappers, both keeping the host's signatures and return values:
- the trainer's `actor_loss_fn` (PolicyLoss, whatever the host built): its 5-tuple goes through the
  plugin's RankLoss, which adds its term to the loss;
- the Actor's `forward` during training: it also computes the per-token entropy of the same
  temperature-scaled logits, on the action window, when the plugin asks for it.

Only the plugin's name and plain config travel (in the host's args, pickled to every rank); the
plugin object is resolved again here, through the entry points.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.distributed as dist

from .api import PluginConfigError, RankContext, RankLoss
from .plugins import get_registry

ARGS_KEY = "openrlhf_hooks"  # attribute of the host's args holding {"loss_plugin", "config", "rollout_processors"}
STATE_KEY = "openrlhf_hooks_loss_plugin"  # key in the checkpoint's client_states


def hooks_settings(args: Any) -> Optional[dict]:
    return getattr(args, ARGS_KEY, None)


def dp_all_reduce_sum(strategy: Any):
    """SUM over the data-parallel group, on the device the backend needs; returns a new CPU-side result."""
    mesh = getattr(strategy, "ds_device_mesh", None)
    group = mesh["dp"].get_group() if mesh is not None else None

    def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        if not (dist.is_available() and dist.is_initialized()):
            return tensor
        on_cuda = dist.get_backend(group) == "nccl"
        work = tensor.to(torch.cuda.current_device()) if on_cuda else tensor.clone()
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=group)
        return work.to(tensor.device)

    return all_reduce_sum


def action_entropy(
    logits: torch.Tensor, sequences: torch.Tensor, attention_mask: torch.Tensor, action_mask: torch.Tensor, packed: bool
) -> torch.Tensor:
    """Per-token entropy [B, A] aligned with the host's action_log_probs, computed on action tokens only.

    logits: [B, T, V] (or [1, nnz, V] when the host packs samples), already temperature-scaled by
    the host. The fused kernel reads only the action rows, in place: no copy of the logits.
    """
    from openrlhf_epo.kernels import entropy_logprob

    batch, length = sequences.shape
    action_len = action_mask.shape[1]
    on = action_mask.bool()
    # the logit at position t predicts token t + 1; action a sits at t = length - 1 - action_len + a
    positions = torch.arange(length - 1 - action_len, length - 1, device=sequences.device)
    flat_index = (torch.arange(batch, device=sequences.device)[:, None] * length + positions)[on]
    if packed:  # packed rows keep the attention-mask order of the padded batch
        packed_index = torch.cumsum(attention_mask.flatten().long(), 0) - 1
        rows = packed_index[flat_index]
    else:
        rows = flat_index
    labels = sequences.flatten()[flat_index + 1]
    entropy, _ = entropy_logprob(logits.reshape(-1, logits.shape[-1]), labels, rows=rows)
    out = torch.zeros(batch, action_len, dtype=entropy.dtype, device=entropy.device)
    return out.masked_scatter(on, entropy)


def derive_total_steps(args: Any, max_steps: Optional[int]) -> int:
    """K = RL steps = the host's optimizer steps (max_steps) / optimizer steps per RL step."""
    per_step = (
        args.rollout.batch_size * args.rollout.n_samples_per_prompt / args.train.batch_size * args.train.max_epochs
    )
    if not max_steps or per_step <= 0:
        raise PluginConfigError(
            f"cannot derive the run's total RL steps from max_steps={max_steps!r}; set the plugin's total_steps"
        )
    return max(1, round(max_steps / per_step))


class HookedTrainer:
    """The loss plugin installed in one rank's ActorPPOTrainer."""

    def __init__(self, trainer: Any, rank_loss: RankLoss, plugin_name: str):
        self.trainer = trainer
        self.rank_loss = rank_loss
        self.plugin_name = plugin_name
        self._entropy: Optional[torch.Tensor] = None
        self._wrap_loss(trainer)
        if rank_loss.needs_entropy:
            self._wrap_forward(trainer.actor)

    def _wrap_forward(self, actor: Any) -> None:
        original = actor.forward

        @functools.wraps(original)
        def forward(sequences, action_mask=None, attention_mask=None, **kwargs):
            capture = torch.is_grad_enabled() and action_mask is not None and actor.training
            if not capture:
                return original(sequences, action_mask, attention_mask, **kwargs)
            wants_output = kwargs.get("return_output", False)
            kwargs["return_output"] = True
            log_probs, output = original(sequences, action_mask, attention_mask, **kwargs)
            packed = bool(getattr(actor, "packing_samples", False))
            self._entropy = action_entropy(output["logits"], sequences, attention_mask, action_mask, packed)
            return (log_probs, output) if wants_output else log_probs

        actor.forward = forward

    def _wrap_loss(self, trainer: Any) -> None:
        host_loss = trainer.actor_loss_fn

        def actor_loss_fn(log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, **info):
            outputs = host_loss(
                log_probs, old_log_probs, advantages, action_mask=action_mask, rollout_log_probs=rollout_log_probs, **info
            )
            entropy, self._entropy = self._entropy, None
            return self.rank_loss.policy_loss(
                tuple(outputs), action_mask=action_mask, entropy=entropy, loss_batch_info=info
            )

        actor_loss_fn.host_loss = host_loss
        trainer.actor_loss_fn = actor_loss_fn

    def begin_step(self) -> None:
        self.rank_loss.begin_step()

    def end_step(self) -> dict[str, float]:
        return {f"{self.plugin_name}/{k}": v for k, v in self.rank_loss.end_step().items()}

    def state(self) -> dict:
        return {"plugin": self.plugin_name, "state": self.rank_loss.state_dict()}

    def restore(self, saved: dict) -> None:
        if saved.get("plugin") != self.plugin_name:
            raise PluginConfigError(
                f"the checkpoint holds state of loss plugin {saved.get('plugin')!r}, but this run uses "
                f"--loss_plugin {self.plugin_name}; resume with --loss_plugin {saved.get('plugin')}"
            )
        self.rank_loss.load_state_dict(saved["state"])


def install(
    trainer: Any, strategy: Any, total_steps_hint: Optional[int], checkpoint_states: Optional[dict] = None
) -> Optional[HookedTrainer]:
    """Install the loss plugin named in the host's args into `trainer`; None when no plugin is asked for.

    total_steps_hint: the host's max_steps (optimizer steps), from which K is derived unless the
    plugin's config sets total_steps. checkpoint_states: the host's restored client_states, if resuming.
    """
    settings = hooks_settings(strategy.args)
    if not settings or not settings.get("loss_plugin"):
        return None
    plugin = get_registry().loss_plugin(settings["loss_plugin"])
    config = dict(settings.get("config") or {})
    total_steps = config.get("total_steps")
    if total_steps is None:
        total_steps = derive_total_steps(strategy.args, total_steps_hint)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    mesh = getattr(strategy, "ds_device_mesh", None)
    dp_size = mesh["dp"].size() if mesh is not None else world
    # the rank inside the data-parallel group, which differs from the global rank under tensor parallelism
    if mesh is not None:
        dp_rank = mesh["dp"].get_local_rank()
    else:
        dp_rank = dist.get_rank() if world > 1 else 0
    context = RankContext(
        rank=dp_rank,
        dp_size=dp_size,
        total_steps=int(total_steps),
        all_reduce_sum=dp_all_reduce_sum(strategy),
    )
    hooked = HookedTrainer(trainer, plugin.build_rank_loss(strategy.args, config, context), plugin.name)
    saved = (checkpoint_states or {}).get(STATE_KEY)
    if saved:
        hooked.restore(saved)
    return hooked
