"""Training ranks of a check: the host's parsed args, one rank built as the host builds it, and
`train_ranks`, which starts 1 or 2 gloo rank processes (`python -m openrlhf_hooks.testing --_worker`)
and collects what each did."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .fixed_batch import ROWS, rank_experience
from .tiny_model import tiny_qwen2

WORKER_TIMEOUT_S = 900


def host_flags(model_dir: str | Path, world: int, micro_batch_size: int) -> list[str]:
    """Launcher flags for one rank of a check: the fixed batch's shape and the split."""
    return [
        "--actor.model_name_or_path", str(model_dir),
        "--ds.attn_implementation", "eager",
        "--ds.zero_stage", "2",
        "--algo.advantage.estimator", "group_norm",
        "--rollout.batch_size", str(ROWS // 2),
        "--rollout.n_samples_per_prompt", "2",
        "--train.batch_size", str(ROWS),
        "--train.micro_batch_size", str(micro_batch_size),
        "--actor.num_gpus_per_node", str(world),
        "--train.agent_func_path", "agent.py",
        "--algo.kl.init_coef", "0",
    ]  # fmt: skip


def host_args(argv: Sequence[str]) -> Any:
    """The host's parsed args for `argv` (launcher flags): OpenRLHF's own parser and validation,
    and the plugin's (its config and check_host), stopped where train() would start Ray; the plugin
    settings are attached. Raises LauncherError or PluginConfigError on bad flags."""
    from ..plugins import get_registry
    from ..train_ppo_ray import resolve, run_host
    from ..trainer import ARGS_KEY

    registry = get_registry()
    settings, _, rest = resolve(argv, registry)
    captured: dict = {}

    class _ArgsReady(Exception):
        pass

    def on_args_ready(args):
        if settings is not None:
            setattr(args, ARGS_KEY, settings)
            if settings.get("loss_plugin"):
                registry.loss_plugin(settings["loss_plugin"]).check_host(args, settings["config"])
        captured["args"] = args
        raise _ArgsReady

    try:
        run_host(rest, on_args_ready)
    except _ArgsReady:
        pass
    return captured["args"]


def build_rank(args: Any, scheduler_steps: int):
    """One training rank as the host builds it: (strategy, actor, trainer, hooked), the loss plugin
    installed by openrlhf_hooks.trainer.install. The process group must exist (gloo)."""
    import openrlhf.trainer.ray.ppo_actor as ppo_actor_module
    from openrlhf.models import Actor
    from openrlhf.utils import get_strategy

    from ..trainer import install

    # flash-attn's packing helpers need CUDA; the padded path computes the same thing
    args.ds.packing_samples = False
    strategy = get_strategy(args)
    strategy.setup_distributed()
    actor = Actor(
        args.actor.model_name_or_path,
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
        scheduler_steps=scheduler_steps,
    )
    actor, optim, scheduler = strategy.prepare((actor, actor_cfg))
    trainer = ppo_actor_module.ActorPPOTrainer(
        strategy, actor, None, optim, scheduler, micro_train_batch_size=args.train.micro_batch_size, eps_clip=args.actor.eps_clip
    )
    return strategy, actor, trainer, install(trainer, strategy)


def record_gradients(strategy: Any) -> list:
    """Wraps strategy.optimizer_step to keep the full gradients DeepSpeed is about to apply, one
    {name: tensor} per optimizer step (the host calls optimizer_step after every micro-batch)."""
    import deepspeed

    grads: list = []
    host_step = strategy.optimizer_step

    def optimizer_step(optimizer, model, scheduler, name="model", **kwargs):
        if model.model.is_gradient_accumulation_boundary():
            grads.append({n: deepspeed.utils.safe_get_full_grad(p).float().clone() for n, p in model.model.named_parameters()})
        return host_step(optimizer, model, scheduler, name=name, **kwargs)

    strategy.optimizer_step = optimizer_step
    return grads


def train_float32() -> None:
    """Let the host load and train in float32 (args.ds.param_dtype = "fp32"); this process only."""
    import openrlhf.utils.utils as host_utils

    host_convert = host_utils.convert_to_torch_dtype
    host_utils.convert_to_torch_dtype = lambda dtype: torch.float32 if dtype == "fp32" else host_convert(dtype)


def worker(out_path: str, init_file: str, steps: int, zero_advantages: bool, argv: list[str]) -> None:
    """One rank of a check (RANK and WORLD_SIZE in the environment); saves its record to out_path."""
    from .. import cpu_mode

    cpu_mode.activate()
    import deepspeed
    import torch.distributed as dist
    from ..trainer import ARGS_KEY

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    args = host_args(argv)
    settings = getattr(args, ARGS_KEY, None)
    if not settings or not settings.get("loss_plugin"):
        raise SystemExit("openrlhf_hooks.testing: give --loss_plugin NAME")
    settings["rl_steps"] = steps  # what the launcher counts before Ray starts
    train_float32()
    args.ds.param_dtype = "fp32"
    # a file rendezvous: no TCP port to race for; DeepSpeed then finds the group initialised
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    deepspeed.init_distributed(dist_backend="gloo")
    strategy, actor, trainer, hooked = build_rank(args, scheduler_steps=steps)
    grads = record_gradients(strategy)
    vocab = actor.model.module.config.vocab_size
    metrics, losses, states = [], [], []
    for step in range(steps):
        trainer.replay_buffer.append(rank_experience(step, ROWS, vocab, zero_advantages, rank, world))
        hooked.begin_step()
        status = trainer.ppo_train(0.0)
        metrics.append(hooked.end_step())
        trainer.replay_buffer.clear()
        losses.append(float(status["policy_loss"]))
        states.append(hooked.state())
    record = {"rank": rank, "world": world, "gas": strategy.accumulated_gradient, "grads": grads,
              "metrics": metrics, "host_policy_loss": losses, "states": states}  # fmt: skip
    torch.save(record, out_path)
    dist.barrier()


def train_ranks(
    argv: Sequence[str],
    *,
    world: int,
    micro_batch_size: int,
    out_dir: str | Path,
    steps: int = 2,
    model_dir: Optional[str | Path] = None,
    zero_advantages: bool = True,
    env: Optional[dict] = None,
    tag: Optional[str] = None,
) -> list[dict]:
    """Train `steps` RL steps on the fixed batch, on `world` gloo ranks with `micro_batch_size`
    samples per micro-batch, with the plugin and flags in `argv`. Returns each rank's record:
    rank, world, gas, grads (one {parameter: full gradient} per optimizer step), metrics (the
    plugin's end_step dict per RL step), host_policy_loss (per RL step), states (per RL step)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model_dir is None:
        model_dir = out_dir / "tiny-qwen2"
        if not (model_dir / "config.json").exists():
            tiny_qwen2(model_dir, initializer_range=0.3)
    tag = tag or f"w{world}-mbs{micro_batch_size}"
    init_file = out_dir / f"{tag}.rendezvous"
    init_file.unlink(missing_ok=True)
    flags = [*host_flags(model_dir, world, micro_batch_size), *argv]
    processes, outputs, logs = [], [], []
    for rank in range(world):
        rank_env = dict(os.environ, **(env or {}), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        rank_env.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed insists on these even when the process group exists (file rendezvous); never dialled
        rank_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
        out = out_dir / f"{tag}-r{rank}.pt"
        log_path = out_dir / f"{tag}-r{rank}.log"
        command = [sys.executable, "-m", "openrlhf_hooks.testing", "--_worker", str(out), str(init_file), str(steps),
                   "zero" if zero_advantages else "random", *flags]  # fmt: skip
        log = open(log_path, "w")
        processes.append(subprocess.Popen(command, env=rank_env, stdout=log, stderr=subprocess.STDOUT))
        outputs.append(out)
        logs.append(log)
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    failed = None
    try:
        # a rank that fails leaves the others waiting in a collective: stop them at once
        while failed is None and any(process.poll() is None for process in processes):
            failed = next((rank for rank, process in enumerate(processes) if process.poll() not in (None, 0)), None)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{tag}: the ranks did not finish within {WORKER_TIMEOUT_S} s; logs in {out_dir}")
            time.sleep(0.2)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for log in logs:
            log.close()
    failed = next((rank for rank, process in enumerate(processes) if process.returncode != 0), failed)
    if failed is not None:
        tail = (out_dir / f"{tag}-r{failed}.log").read_text()[-3000:]
        raise RuntimeError(
            f"{tag}: rank {failed} of {world} exited with {processes[failed].returncode}; its log ends:\n{tail}"
        )
    return [torch.load(path, weights_only=False) for path in outputs]
