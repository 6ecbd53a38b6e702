"""`openrlhf-epo study CONFIG.yaml`: arms x seeds through OpenRLHF's own loop, and their comparison.

A study is a YAML file (configs/study/; docs/demo.md, "Studies"): the task, the run sizes, the seeds,
the arms (the host alone, or EPO with some knobs) and the comparisons, fixed before any run is seen
(the pre-registered rule of `stats.compare`). Each arm and seed is one demo run (`openrlhf_run.RunSpec`)
in OUT/<arm>-s<seed>, trained by `runner.run_all`. A study spans sessions: a finished run is skipped,
one cut short resumes from the host's checkpoint, and a run whose saved run.json differs from what the
config asks now is refused, so that a changed config never mixes with old results. After each run,
results.csv, study.json, study.md and the pictures are rewritten from every finished run.

Every input is checked before anything starts: a bad one is a StudyConfigError naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from openrlhf_epo.demo import runner
from openrlhf_epo.demo.io import atomic_write_json, atomic_write_text
from openrlhf_epo.demo.stats import RESULT_COLUMNS, read_rows, run_results, study_summary, study_table

CONFIG_KEYS = ("name", "out", "model", "env", "sizes", "host_fixes", "seeds", "arms", "comparisons", "min_effect", "save_every")
DEFAULT_MIN_EFFECT = 0.2
DEFAULT_SAVE_EVERY = 10  # host checkpoints: a run cut short trains at most 9 steps again
PLAN_FILE = "study-plan.json"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a name that is also a plain folder name
# RunSpec fields a saved run.json may differ in without changing what the run trained: where the
# folders lie (an --out given another way) and how often the host checkpointed
UNCOMPARED_FIELDS = ("run_dir", "model_dir", "save_every")


class StudyConfigError(ValueError):
    """A bad study input; the message is one line naming the key or the run."""


@dataclass
class Study:
    """What a study's results need, saved as OUT/study-plan.json: `openrlhf-epo plot OUT` redraws them
    from it without the config or the plugin registry."""

    name: str
    out: Path
    arms: list[str]
    seeds: list[int]
    steps: int
    comparisons: list[tuple[str, str]]
    min_effect: float

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.out / f"{arm}-s{seed}"

    def save(self) -> None:
        plan = {**dataclasses.asdict(self), "comparisons": [list(pair) for pair in self.comparisons]}
        del plan["out"]  # the folder the plan lies in: it may move
        atomic_write_json(self.out / PLAN_FILE, plan)

    @classmethod
    def load(cls, out: Path) -> "Study":
        plan = json.loads((Path(out) / PLAN_FILE).read_text())
        return cls(**{**plan, "out": Path(out), "comparisons": [tuple(pair) for pair in plan["comparisons"]]})


# -- the config -----------------------------------------------------------------------------------


def read_config(path: Path) -> dict:
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise StudyConfigError(f"cannot read the study config: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise StudyConfigError("not a UTF-8 text file; expected a YAML mapping") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        raise StudyConfigError(f"not valid YAML{f' at line {where.line + 1}' if where else ''}: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(config, dict):
        raise StudyConfigError(f"expected a mapping of study keys ({', '.join(CONFIG_KEYS)}), got {type(config).__name__}")
    return config


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise StudyConfigError(f"{key}={value!r} is invalid: expected an integer >= {minimum}")
    return value


def _name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise StudyConfigError(f"{key}={value!r} is invalid: expected letters, digits, '.', '_' or '-' (it names folders)")
    return value


def _mapping(key: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise StudyConfigError(f"{key}={value!r} is invalid: expected a mapping")
    return value


def _model(value: Any) -> str:
    if value not in runner.MODELS:
        raise StudyConfigError(f"model={value!r} is invalid: expected one of {', '.join(runner.MODELS)}")
    if value == "smollm2":
        from openrlhf_epo.demo.smollm2 import gguf_file

        try:
            gguf_file()
        except RuntimeError as exc:
            raise StudyConfigError(f"model=smollm2: {exc}") from None
    return value


def _env(value: Any) -> dict:
    from openrlhf_epo.demo.env import KeyDoorConfig

    env = _mapping("env", value)
    allowed = [field.name for field in dataclasses.fields(KeyDoorConfig)]
    for key in env:
        if key not in allowed:
            raise StudyConfigError(f"env.{key}: unknown key; KeyDoor takes {', '.join(allowed)}")
    try:
        return dataclasses.asdict(KeyDoorConfig(**{**runner.TASK_ENV["trap"], **env}))
    except (TypeError, ValueError) as exc:
        raise StudyConfigError(str(exc).replace("--env.", "env.")) from None


def _sizes(value: Any) -> dict:
    sizes = _mapping("sizes", value)
    for key in sizes:
        if key not in runner.SIZES:
            raise StudyConfigError(f"sizes.{key}: unknown key; sizes are {', '.join(runner.SIZES)}")
    sizes = {**runner.SIZES, **sizes}
    for key in ("steps", "groups", "ppo_epochs", "minibatches"):
        _integer(f"sizes.{key}", sizes[key], 1)
    # group-normalised advantages compare the episodes of a layout with each other
    _integer("sizes.group_size", sizes["group_size"], 2)
    if not _is_number(sizes["lr"]) or sizes["lr"] <= 0:
        # YAML 1.1 reads 1e-3 (no dot) as text
        hint = " (YAML reads a number without a dot, like 1e-3, as text: write 0.001 or 1.0e-3)" if isinstance(sizes["lr"], str) else ""
        raise StudyConfigError(f"sizes.lr={sizes['lr']!r} is invalid: expected a finite number > 0{hint}")
    episodes = sizes["groups"] * sizes["group_size"]
    if episodes % sizes["minibatches"]:
        raise StudyConfigError(
            f"sizes.minibatches={sizes['minibatches']} is invalid: the {episodes} episodes per step (groups x group_size) "
            "must split evenly into minibatches"
        )
    return sizes


def _host_fixes(value: Any) -> list[str]:
    from openrlhf_hooks import host_fixes

    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise StudyConfigError(f"host_fixes={value!r} is invalid: expected a list of fix names, e.g. [group_norm]")
    try:
        return host_fixes.check(value)
    except host_fixes.HostFixError as exc:
        raise StudyConfigError(str(exc).lstrip("-")) from None


def _seeds(value: Any) -> list[int]:
    if not isinstance(value, list) or not value:
        raise StudyConfigError(f"seeds={value!r} is invalid: expected a list of seeds, e.g. [100, 101, 102]")
    for seed in value:
        _integer("seeds", seed, 0)
    if len(set(value)) != len(value):
        raise StudyConfigError(f"seeds={value!r} is invalid: a seed is listed twice")
    return list(value)


def _arms(value: Any) -> dict[str, Optional[dict]]:
    """arm -> its EPO flags (knob -> text, as typed after --epo.<knob>, the preset always named), or
    None for the host alone; each arm's flags resolved by the epo plugin, as the launcher would."""
    from openrlhf_epo.config import DEFAULT_PRESET, field_names

    arms = _mapping("arms", value)
    if not arms:
        raise StudyConfigError("arms: expected at least one arm, e.g. {baseline: null, epo: {preset: paper-sciworld}}")
    resolved: dict[str, Optional[dict]] = {}
    for arm, knobs in arms.items():
        _name("arms", arm)
        if arm.startswith("model-"):
            raise StudyConfigError(f"arms={arm!r} is invalid: names starting with 'model-' are the models' folders")
        if knobs is None:
            resolved[arm] = None
            continue
        knobs = _mapping(f"arms.{arm}", knobs)
        flags = {}
        for knob, setting in knobs.items():
            if knob != "preset" and knob not in field_names():
                raise StudyConfigError(f"arms.{arm}.{knob}: unknown EPO knob; knobs are preset, {', '.join(field_names())}")
            if isinstance(setting, (bool, list, dict)):
                raise StudyConfigError(f"arms.{arm}.{knob}={setting!r} is invalid: expected a number or a word")
            flags[knob] = str(setting)
        # named in every run's flags, so that a later default cannot change what a run meant
        flags["preset"] = flags.get("preset", DEFAULT_PRESET)
        _resolve(arm, flags)
        resolved[arm] = flags
    return resolved


def _resolve(arm: str, flags: dict) -> None:
    from openrlhf_hooks.api import PluginConfigError

    try:
        runner._epo_plugin().resolve_config(flags)
    except PluginConfigError as exc:
        raise StudyConfigError(f"arms.{arm}: {str(exc).lstrip('-')}") from None


def _comparisons(value: Any, arms: list[str]) -> list[tuple[str, str]]:
    """(treatment, control) pairs; by default every arm against the arm named baseline."""
    if value is None:
        return [(arm, "baseline") for arm in arms if arm != "baseline"] if "baseline" in arms else []
    if not isinstance(value, list):
        raise StudyConfigError(f"comparisons={value!r} is invalid: expected a list of [treatment, control] pairs")
    pairs = []
    for pair in value:
        if not isinstance(pair, list) or len(pair) != 2 or pair[0] == pair[1]:
            raise StudyConfigError(f"comparisons: {pair!r} is invalid: expected [treatment, control], two different arms")
        for arm in pair:
            if arm not in arms:
                raise StudyConfigError(f"comparisons: {pair!r} names {arm!r}, which is no arm (arms: {', '.join(arms)})")
        if tuple(pair) in pairs:
            raise StudyConfigError(f"comparisons: {pair!r} is listed twice")
        pairs.append(tuple(pair))
    return pairs


def plan_study(config: dict, default_name: str, out: Optional[Path] = None) -> tuple[Study, list]:
    """The Study and its RunSpecs (arm by arm, seed by seed), every key validated; nothing is written."""
    from openrlhf_epo.demo.openrlhf_run import RunSpec

    for key in config:
        if key not in CONFIG_KEYS:
            raise StudyConfigError(f"unknown key {key!r}; a study config takes {', '.join(CONFIG_KEYS)}")
    name = _name("name", config.get("name", default_name))
    model = _model(config.get("model", runner.TASK_MODEL["trap"]))  # the default env is the trap task's too
    env = _env(config.get("env", {}))
    sizes = _sizes(config.get("sizes", {}))
    host_fixes = _host_fixes(config.get("host_fixes", []))
    seeds = _seeds(config.get("seeds"))
    arms = _arms(config.get("arms"))
    comparisons = _comparisons(config.get("comparisons"), list(arms))
    min_effect = config.get("min_effect", DEFAULT_MIN_EFFECT)
    if not _is_number(min_effect) or min_effect < 0:
        raise StudyConfigError(f"min_effect={min_effect!r} is invalid: expected a finite number >= 0 (a goal-success difference)")
    save_every = _integer("save_every", config.get("save_every", DEFAULT_SAVE_EVERY), 0)
    if out is None:
        out = config.get("out", f"runs/study-{name}")
        if not isinstance(out, str) or not out:
            raise StudyConfigError(f"out={out!r} is invalid: expected a folder path")
    study = Study(name, Path(out), list(arms), seeds, sizes["steps"], comparisons, float(min_effect))
    # the context budget as the demo sizes it; a model without its own figures gets the tiny model's
    max_len = runner.PROMPT_TOKENS.get(model, runner.PROMPT_TOKENS["tiny"]) + runner.TOKENS_PER_TURN.get(
        model, runner.TOKENS_PER_TURN["tiny"]
    ) * env["max_turns"]
    specs = []
    for arm, epo_flags in arms.items():
        for seed in seeds:
            # SmolLM2 is converted once for all seeds; the models built here are built per seed
            model_dir = study.out / runner.model_dir_name(model, seed)
            specs.append(
                RunSpec(
                    name=arm, run_dir=str(study.run_dir(arm, seed)), seed=seed, steps=sizes["steps"], model_dir=str(model_dir),
                    model=model, epo_flags=epo_flags, env=env, groups=sizes["groups"], group_size=sizes["group_size"],
                    lr=float(sizes["lr"]), ppo_epochs=sizes["ppo_epochs"], minibatches=sizes["minibatches"], max_len=max_len,
                    save_every=save_every, host_fixes=host_fixes,
                )
            )  # fmt: skip
    return study, specs


# -- runs already there ---------------------------------------------------------------------------


def logged_steps(rows: list[dict]) -> int:
    """Steps a run has logged: its rows are steps 0, 1, ... (a resumed run's replace the steps it trains again)."""
    return rows[-1]["step"] + 1 if rows else 0


def check_saved_runs(specs: list) -> dict[str, int]:
    """Steps each run has logged so far (run_dir -> count). A run folder whose run.json differs from
    its spec in a field that changes what it trains is refused: StudyConfigError naming the run and
    the field. A run.json from before a RunSpec field existed holds that field's default."""
    from openrlhf_epo.demo.openrlhf_run import RunSpec

    defaults = {
        field.name: field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        for field in dataclasses.fields(RunSpec)
    }
    logged = {}
    for spec in specs:
        saved_path = Path(spec.run_dir) / "run.json"
        if saved_path.exists():
            saved = {**defaults, **json.loads(saved_path.read_text())}
            for field, wanted in dataclasses.asdict(spec).items():
                if field not in UNCOMPARED_FIELDS and saved[field] != wanted:
                    raise StudyConfigError(
                        f"run {spec.run_dir} was made with {field}={saved[field]!r} (its run.json) but the config now asks "
                        f"{field}={wanted!r}: restore the config, or give the study another out"
                    )
        logged[spec.run_dir] = logged_steps(read_rows(Path(spec.run_dir)))
    return logged


# -- results --------------------------------------------------------------------------------------


def write_results(study: Study) -> list[Path]:
    """results.csv (one row per finished run), study.json (per-arm summaries and the comparisons),
    study.md (both as tables) and the pictures, from every finished run of the study; returns the
    files written. A run still going or cut short is left out: its last steps are not the others'."""
    import csv
    import io

    from openrlhf_epo.demo.plots import plot_arms

    results, runs = [], {}
    for arm in study.arms:
        for seed in study.seeds:
            rows = read_rows(study.run_dir(arm, seed))
            if logged_steps(rows) >= study.steps:
                results.append({"arm": arm, "seed": seed, **run_results(rows)})
                runs.setdefault(arm, []).append(rows)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in results:
        writer.writerow({column: "" if row[column] is None else row[column] for column in RESULT_COLUMNS})
    atomic_write_text(study.out / "results.csv", table.getvalue())
    summary = study_summary(results, study.arms, study.comparisons, study.min_effect)
    atomic_write_json(study.out / "study.json", {"name": study.name, "finished_runs": len(results),
                                                 "planned_runs": len(study.arms) * len(study.seeds), **summary})  # fmt: skip
    atomic_write_text(study.out / "study.md", study_table(summary, study.name))
    pictures = plot_arms(runs, study.out, study.name)
    return [study.out / "results.csv", study.out / "study.json", study.out / "study.md", *pictures]


# -- the command ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, metavar="CONFIG.yaml", help="the study: task, sizes, seeds, arms, comparisons (configs/study/)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output folder (default: the config's out, else runs/study-<name>)")
    parser.add_argument("--jobs", type=runner._positive("--jobs"), default=1, metavar="N", help="runs trained at once (default 1: one at a time)")
    parser.add_argument("--only", metavar="ARM,ARM", help="train only these arms now (the results still cover every finished run)")
    parser.add_argument("--seeds_only", metavar="SEED,SEED", help="train only these of the config's seeds now")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--dry_run", action="store_true", help="check everything and print what each run would do; train nothing")


def _selected(specs: list, study: Study, only: Optional[str], seeds_only: Optional[str]) -> list:
    arms, seeds = study.arms, study.seeds
    if only is not None:
        arms = [arm.strip() for arm in only.split(",") if arm.strip()]
        for arm in arms or [only]:
            if arm not in study.arms:
                raise StudyConfigError(f"--only={only!r} is invalid: {arm!r} is no arm of the study ({', '.join(study.arms)})")
    if seeds_only is not None:
        words = [word.strip() for word in seeds_only.split(",") if word.strip()]
        for word in words or [seeds_only]:
            if not word.isdigit() or int(word) not in study.seeds:
                raise StudyConfigError(f"--seeds_only={seeds_only!r} is invalid: {word!r} is no seed of the study ({', '.join(map(str, study.seeds))})")
        seeds = [int(word) for word in words]
    return [spec for spec in specs if spec.name in arms and spec.seed in seeds]


def run_study(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`openrlhf-epo study`: checks, trains what is left, writes the results; returns the exit status
    (0; 1 after a failed run; 130 after Ctrl-C or kill; bad input exits 2 through `parser`)."""
    try:
        study, specs = plan_study(read_config(args.config), args.config.stem, args.out)
    except StudyConfigError as exc:
        parser.error(f"{args.config}: {exc}")
    try:
        selected = _selected(specs, study, args.only, args.seeds_only)
        logged = check_saved_runs(specs)
    except StudyConfigError as exc:
        parser.error(str(exc))
    todo = [spec for spec in selected if logged[spec.run_dir] < spec.steps]
    done = sum(count >= study.steps for count in logged.values())
    print(
        f"[study] {study.name}: {len(specs)} runs ({len(study.arms)} arms x {len(study.seeds)} seeds) of {study.steps} steps in "
        f"{study.out}; {done} finished, {len(todo)} to train now (each run's host output: <run>/train.log)",
        file=sys.stderr,
        flush=True,
    )
    if args.dry_run:
        for spec in specs:
            count = logged[spec.run_dir]
            if count >= spec.steps:
                state = "finished"
            elif spec not in selected:
                state = "not selected"
            else:
                state = f"resume ({count} of {spec.steps} steps logged)" if count else "new"
            print(f"{spec.name} s{spec.seed}: {state} -> {spec.run_dir}")
        return 0

    study.out.mkdir(parents=True, exist_ok=True)
    study.save()
    write_results(study)

    def terminate(signum, frame):  # `kill` stops the hosts as Ctrl-C does, keeping their checkpoints
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    # a background job of a non-interactive shell inherits SIGINT ignored; Ctrl-C must still stop the runs
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.perf_counter()
    again = f"openrlhf-epo study {args.config}" + (f" --out {args.out}" if args.out else "")
    failure = None
    if todo:
        try:
            failure = runner.run_all(todo, min(args.jobs, len(todo)), progress=not args.no_progress, after_each=lambda: write_results(study))
        except KeyboardInterrupt:
            print(f"[study] interrupted; finished runs are in the table; continue with: {again}", file=sys.stderr)
            return 130
    if failure:
        print(f"[study] {failure}; finished runs are in the table; continue with: {again}", file=sys.stderr)
        return 1
    print(f"[study] done in {time.perf_counter() - started:.0f} s; results: {study.out / 'results.csv'}, {study.out / 'study.json'}", file=sys.stderr)
    print((study.out / "study.md").read_text(), end="")
    return 0
