"""The trap study's six pre-registered comparisons, as fixed in docs/evidence/trap-study.md before any
was computed: the baseline rows are the positive control's fix-on runs (trap/control-on/results.csv),
the EPO arms' rows the test runs (trap/study/results.csv); a second table repeats the comparisons
against the baseline's re-run in the study folder, as a check of the host's nondeterminism.

    .venv/bin/python docs/evidence/trap/compare.py > docs/evidence/trap/comparisons.md

The statistics are the study runner's own (openrlhf_epo.demo.stats.study_summary); this script only
chooses which rows go in.
"""

import csv
from pathlib import Path

import yaml

from openrlhf_epo.demo.stats import RESULT_COLUMNS, study_summary, study_table

HERE = Path(__file__).parent
CONFIG = HERE.parents[2] / "configs" / "study" / "trap.yaml"


def read_results(path: Path) -> list[dict]:
    """results.csv rows with the study's types: arm a string, seed and steps integers, an empty cell None."""
    rows = []
    with path.open() as handle:
        for row in csv.DictReader(handle):
            typed = {"arm": row["arm"]}
            for column in RESULT_COLUMNS[1:]:
                text = row[column]
                typed[column] = None if text == "" else (int(text) if column in ("seed", "steps", "trap_collapse_step") else float(text))
            rows.append(typed)
    return rows


def main() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    arms, pairs = list(config["arms"]), [tuple(pair) for pair in config["comparisons"]]
    study_rows = read_results(HERE / "study" / "results.csv")
    registered = read_results(HERE / "control-on" / "results.csv") + [row for row in study_rows if row["arm"] != "baseline"]
    for title, rows in (
        ("Pre-registered: baseline = the positive control's fix-on runs (control-on/results.csv)", registered),
        ("Check: baseline = its re-run in the study folder (study/results.csv)", study_rows),
    ):
        print(f"## {title}\n")
        print(study_table(study_summary(rows, arms, pairs, config["min_effect"]), config["name"]))


if __name__ == "__main__":
    main()
