"""The training-rank Ray actor with the plugin inside: a subclass of OpenRLHF's PolicyModelActor.

A Ray actor class cannot be subclassed, so this subclasses the plain class behind it
(`__ray_actor_class__`) and re-decorates it exactly as the host does (`@ray.remote(num_gpus=1)`).
Ray ships the class to workers by reference to this module, so every node needs the package
installed; everything the plugin needs there comes from the host's args, never from the driver.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import ray
import torch
from openrlhf.trainer.ray import ppo_actor

from . import probe
from .agreement import tensor_as_list
from .api import RankContext
from .plugins import get_registry
from .trainer import STATE_KEY, HookedTrainer, dp_all_reduce_sum, hooks_settings, install

HostPolicyModelActor = ppo_actor.PolicyModelActor.__ray_actor_class__
STATE_LOG_ENV = "OPENRLHF_HOOKS_STATE_LOG"


class HookedPolicyModelActor(HostPolicyModelActor):
    """PolicyModelActor + the loss plugin, rollout processors and reply-start probe named in the host's args."""

    hooked: Optional[HookedTrainer] = None
    rollout_processors: tuple = ()
    probe: Optional[probe.ReplyStartProbe] = None

    def init_model_from_pretrained(self, strategy, pretrain, max_steps=None, vllm_engines=None):
        result = super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines)
        self.hooked = install(self.trainer, strategy, self.checkpoint_states)
        settings = hooks_settings(strategy.args) or {}
        registry = get_registry()
        self.rollout_processors = tuple(registry.rollout_processor(n) for n in settings.get("rollout_processors", ()))
        if settings.get(probe.SETTINGS_KEY):
            # after the loss plugin: it reads the logits whatever else wraps the forward
            self.probe = probe.ReplyStartProbe(
                self.trainer.actor, settings[probe.SETTINGS_KEY]["token_ids"], dp_all_reduce_sum(strategy)
            )
        self._log_state("start")
        return result

    def append(self, experience):
        for processor in self.rollout_processors:
            experience = processor.process(experience, self.strategy.args)
        return super().append(experience)

    def fit(self, kl_ctl: float = 0):
        if self.hooked is not None:
            self.hooked.begin_step()
        status = super().fit(kl_ctl)
        if self.hooked is not None:
            status.update(self.hooked.end_step())
            self._log_state("step")
        if self.probe is not None:
            status.update(self.probe.end_step())
        return status

    def _log_state(self, event: str) -> None:
        """With OPENRLHF_HOOKS_STATE_LOG=DIR, each rank appends the loss plugin's state (what its
        checkpoint would hold) to DIR/rank<N>.jsonl at start-up (after any resume) and after every
        RL step: to audit that all ranks hold the same state, and what a resume restored."""
        folder = os.environ.get(STATE_LOG_ENV)
        if not folder or self.hooked is None:
            return
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        record = {"event": event, "rank": rank, **self.hooked.state()}
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{rank}.jsonl"), "a") as out:
            out.write(json.dumps(record, default=tensor_as_list) + "\n")

    def save_checkpoint(self, tag, client_states=None, metric_value=None, metric_key=None):
        if self.hooked is not None:
            client_states = {**(client_states or {}), STATE_KEY: self.hooked.state()}
        return super().save_checkpoint(tag, client_states, metric_value=metric_value, metric_key=metric_key)

    def hooks_report(self, args: Any = None) -> dict:
        """What runs in this worker: its pid and node, and the loss plugin resolved and built here.

        `args`: host args to resolve from before init_model_from_pretrained has run (which is when
        the plugin is installed into the trainer for real).
        """
        args = args if args is not None else self.strategy.args
        settings = hooks_settings(args) or {}
        name = settings.get("loss_plugin")
        plugin = get_registry().loss_plugin(name) if name else None
        rank_loss = None
        if plugin is not None:
            context = RankContext(rank=0, dp_size=1, total_steps=1, all_reduce_sum=lambda tensor: tensor)
            rank_loss = type(plugin.build_rank_loss(args, settings["config"], context)).__name__
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "loss_plugin": plugin.name if plugin else None,
            "plugin_version": plugin.version if plugin else None,
            "rank_loss": rank_loss,
            "installed_in_trainer": self.hooked is not None,
        }

PolicyModelActor = ray.remote(num_gpus=1)(HookedPolicyModelActor)
