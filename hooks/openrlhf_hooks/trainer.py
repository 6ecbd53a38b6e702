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

from .agreement import RankAgreement
from .api import PluginConfigError, RankContext, RankLoss
from .kernels import entropy_logprob
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


def action_rows(
    sequences: torch.Tensor, attention_mask: torch.Tensor, action_mask: torch.Tensor, packed: bool, select: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, labels) of the action tokens flagged in `select` [B, A] (a subset of action_mask): the
    row of the flattened logits that predicts each one, and the token it predicts, in row-major order.

    logits: [B, T, V] (or [1, nnz, V] when the host packs samples); the logit at position t predicts
    token t + 1, and action a sits at t = T - 1 - A + a."""
    batch, length = sequences.shape
    action_len = action_mask.shape[1]
    positions = torch.arange(length - 1 - action_len, length - 1, device=sequences.device)
    flat_index = (torch.arange(batch, device=sequences.device)[:, None] * length + positions)[select.bool()]
    if packed:  # packed rows keep the attention-mask order of the padded batch
        packed_index = torch.cumsum(attention_mask.flatten().long(), 0) - 1
        rows = packed_index[flat_index]
    else:
        rows = flat_index
    return rows, sequences.flatten()[flat_index + 1]


def action_entropy(
    logits: torch.Tensor, sequences: torch.Tensor, attention_mask: torch.Tensor, action_mask: torch.Tensor, packed: bool
) -> torch.Tensor:
    """Per-token entropy [B, A] aligned with the host's action_log_probs, computed on action tokens only.

    logits: [B, T, V] (or [1, nnz, V] when the host packs samples), already temperature-scaled by
    the host. The fused kernel reads only the action rows, in place: no copy of the logits.
    """
    on = action_mask.bool()
    rows, labels = action_rows(sequences, attention_mask, action_mask, packed, on)
    entropy, _ = entropy_logprob(logits.reshape(-1, logits.shape[-1]), labels, rows=rows)
    out = torch.zeros(*action_mask.shape, dtype=entropy.dtype, device=entropy.device)
    return out.masked_scatter(on, entropy)


class HookedTrainer:
    """The loss plugin installed in one rank's ActorPPOTrainer.

    Wraps, on this trainer's objects only and keeping the host's signatures:
    - actor.forward (training): also the per-token entropy of the same logits, when asked for;
    - actor_loss_fn: the plugin's policy_loss sees the host's 5-tuple; the host gets its own tuple
      back, so `train/policy_loss` stays the host's value, and the plugin's term is held for
    - strategy.backward (actor only): which adds the held term to the loss it back-propagates;
    - replay_buffer.collate_fn and training_step: to know, before the first backward of each
      optimizer step, which micro-batches that step holds (begin_optimizer_step).
    """

    def __init__(self, trainer: Any, rank_loss: RankLoss, plugin_name: str, context: RankContext):
        self.trainer = trainer
        self.rank_loss = rank_loss
        self.plugin_name = plugin_name
        self.agreement = RankAgreement(rank_loss, context, plugin_name)
        self._entropy: Optional[torch.Tensor] = None
        self._term: Optional[torch.Tensor] = None
        self._collated: list = []  # micro-batches collated since the current optimizer step began
        self._window: list = []  # this optimizer step's micro-batches (non-dynamic batching)
        self._window_info: Any = None
        if rank_loss.needs_entropy:
            self._wrap_forward(trainer.actor)
        self._wrap_loss(trainer)
        self._wrap_backward(trainer)
        self._wrap_optimizer_steps(trainer)

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
            if self._term is not None:
                raise RuntimeError(
                    f"loss plugin {self.plugin_name!r}: the previous micro-batch's term never reached "
                    "strategy.backward; this OpenRLHF trainer does not back-propagate the way 0.11.2 does"
                )
            outputs = tuple(
                host_loss(
                    log_probs, old_log_probs, advantages, action_mask=action_mask, rollout_log_probs=rollout_log_probs, **info
                )
            )
            entropy, self._entropy = self._entropy, None
            plugin_outputs = self.rank_loss.policy_loss(
                outputs, action_mask=action_mask, entropy=entropy, loss_batch_info=info
            )
            # what the plugin changed in the loss, as a term with its own graph
            self._term = plugin_outputs[0] - outputs[0]
            return outputs

        actor_loss_fn.host_loss = host_loss
        trainer.actor_loss_fn = actor_loss_fn

    def _wrap_backward(self, trainer: Any) -> None:
        strategy = trainer.strategy
        host_backward = strategy.backward

        def backward(loss, model, optimizer, **kwargs):
            if model is trainer.actor and self._term is not None:
                term, self._term = self._term, None
                loss = loss + term.to(loss.dtype)
            return host_backward(loss, model, optimizer, **kwargs)

        strategy.backward = backward

    def _wrap_optimizer_steps(self, trainer: Any) -> None:
        buffer = trainer.replay_buffer
        host_collate = buffer.collate_fn
        host_training_step = trainer.training_step

        def collate_fn(batch):
            experience = host_collate(batch)
            self._collated.append(experience)
            return experience

        def training_step(experience, kl_ctl, step, loss_batch_info=None):
            if self._opens_optimizer_step(step, loss_batch_info):
                entropies = None
                if self.rank_loss.needs_optimizer_step_entropy():
                    entropies = self._step_entropies(self._step_micro_batches(experience, step, loss_batch_info, host_collate))
                self.rank_loss.begin_optimizer_step(entropies)
            return host_training_step(experience, kl_ctl, step, loss_batch_info)

        if not trainer.args.train.dynamic_batch_enable:
            buffer.collate_fn = collate_fn
        trainer.training_step = training_step

    # Where optimizer steps start, mirroring ActorPPOTrainer.ppo_train (openrlhf/trainer/ray/ppo_actor.py).

    def _opens_optimizer_step(self, step: int, loss_batch_info: Any) -> bool:
        if self.trainer.args.train.dynamic_batch_enable:
            # micro-batches are laid out ahead (setup_dynamic_batch), in order, flagged where a step ends
            return step == 0 or bool(self.trainer.replay_buffer.dynamic_optimizer_step[step - 1])
        if loss_batch_info is not None and loss_batch_info is self._window_info:
            return False
        # a new window of iter_grad_accum_global_norm (one dict per optimizer step), or a micro-batch
        # the host normalises on its own (no loss_batch_info): a step of its own
        self._window_info = loss_batch_info
        self._window, self._collated = self._collated, []
        return True

    def _step_micro_batches(self, experience, step, loss_batch_info, host_collate) -> list:
        """This rank's micro-batches of the optimizer step that `experience` opens."""
        buffer = self.trainer.replay_buffer
        if self.trainer.args.train.dynamic_batch_enable:
            ends = buffer.dynamic_optimizer_step
            last = next((i for i in range(step, len(ends)) if ends[i]), len(ends) - 1)
            return [experience] + [host_collate([buffer[i]]) for i in range(step + 1, last + 1)]
        if loss_batch_info is None:
            return [experience]
        # iter_grad_accum_global_norm (openrlhf/utils/loss_utils.py) pulls a whole step's
        # micro-batches from the DataLoader, and so through collate_fn, before yielding the first
        if not self._window or self._window[0] is not experience:
            raise RuntimeError(
                f"loss plugin {self.plugin_name!r}: cannot see the micro-batches of this optimizer step (they "
                "did not come through the replay buffer's collate_fn); drive training through ppo_train"
            )
        return self._window

    @torch.no_grad()
    def _step_entropies(self, micro_batches: list) -> list:
        actor = self.trainer.actor
        device = next(actor.parameters()).device
        entropies = []
        for experience in micro_batches:
            experience.to_device(device)
            _, output = actor(
                experience.sequences,
                experience.action_mask,
                attention_mask=experience.attention_mask,
                return_output=True,
                ring_attn_group=self.trainer.strategy.ring_attn_group,
            )
            packed = bool(getattr(actor, "packing_samples", False))
            entropy = action_entropy(
                output["logits"], experience.sequences, experience.attention_mask, experience.action_mask, packed
            )
            entropies.append((entropy, experience.action_mask))
            del output
        return entropies

    def begin_step(self) -> None:
        self._collated, self._window, self._window_info, self._term = [], [], None, None
        self.agreement.check()  # before the plugin trains on its state this step
        self.rank_loss.begin_step()

    def end_step(self) -> dict[str, float]:
        return {f"{self.plugin_name}/{k}": v for k, v in self.rank_loss.end_step().items()}

    def state(self) -> dict:
        return {"plugin": self.plugin_name, "state": self.rank_loss.state_dict(), "steps": self.agreement.step}

    def restore(self, saved: dict) -> None:
        if saved.get("plugin") != self.plugin_name:
            raise PluginConfigError(
                f"the checkpoint holds state of loss plugin {saved.get('plugin')!r}, but this run uses "
                f"--loss_plugin {self.plugin_name}; resume with --loss_plugin {saved.get('plugin')}"
            )
        self.rank_loss.load_state_dict(saved["state"])
        # checkpoints written before the hook layer counted steps restart its count (and check schedule) at 0
        self.agreement.restored(int(saved.get("steps", 0)))


def install(trainer: Any, strategy: Any, checkpoint_states: Optional[dict] = None) -> Optional[HookedTrainer]:
    """Install the loss plugin named in the host's args into `trainer`; None when no plugin is asked for.

    K (RankContext.total_steps) is the count of RL steps the launcher made before Ray started
    (settings["rl_steps"], hooks/openrlhf_hooks/steps.py), or None with the reason; the plugin decides what it needs.
    checkpoint_states: the host's restored client_states, if resuming.
    """
    settings = hooks_settings(strategy.args)
    if not settings or not settings.get("loss_plugin"):
        return None
    plugin = get_registry().loss_plugin(settings["loss_plugin"])
    config = dict(settings.get("config") or {})
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
        total_steps=settings.get("rl_steps"),
        all_reduce_sum=dp_all_reduce_sum(strategy),
        total_steps_note=settings.get("rl_steps_note") or "the launcher did not count them",
    )
    hooked = HookedTrainer(trainer, plugin.build_rank_loss(strategy.args, config, context), plugin.name, context)
    saved = (checkpoint_states or {}).get(STATE_KEY)
    if saved:
        hooked.restore(saved)
    return hooked
