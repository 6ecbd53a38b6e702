"""CPU mode: OpenRLHF 0.11.2's unchanged train_ppo_ray loop on a machine without CUDA.

Opt-in only: `python -m openrlhf_hooks.train_ppo_ray --cpu ...` (or `openrlhf-hooks train-ppo-ray
--cpu`). For smoke runs of an agent file or a plugin on a laptop, for the demo and for CI; GPU runs
never load this module.

OpenRLHF calls CUDA unconditionally in a few places. Every replacement is listed in REPLACEMENTS
with the host's file:line and why; nothing else in the runtime stands in for a host part. They are
applied by `activate()` in every process of the run:
  - the driver: the launcher calls it before the host's module runs;
  - every Ray worker: the launcher sets OPENRLHF_HOOKS_CPU_MODE=1 and `worker_process_setup_hook` =
    openrlhf_hooks.worker_setup.run in the runtime_env of the host's own `ray.init` (a Ray cluster
    started by hand gets them the same way, because the driver still calls ray.init);
  - vLLM's engine-core process, which vLLM spawns itself: it needs no set-up, because the only host
    code it runs is the worker extension, replaced by name with hooks/openrlhf_hooks/cpu_worker.py.

Ray is told the node has as many GPUs as the run's placement groups ask for, so they schedule on
CPUs; DeepSpeed uses its CPU accelerator (DS_ACCELERATOR=cpu) and gloo; vLLM is the CPU build.
Flags that cannot be honoured on CPU are refused with one line before Ray starts (check_args).
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .host_imports import install_placeholders

WORKER_EXTENSION = "openrlhf_hooks.cpu_worker.CPUWorkerWrap"

# Environment every process of a CPU run needs (set when unset; the user's values win).
ENV_DEFAULTS = {
    "DS_ACCELERATOR": "cpu",  # DeepSpeed's CPU accelerator, gloo backend
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache per vLLM engine (vLLM-CPU's default is 4)
}

# Host flags CPU mode adds when the command line does not give them.
FLAG_DEFAULTS = (
    ("--vllm.sync_backend", "gloo"),  # no NCCL
    ("--ds.attn_implementation", "eager"),  # no flash-attn
    ("--vllm.enforce_eager", None),  # no CUDA graphs; vLLM-CPU's torch.compile warm-up is minutes on 2 cores
)

RAY_OBJECT_STORE_BYTES = 1 << 30


class CPUModeError(Exception):
    """A flag CPU mode cannot honour (one line, naming it)."""


# -- what the host's modules see as torch.cuda ------------------------------------------------


class _CudaOnCPU:
    """`torch.cuda` for the host modules listed in REPLACEMENTS: the current device is the CPU;
    synchronize, empty_cache and set_device have nothing to do (CPU kernels are synchronous, and
    gloo work is waited on by the calls that start it). Anything else is the real torch.cuda."""

    def current_device(self):
        return torch.device("cpu")

    def set_device(self, device):
        pass

    def synchronize(self, device=None):
        pass

    def empty_cache(self):
        pass

    def current_stream(self, device=None):
        return None  # only passed on as the stream of a gloo broadcast, which has none

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    def __reduce__(self):  # Ray pickles host actor classes by value, with their module globals
        return (_CudaOnCPU, ())


class _TorchOnCPU:
    """The `torch` global of a host module in CPU mode: real torch except `torch.cuda`, and
    `torch.device("cuda:N")`, which names the CPU (trainer/ppo_utils/replay_buffer.py:40).
    Not a module object: Ray pickles modules by name, which would bring the real torch back."""

    def __init__(self):
        self.cuda = _CudaOnCPU()

    def device(self, *args, **kwargs):
        if args and isinstance(args[0], str) and args[0].startswith("cuda"):
            return torch.device("cpu")
        return torch.device(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(torch, name)

    def __reduce__(self):
        return (_TorchOnCPU, ())


def _torch_on_cpu(original: Any) -> Any:
    return _TorchOnCPU()


def _device_mesh_on_cpu(original: Callable) -> Callable:
    def init_device_mesh(device_type, *args, **kwargs):
        return original("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    return init_device_mesh


def _sequential_zero3_gathers(original: Callable) -> Callable:
    def ds_config(*args, **kwargs):
        config = original(*args, **kwargs)
        zero = config.get("zero_optimization", {})
        if zero.get("stage") == 3:
            zero["stage3_allgather_sequential"] = True
        return config

    return ds_config


def barrier_without_cuda_sync() -> None:
    torch.distributed.barrier()


def _barrier_only(original: Any) -> Callable:
    return barrier_without_cuda_sync


def gloo_init_process_group(master_address, master_port, rank, world_size, device=None):
    """The DeepSpeed rank 0 end of the weight-sync group (see cpu_worker.GlooBroadcastGroup)."""
    from .cpu_worker import GlooBroadcastGroup

    return GlooBroadcastGroup(master_address, master_port, rank, world_size)


def _gloo_group(original: Any) -> Callable:
    return gloo_init_process_group


class _RolloutActorOnCPU:
    """The host's RolloutRayActor (a Ray actor class) with CPU mode's worker extension passed to vLLM."""

    def __init__(self, actor_class: Any):
        self._actor_class = actor_class

    def options(self, *args, **kwargs):
        return _RolloutActorOnCPU(self._actor_class.options(*args, **kwargs))

    def remote(self, *args, **kwargs):
        kwargs["worker_extension_cls"] = WORKER_EXTENSION
        return self._actor_class.remote(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._actor_class, name)


def _rollout_actor_on_cpu(original: Any) -> Any:
    return _RolloutActorOnCPU(original)


@dataclass(frozen=True)
class Replacement:
    module: str  # the host module whose global is rebound
    name: str  # the global
    host: str  # where the host uses it (file:line under openrlhf/)
    why: str
    make: Callable[[Any], Any]  # original -> replacement


_DS = "openrlhf.utils.deepspeed.deepspeed"
# Not a CUDA call: a DeepSpeed 0.19.6 race that only gloo exposes. Init._allgather_params_coalesced
# (deepspeed/runtime/zero/partition_parameters.py, about line 2082) starts one async all-gather per
# parameter and waits on the last only; gloo finishes them out of order and the CPU accelerator skips
# the synchronize, so under ZeRO-3 loading a late gather can overwrite a weight just read from the
# checkpoint with uninitialised memory (NaN logits in about 1 run in 5). Fixed upstream after 0.19.6
# (DeepSpeed PR #8539); sequential gathers avoid it (0 failures in 25 runs, bit-identical results).
ZERO3_RACE = "ZeRO-3 configs get stage3_allgather_sequential (a DeepSpeed 0.19.6 all-gather race on gloo)"
_DIST = "openrlhf.utils.distributed_util"
_ACTOR = "openrlhf.trainer.ray.ppo_actor"

REPLACEMENTS: tuple[Replacement, ...] = (
    Replacement(_DS, "torch", "utils/deepspeed/deepspeed.py:97,614,633-634",
                "torch.cuda.set_device(local_rank); torch.cuda.current_device() as the device of all_reduce/all_gather",
                _torch_on_cpu),
    Replacement(_DS, "init_device_mesh", "utils/deepspeed/deepspeed.py:105-107",
                "the dp/sp/tp device mesh is built on 'cuda'", _device_mesh_on_cpu),
    Replacement(_DS, "get_train_ds_config", "utils/deepspeed/deepspeed.py:437 (deepspeed_utils.py:7-75)",
                ZERO3_RACE, _sequential_zero3_gathers),
    Replacement(_DS, "get_eval_ds_config", "utils/deepspeed/deepspeed.py:491 (deepspeed_utils.py:78)",
                ZERO3_RACE, _sequential_zero3_gathers),
    Replacement(_DS, "torch_dist_barrier_and_cuda_sync", "utils/deepspeed/deepspeed.py:597,757",
                "barrier + torch.cuda.synchronize (utils/distributed_util.py:1-10)", _barrier_only),
    Replacement(_DIST, "torch_dist_barrier_and_cuda_sync", "utils/distributed_util.py:1-10",
                "barrier + torch.cuda.synchronize, for importers not listed here", _barrier_only),
    Replacement(_DIST, "stateless_init_process_group", "utils/distributed_util.py:13-26",
                "PyNccl communicator for the DeepSpeed -> vLLM weight broadcast", _gloo_group),
    Replacement(_ACTOR, "torch", "trainer/ray/ppo_actor.py:148,171,417,436,489,600-605,627",
                "torch.cuda.current_device() as a device, current_stream, synchronize, empty_cache", _torch_on_cpu),
    Replacement(_ACTOR, "torch_dist_barrier_and_cuda_sync", "trainer/ray/ppo_actor.py:106,466,490,683",
                "barrier + torch.cuda.synchronize", _barrier_only),
    Replacement(_ACTOR, "stateless_init_process_group", "trainer/ray/ppo_actor.py:147-149",
                "PyNccl communicator on DeepSpeed rank 0 for the weight broadcast", _gloo_group),
    Replacement("openrlhf.trainer.ray.ppo_critic", "torch", "trainer/ray/ppo_critic.py:83,268,286-291",
                "torch.cuda.current_device() as a device, empty_cache, synchronize", _torch_on_cpu),
    Replacement("openrlhf.trainer.ray.launcher", "torch", "trainer/ray/launcher.py:64-65,136,190",
                "torch.cuda.current_device() as a device, empty_cache, synchronize", _torch_on_cpu),
    Replacement("openrlhf.trainer.ppo_utils.replay_buffer", "torch", "trainer/ppo_utils/replay_buffer.py:40,104,129,159,165",
                "a 'cuda:N' target device; torch.cuda.current_device() as the device of step counts", _torch_on_cpu),
    Replacement("openrlhf.trainer.ray.vllm_engine", "RolloutRayActor", "trainer/ray/vllm_engine.py:267",
                "worker_extension_cls WorkerWrap receives weights on 'cuda' over PyNccl and loads them in place, "
                "which vLLM-CPU's repacked weights ignore (see cpu_worker.CPUWorkerWrap)", _rollout_actor_on_cpu),
)  # fmt: skip

# flash_attn: imported at load by models/ring_attn_utils.py:3-4 and used only for packing, which
# check_args refuses; a placeholder that raises on use stands for it when it is not installed.
IMPORT_ONLY_PACKAGES = ("flash_attn",)

_originals: list[tuple[Any, str, Any]] = []
_placeholder_finder: Optional[Any] = None


def active() -> bool:
    return bool(_originals)


def activate() -> None:
    """Apply CPU mode in this process (idempotent). Every Ray worker runs it (worker_setup.run)."""
    global _placeholder_finder
    if _originals:
        return
    for name, value in ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    _placeholder_finder = install_placeholders(IMPORT_ONLY_PACKAGES)
    for replacement in REPLACEMENTS:
        module = importlib.import_module(replacement.module)
        original = getattr(module, replacement.name)
        _originals.append((module, replacement.name, original))
        setattr(module, replacement.name, replacement.make(original))


def deactivate() -> None:
    """Undo activate() in this process (tests)."""
    global _placeholder_finder
    while _originals:
        module, name, original = _originals.pop()
        setattr(module, name, original)
    if _placeholder_finder is not None:
        sys.meta_path.remove(_placeholder_finder)
        _placeholder_finder = None


# -- the launcher's side -----------------------------------------------------------------------


def _given(argv: Sequence[str], flag: str) -> bool:
    return any(token == flag or token.startswith(flag + "=") for token in argv)


def with_flag_defaults(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """argv plus FLAG_DEFAULTS the user did not give; and those added, as they read."""
    argv = list(argv)
    added = []
    for flag, value in FLAG_DEFAULTS:
        if not _given(argv, flag):
            added.append(flag if value is None else f"{flag} {value}")
            argv.extend([flag] if value is None else [flag, value])
    return argv, added


def check_args(args: Any) -> None:
    """Refuse, with one line, what CPU mode cannot run. `args`: the host's parsed, validated args."""
    refusals = (
        (args.vllm.sync_backend != "gloo", f"--vllm.sync_backend {args.vllm.sync_backend}: CPU mode syncs weights over gloo"),
        (getattr(args.vllm, "sync_with_ray", False), "--vllm.sync_with_ray: CPU mode syncs weights over its own gloo group"),
        (args.ds.packing_samples, "--ds.packing_samples (also turned on by --train.dynamic_batch_enable and "
                                  "--ds.ring_attn_size > 1): packing needs flash-attn, which needs CUDA"),
        ("flash_attention" in str(args.ds.attn_implementation),
         f"--ds.attn_implementation {args.ds.attn_implementation}: flash-attn needs CUDA; use eager or sdpa"),
        (args.vllm.enable_sleep, "--vllm.enable_sleep: vLLM-CPU has no sleep mode"),
        (args.ds.enable_sleep, "--ds.enable_sleep: offloading to CPU is CUDA-only in the host (deepspeed_utils.py:187-211)"),
        (args.train.enable_ema, "--train.enable_ema: the host moves the EMA model to 'cuda' (ppo_actor.py:365-367)"),
        (args.vllm.tensor_parallel_size > 1, f"--vllm.tensor_parallel_size {args.vllm.tensor_parallel_size}: "
                                              "CPU mode runs one vLLM process per engine"),
        (args.ds.tensor_parallel_size > 1, f"--ds.tensor_parallel_size {args.ds.tensor_parallel_size}: "
                                            "DeepSpeed tensor parallelism is not supported in CPU mode"),
    )  # fmt: skip
    for refused, message in refusals:
        if refused:
            raise CPUModeError(f"--cpu cannot run {message}")


def placement_gpus(args: Any) -> int:
    """How many GPUs the run's placement groups ask for at most (colocation only lowers it)."""
    def per(role):
        group = getattr(args, role, None)
        return group.num_nodes * group.num_gpus_per_node if group is not None and hasattr(group, "num_gpus_per_node") else 0

    engines = args.vllm.num_engines * args.vllm.tensor_parallel_size if args.vllm.num_engines else 0
    return per("actor") + per("ref") + per("critic") + per("reward") + engines


def ray_init_kwargs(args: Any, connecting: bool) -> dict:
    """What CPU mode adds to the host's ray.init of a local node: its resources (GPUs it does not
    have, so placement groups schedule); nothing when connecting to a running cluster."""
    if connecting:
        return {}
    gpus = placement_gpus(args)
    return {"num_gpus": gpus, "num_cpus": max(8, 2 * gpus), "object_store_memory": RAY_OBJECT_STORE_BYTES}
