"""One demo run through OpenRLHF's own loop: `python -m openrlhf_hooks.train_ppo_ray --cpu` on KeyDoor.

The run folder holds what the host writes (train.log, tensorboard/, ckpt/) and what the demo reads
from it: metrics.jsonl, one row per RL step, rebuilt from the host's TensorBoard files while the run
goes (the progress bars and plots read it). A run resumes from the host's own checkpoint
(`--ckpt.load_enable`); the steps it trains again replace the killed run's rows.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from openrlhf_epo.demo.env import ACTIONS
from openrlhf_epo.demo.io import atomic_write_text

METRIC_FIELDS = (
    "step", "success_rate", "trap_rate", "mean_return", "entropy", "action_entropy", "tail_mass", "epo_entropy", "reference", "lower", "upper",
    "penalty", "beta", "in_corridor", "policy_loss", "turns", "invalid_actions", "skipped_steps", "seconds",
)  # fmt: skip

# metrics.jsonl field <- the host's TensorBoard tag
TAGS = {
    "success_rate": "train/env_success",  # the goal (the door opened), never the trap's coin
    "trap_rate": "train/env_trapped",
    "mean_return": "train/reward",
    "turns": "train/env_turns",
    "invalid_actions": "train/env_invalid_actions",
    # the host's token-mean entropy (--actor.entropy_coef 0 logs it at weight 0), for every variant
    "entropy": "train/entropy_loss",
    # at each reply's first token: entropy over the game's actions, and the mass outside them (--probe_words)
    "action_entropy": "train/probe/action_entropy",
    "tail_mass": "train/probe/tail_mass",
    # EPO's own statistic L_H (--epo.aggregation), the one its corridor bounds
    "epo_entropy": "train/epo/entropy",
    "reference": "train/epo/reference",
    "lower": "train/epo/lower",
    "upper": "train/epo/upper",
    "penalty": "train/epo/penalty",
    "beta": "train/epo/beta",
    "in_corridor": "train/epo/in_corridor",
    "skipped_steps": "train/epo/skipped_steps",
    "policy_loss": "train/policy_loss",
    "seconds": "train/timing/step_total",
}

AGENT_FILE = Path(__file__).with_name("keydoor_agent.py")
MODEL_BUILDERS = {"tiny": "keydoor_model", "realistic": "realistic_model"}  # RunSpec.model -> module with build(path, seed)


@dataclass
class RunSpec:
    """Everything one run needs; plain data (run.json is this, as JSON)."""

    name: str
    run_dir: str
    seed: int
    steps: int
    model_dir: str
    # "tiny": the word-level model of keydoor_model.py, one per seed; "realistic": realistic_model.py's
    # 8k-token model, one per seed; "smollm2": smollm2.py
    model: str = "tiny"
    epo_flags: Optional[dict] = None  # None: the host alone
    env: dict = field(default_factory=dict)
    groups: int = 8
    group_size: int = 8
    lr: float = 1e-3
    ppo_epochs: int = 2
    minibatches: int = 2
    nproc: int = 1
    max_len: int = 320
    save_every: int = 25
    host_fixes: list = field(default_factory=list)  # --host_fixes (openrlhf_hooks.host_fixes), e.g. ["group_norm"]


def prompt_rows(spec: RunSpec) -> list[dict]:
    """One row per layout: `groups` new layouts each step, seeded by the run's seed. The prompt is
    the chat model's instructions (a system turn); the tiny model has none and learns from reward."""
    from .smollm2 import INSTRUCTIONS, TRAP_INSTRUCTIONS

    first = spec.seed * 1_000_000
    prompt = INSTRUCTIONS + (TRAP_INSTRUCTIONS if spec.env.get("coin") else "") if spec.model == "smollm2" else ""
    return [{"prompt": prompt, "label": {**spec.env, "seed": first + i}} for i in range(spec.steps * spec.groups)]


def host_command(spec: RunSpec) -> list[str]:
    """The launcher command line: what a user types, sized for this machine."""
    run_dir = Path(spec.run_dir)
    episodes = spec.groups * spec.group_size
    command = [
        sys.executable, "-m", "openrlhf_hooks.train_ppo_ray", "--cpu",
        "--actor.model_name_or_path", spec.model_dir,
        "--actor.num_nodes", "1", "--actor.num_gpus_per_node", str(spec.nproc),
        "--vllm.num_engines", str(spec.nproc), "--vllm.tensor_parallel_size", "1",
        "--train.colocate_all", "--vllm.gpu_memory_utilization", "0.6",
        "--train.agent_func_path", str(AGENT_FILE),
        "--data.prompt_dataset", str(run_dir / "prompts.jsonl"), "--data.input_key", "prompt", "--data.label_key", "label",
        "--data.max_len", str(spec.max_len),
        "--algo.advantage.estimator", "group_norm", "--algo.kl.init_coef", "0",
        "--rollout.n_samples_per_prompt", str(spec.group_size),
        "--rollout.batch_size", str(spec.groups), "--rollout.micro_batch_size", str(spec.groups),
        "--train.batch_size", str(episodes // spec.minibatches),
        "--train.micro_batch_size", str(max(1, episodes // spec.minibatches // spec.nproc)),
        "--train.max_epochs", str(spec.ppo_epochs), "--train.num_episodes", "1", "--train.seed", str(spec.seed),
        "--ds.zero_stage", "2", "--ds.param_dtype", "bf16",
        "--actor.adam.lr", repr(spec.lr), "--actor.lr_scheduler", "constant",
        "--logger.logging_steps", "1", "--logger.tensorboard_dir", str(run_dir / "tensorboard"),
        "--ckpt.path", str(run_dir / "ckpt"), "--ckpt.save_steps", str(spec.save_every or -1),
        "--ckpt.max_num", "1", "--ckpt.load_enable", "--ckpt.output_dir", str(run_dir / "final"),
        "--actor.entropy_coef", "0",  # the same entropy measure for every variant; weight 0 adds no term
        "--probe_words", ",".join(ACTIONS),  # the decision itself: entropy over the actions, mass outside them
        # every episode weighs the same: with the token mean, the long failed episodes outweigh the short
        # wins and push probability off the action words until most replies are no action at all
        "--actor.loss_agg_mode", "seq-mean-token-mean",
    ]  # fmt: skip
    if spec.host_fixes:
        command += ["--host_fixes", ",".join(spec.host_fixes)]
    if spec.epo_flags is not None:
        command += ["--loss_plugin", "epo"]
        for name, value in spec.epo_flags.items():
            command += [f"--epo.{name}", str(value)]
    return command


class ScalarLog:
    """The scalars of the host's TensorBoard files under a folder, read incrementally: each `update()`
    reads only the events written since the last one. A later file (a resumed run) wins a step."""

    def __init__(self, tensorboard_dir: Path):
        self.folder = Path(tensorboard_dir)
        self.loaders: dict[Path, object] = {}
        self.per_file: dict[Path, dict[str, dict[int, float]]] = {}

    def update(self) -> dict[str, dict[int, float]]:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
        from tensorboard.util import tensor_util

        for path in self.folder.rglob("events.out.tfevents.*"):
            if path not in self.loaders:
                self.loaders[path] = EventFileLoader(str(path))
                self.per_file[path] = {}
            scalars = self.per_file[path]
            for event in self.loaders[path].Load():
                for value in event.summary.value:
                    if value.HasField("simple_value"):
                        number = value.simple_value
                    elif value.HasField("tensor") and not value.tensor.tensor_shape.dim:
                        number = float(tensor_util.make_ndarray(value.tensor))
                    else:
                        continue
                    scalars.setdefault(value.tag, {})[event.step] = number
        merged: dict[str, dict[int, float]] = {}
        for path in sorted(self.per_file, key=lambda p: p.stat().st_mtime):
            for tag, points in self.per_file[path].items():
                merged.setdefault(tag, {}).update(points)
        return merged


def read_event_file(path: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalars in one TensorBoard event file."""
    log = ScalarLog(Path(path).parent)
    log.update()
    return log.per_file[Path(path)]


def read_scalars(tensorboard_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the host's TensorBoard files under a folder."""
    return ScalarLog(tensorboard_dir).update()


def metric_rows(scalars: dict[str, dict[int, float]]) -> list[dict]:
    """One metrics.jsonl row per RL step the host logged any of TAGS at (TensorBoard step 1 is row
    step 0): a run of another environment (no env_success) still gets its rows."""
    steps = sorted(set().union(*(scalars.get(tag, {}) for tag in TAGS.values())))
    rows = []
    for step in steps:
        row: dict = {key: None for key in METRIC_FIELDS}
        row["step"] = step - 1
        for key, tag in TAGS.items():
            value = scalars.get(tag, {}).get(step)
            row[key] = value if value is not None and math.isfinite(value) else None
        rows.append(row)
    return rows


def write_metrics(spec: RunSpec, log: Optional[ScalarLog] = None) -> int:
    """Rebuilds metrics.jsonl from the TensorBoard files (through `log`, incrementally, when given);
    returns the number of rows."""
    log = log or ScalarLog(Path(spec.run_dir) / "tensorboard")
    rows = metric_rows(log.update())
    atomic_write_text(Path(spec.run_dir) / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)


def prepare(spec: RunSpec) -> None:
    """run.json, prompts.jsonl and the model (made once: the tiny model per seed, SmolLM2 for all); idempotent.
    Call it for every run before any starts."""
    from importlib import import_module

    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(spec.model_dir)
    if not (model_dir / "config.json").exists():
        # built aside and renamed: a crash never leaves a half-written model behind
        staging = model_dir.with_name(model_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted build
        if spec.model == "smollm2":
            import_module("openrlhf_epo.demo.smollm2").convert(staging)
        else:
            import_module(f"openrlhf_epo.demo.{MODEL_BUILDERS[spec.model]}").build(staging, seed=spec.seed)
        staging.rename(model_dir)
    atomic_write_text(run_dir / "run.json", json.dumps(asdict(spec), indent=2) + "\n")
    atomic_write_text(run_dir / "prompts.jsonl", "".join(json.dumps(row) + "\n" for row in prompt_rows(spec)))


class RunFailed(RuntimeError):
    pass


def run(spec: RunSpec, poll_seconds: float = 2.0, stop: Optional[threading.Event] = None) -> Path:
    """Trains one run (prepared) to its end with the host's launcher; returns its metrics.jsonl.
    Setting `stop` stops the host (Ctrl-C to its process group) and raises RunFailed; its checkpoints stay."""
    run_dir = Path(spec.run_dir)
    log_path = run_dir / "train.log"
    stop = stop or threading.Event()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(host_command(spec))}\n")
        log.flush()
        # its own process group: stopping the demo stops Ray and vLLM with it
        process = subprocess.Popen(
            host_command(spec), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        scalar_log = ScalarLog(run_dir / "tensorboard")
        try:
            while process.poll() is None and not stop.wait(poll_seconds):
                write_metrics(spec, scalar_log)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    rows = write_metrics(spec, scalar_log)
    if stop.is_set():
        raise RunFailed("stopped")
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-1:] or [""]
        raise RunFailed(f"the host exited {process.returncode} (log: {log_path}; last line: {tail[0][-300:]})")
    if rows < spec.steps:
        raise RunFailed(f"the host logged {rows} of {spec.steps} steps (log: {log_path})")
    return run_dir / "metrics.jsonl"
