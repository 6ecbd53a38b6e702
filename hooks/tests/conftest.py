"""The hook layer's own tests (openrlhf-hooks): nothing here imports openrlhf_epo or needs its plugin."""

import os
import sys
from pathlib import Path

from openrlhf_hooks.plugins import ENV_PLUGINS

# One copy of the test helpers (stand-ins for flash_attn/vllm, host-args capture, gloo ranks, the
# Triton interpreter checks) serves both test folders: it lives in tests/support.
SUPPORT = Path(__file__).resolve().parents[2] / "tests" / "support"
sys.path.insert(0, str(SUPPORT))

# The plugin selection, in os.environ so that subprocesses and Ray workers inherit it. Alone
# (`pytest hooks/tests`) no plugin loads: these tests need none, so they pass with only the hook layer
# installed and whatever else is. Collected together with tests/ (scripts/test.sh), tests/conftest.py
# sets "epo,scaled" for the whole session, whichever conftest is imported first, and these tests
# pass under that selection as well.
os.environ.setdefault(ENV_PLUGINS, "")
