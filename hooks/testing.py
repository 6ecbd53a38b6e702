"""Check a loss plugin's rank side on CPU, through OpenRLHF 0.11.2's real training step.

    python -m openrlhf_hooks.testing --loss_plugin NAME [--NAME.knob VALUE ...] [--steps 2]
        [--advantages zero|random] [--tolerance 1e-5] [--keep DIR] [other launcher flags]

It trains a tiny Qwen2 on one fixed batch of 8 multi-turn samples (turns of action tokens between
observation tokens, unequal lengths) twice, with the plugin installed by the hook layer exactly as
in a run: the host's DeepspeedStrategy, Actor, replay buffer, ActorPPOTrainer.ppo_train and
training_step (with their loss normalisers, `loss_batch_info`), DeepSpeed ZeRO-2, over gloo:

- reference: 1 rank, the whole batch in one micro-batch (gas 1);
- split:     2 ranks, 2 micro-batches of 2 samples each per rank (gas 2).

A term normalised like the host (docs/plugins.md, "Normalise like the host") gives both the same
gradient at every optimizer step; a plain per-micro-batch `.mean()` does not, because the
micro-batches hold different numbers of action tokens. With `--advantages zero` (the default) the
host's policy loss has no gradient, so the gradient compared is the plugin's alone. It also reports
whether every rank returned the same metrics and the same state_dict, as the host needs.

From Python (e.g. in your plugin's tests):

    from openrlhf_hooks.testing import check_normalisation
    report = check_normalisation(["--loss_plugin", "myplugin", "--myplugin.coef", "0.1"])
    assert report.ok, report.describe()

Two things differ from a `--cpu` run, both to make the comparison exact: training is in float32
(the host offers only bf16 and fp16, so this module lets its convert_to_torch_dtype accept "fp32"
in the worker processes it starts), and the rollout is replaced by the fixed batch. The host's
CUDA-only calls are replaced by CPU mode's REPLACEMENTS (hooks/cpu_mode.py), as in a `--cpu` run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

ROWS = 8  # samples in the fixed batch: 4 prompts x 2 samples
LENGTH = 24  # tokens per sample
# turn layouts (runs of action tokens separated by observation tokens), cycled over the rows
TURNS = [[(3, 7), (10, 14), (18, 22)], [(3, 9), (12, 18)], [(3, 22)], [(5, 6), (8, 12), (15, 20)]]
REFERENCE = {"world": 1, "micro_batch_size": ROWS}  # gas 1
SPLIT = {"world": 2, "micro_batch_size": 2}  # 4 samples per rank: gas 2
WORKER_TIMEOUT_S = 900


def tiny_qwen2(path: str | Path, initializer_range: float = 0.02, vocab_size: int = 128) -> Path:
    """A 2-layer Qwen2 saved to `path` (no tokenizer: training reads token ids only). A larger
    initializer_range gives sharper next-token distributions, so samples differ in entropy."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return Path(path)


def sample_batch(step: int, rows: int, vocab: int, zero_advantages: bool):
    """The same multi-turn samples at every step (each rank takes its rows); advantages vary by
    step unless zero. Returns sequences, attention_mask, action_mask, old_log_probs, advantages."""
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
    if zero_advantages:
        advantages.zero_()
    return sequences, attention_mask, action_mask, old_log_probs * action_mask, advantages * action_mask


def rank_experience(step: int, rows: int, vocab: int, zero_advantages: bool, rank: int, world: int) -> Any:
    """This rank's rows of sample_batch(...), as the host's Experience for its replay buffer."""
    from openrlhf.trainer.ppo_utils.experience import Experience

    sequences, attention_mask, action_mask, old_log_probs, advantages = sample_batch(step, rows, vocab, zero_advantages)
    per_rank = rows // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    return Experience(
        sequences=sequences[mine],
        attention_mask=attention_mask[mine],
        action_mask=action_mask[mine],
        action_log_probs=old_log_probs[mine],
        advantages=advantages[mine],
        total_length=attention_mask[mine].sum(-1),
        response_length=action_mask[mine].sum(-1),
        info={},
    )


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
    from .plugins import get_registry
    from .train_ppo_ray import resolve, run_host
    from .trainer import ARGS_KEY

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

    from .trainer import install

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


def _worker(out_path: str, init_file: str, steps: int, zero_advantages: bool, argv: list[str]) -> None:
    """One rank of a check (RANK and WORLD_SIZE in the environment); saves its record to out_path."""
    from . import cpu_mode

    cpu_mode.activate()
    import deepspeed
    import torch.distributed as dist
    from .trainer import ARGS_KEY

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


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all parameters (0 when both are zero, inf when only a is)."""
    num = math.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a))
    den = math.sqrt(sum(float((a[k] ** 2).sum()) for k in a))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def _same(values: list) -> bool:
    """Every rank's plain value is the same; NaN equals NaN here (JSON writes floats exactly)."""
    texts = [json.dumps(value, sort_keys=True, default=repr) for value in values]
    return all(text == texts[0] for text in texts[1:])


@dataclass
class NormalisationReport:
    """What check_normalisation found. differences: per optimizer step, the relative difference of
    the split run's gradient from the reference's; gradient_norm: the reference's first gradient norm."""

    differences: list[float]
    gradient_norm: float
    tolerance: float
    metrics_agree: bool
    states_agree: bool
    gas: tuple[int, int]  # (reference, split) as DeepSpeed ran them
    reference_metrics: list[dict] = field(default_factory=list)
    split_metrics: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.gas == (1, 2)
            and self.gradient_norm > 0
            and all(difference <= self.tolerance for difference in self.differences)  # False for NaN
            and self.metrics_agree
            and self.states_agree
        )

    def describe(self) -> str:
        lines = [
            f"gradient, 2 ranks x gas {self.gas[1]} against 1 rank x gas {self.gas[0]}, relative difference per optimizer step: "
            + ", ".join(f"{d:.2e}" for d in self.differences)
            + f" (tolerance {self.tolerance:.0e}; reference gradient norm {self.gradient_norm:.3e})",
            f"metrics identical on every rank: {'yes' if self.metrics_agree else 'NO'}",
            f"state_dict identical on every rank: {'yes' if self.states_agree else 'NO'}",
        ]
        if self.gas != (1, 2):
            lines.append("the flags changed the split (gas must be 1 and 2): leave --train.* batch sizes to the check")
        if self.gradient_norm == 0:
            lines.append("the reference gradient is zero: with --advantages zero the plugin's term must depend on the policy")
        lines.append(f"reference metrics (last step): {self.reference_metrics[-1] if self.reference_metrics else {}}")
        lines.append(f"split metrics (last step, rank 0): {self.split_metrics[-1] if self.split_metrics else {}}")
        lines.append("OK: the plugin's term is normalised like the host's loss" if self.ok else "FAILED")
        return "\n".join(lines)


def check_normalisation(
    argv: Sequence[str],
    *,
    steps: int = 2,
    zero_advantages: bool = True,
    tolerance: float = 1e-5,
    out_dir: Optional[str | Path] = None,
) -> NormalisationReport:
    """Train the same batch as REFERENCE (1 rank, gas 1) and SPLIT (2 ranks, gas 2) with the plugin
    in `argv` (launcher flags: --loss_plugin NAME and its knobs) and compare what the ranks did."""
    with tempfile.TemporaryDirectory(prefix="openrlhf-hooks-check-") as scratch:
        folder = Path(out_dir) if out_dir is not None else Path(scratch)
        common = dict(out_dir=folder, steps=steps, zero_advantages=zero_advantages)
        reference = train_ranks(argv, **REFERENCE, **common)
        split = train_ranks(argv, **SPLIT, **common)
    differences = [relative_difference(a, b) for a, b in zip(reference[0]["grads"], split[0]["grads"])]
    if len(reference[0]["grads"]) != len(split[0]["grads"]):
        differences.append(math.inf)  # a different number of optimizer steps cannot match
    first = reference[0]["grads"][0] if reference[0]["grads"] else {}
    gradient_norm = math.sqrt(sum(float((g**2).sum()) for g in first.values()))
    return NormalisationReport(
        differences=differences or [math.inf],
        gradient_norm=gradient_norm,
        tolerance=tolerance,
        metrics_agree=_same([record["metrics"] for record in split]),
        gas=(reference[0]["gas"], split[0]["gas"]),
        states_agree=_same([record["states"] for record in split]),
        reference_metrics=reference[0]["metrics"],
        split_metrics=split[0]["metrics"],
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--_worker"]:
        out_path, init_file, steps, advantages, *flags = argv[1:]
        _worker(out_path, init_file, int(steps), advantages == "zero", flags)
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m openrlhf_hooks.testing",
        description="Check that a loss plugin's term is normalised like OpenRLHF's loss: train one fixed batch on "
        "1 rank (gas 1) and on 2 gloo ranks (gas 2) through the host's real trainer and DeepSpeed, on CPU, and "
        "compare the gradients. Other flags go to the launcher (--loss_plugin NAME --NAME.knob VALUE ...).",
    )
    parser.add_argument("--steps", type=int, default=2, help="RL steps per run (default 2)")
    parser.add_argument(
        "--advantages", choices=("zero", "random"), default="zero",
        help="zero (default): only the plugin's term has a gradient; random: the host's policy loss too",
    )  # fmt: skip
    parser.add_argument("--tolerance", type=float, default=1e-5, help="largest relative gradient difference accepted")
    parser.add_argument("--keep", type=Path, help="keep the runs' logs and records in this folder")
    args, flags = parser.parse_known_args(argv)
    if "--loss_plugin" not in flags and not any(flag.startswith("--loss_plugin=") for flag in flags):
        parser.error("give --loss_plugin NAME (and its flags)")
    if args.steps < 1:
        parser.error(f"--steps={args.steps} is invalid: expected an integer >= 1")
    from .api import PluginConfigError
    from .train_ppo_ray import LauncherError, host_import_placeholders

    try:  # the host's and the plugin's checks, here before any rank starts (no vLLM or flash-attn needed)
        with host_import_placeholders():
            host_args([*host_flags("tiny-qwen2", SPLIT["world"], SPLIT["micro_batch_size"]), *flags])
    except (LauncherError, PluginConfigError) as exc:
        parser.error(str(exc))
    print(f"[check] training the fixed batch on 1 rank (gas 1), then on 2 ranks (gas 2): {' '.join(flags)}", file=sys.stderr)
    try:
        report = check_normalisation(
            flags, steps=args.steps, zero_advantages=args.advantages == "zero", tolerance=args.tolerance, out_dir=args.keep
        )
    except RuntimeError as exc:
        print(f"[check] {exc}", file=sys.stderr)
        return 1
    print(report.describe())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
