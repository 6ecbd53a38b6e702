"""CPU mode, the vLLM side: the weight-sync endpoint vLLM's worker process loads in place of
OpenRLHF's `WorkerWrap` (openrlhf/trainer/ray/vllm_worker_wrap.py), and the gloo group both ends
of the DeepSpeed rank 0 -> vLLM broadcast use.

vLLM runs its engine core in a process it spawns itself; that process imports the worker extension
by name and runs nothing of the hook layer before. So this module imports nothing from OpenRLHF
(whose package imports would pull flash-attn in) and needs no process set-up: hooks/openrlhf_hooks/cpu_mode.py
points vLLM at `CPUWorkerWrap` through the `worker_extension_cls` the host passes.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

SYNC_TIMEOUT = timedelta(minutes=30)


class GlooBroadcastGroup:
    """A private gloo group between DeepSpeed rank 0 (rank 0 here) and every vLLM worker.

    Stands for the PyNccl communicator of openrlhf/utils/distributed_util.py:13-26 and keeps its
    `broadcast(tensor, src, stream)` call. It is built on its own TCPStore, not on
    torch.distributed's default group: both ends already belong to another default group
    (DeepSpeed's, vLLM's), and Ray's gloo collective fails in such a process."""

    def __init__(self, host: str, port: int, rank: int, world_size: int):
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=SYNC_TIMEOUT)
        self._store = store  # the group keeps using it; rank 0's store is the server
        self._group = dist.ProcessGroupGloo(dist.PrefixStore("openrlhf_hooks_weight_sync", store), rank, world_size, SYNC_TIMEOUT)

    def broadcast(self, tensor: torch.Tensor, src: int, stream=None) -> None:
        # stream: the host passes torch.cuda.current_stream(); gloo on CPU has none
        self._group.broadcast(tensor, src).wait()


class CPUWorkerWrap:
    """vLLM worker extension for CPU mode: OpenRLHF's `init_process_group` and `update_weight`.

    vLLM's CPU backend repacks linear weights after loading and drops the checkpoint-format
    tensors, so the host's per-tensor `model.load_weights` (vllm_worker_wrap.py:48) would write into
    tensors the model no longer reads. Here every tensor of one sync is received first, then loaded
    once through vLLM's `reload_weights`, which repacks. The host marks the last tensor of a sync with
    `empty_cache=True` (trainer/ray/ppo_actor.py:427)."""

    def init_process_group(self, master_address, master_port, rank_offset, world_size, group_name, backend="gloo", use_ray=False):
        if use_ray:
            raise RuntimeError("CPU mode syncs weights over its own gloo group; drop --vllm.sync_with_ray")
        rank = dist.get_rank() + rank_offset
        self._model_update_group = GlooBroadcastGroup(master_address, master_port, rank, world_size)
        self._received_weights: list[tuple[str, torch.Tensor]] = []

    def update_weight(self, name, dtype, shape, empty_cache=False):
        if dtype != self.model_config.dtype:
            raise RuntimeError(f"weight sync: {name} arrives as {dtype}, vLLM serves {self.model_config.dtype}")
        weight = torch.empty(shape, dtype=dtype)
        self._model_update_group.broadcast(weight, src=0)
        self._received_weights.append((name, weight))
        if empty_cache:
            received, self._received_weights = self._received_weights, []
            self.model_runner.reload_weights(weights_iterator=received)
