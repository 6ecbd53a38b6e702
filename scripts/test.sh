#!/usr/bin/env bash
# The test command: sets up .venv (scripts/bootstrap.sh), then runs the whole pytest suite on CPU:
# tests/ (EPO, the launcher with plugins, the demo) and hooks/tests/ (the hook layer's own tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest tests hooks/tests "$@"
