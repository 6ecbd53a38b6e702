import os
import sys
from pathlib import Path

import pytest

from openrlhf_hooks import plugins
from openrlhf_hooks.plugins import ENV_PLUGINS

# Test helpers (stand-ins for flash_attn/vllm, host-args capture, the DeepSpeed rank worker).
sys.path.insert(0, str(Path(__file__).parent / "support"))

# The suite loads exactly these plugins, whatever else is installed in the environment (a plugin
# author's own `pip install -e`, see docs/plugins.md): EPO and the third-party test plugin
# (tests/third_party_plugin). Set in os.environ, not per test, so that every subprocess and Ray worker
# started by a test inherits it. Tests of discovery itself remove it with monkeypatch. It overrides
# any selection of the caller's shell and hooks/tests/conftest.py's default for a session that
# collects both folders.
SUITE_PLUGINS = "epo,scaled"
os.environ[ENV_PLUGINS] = SUITE_PLUGINS


@pytest.fixture(autouse=True)
def _registry_of_the_suite_selection():
    """The launcher keeps one plugin registry per process (plugins.get_registry). A test that removes
    the selection and runs the launcher in this process leaves it loaded with every installed plugin;
    drop it afterwards, so that the next test loads the suite's selection again instead of depending
    on which test ran first."""
    yield
    cached = plugins._cached
    if cached is not None and cached.selected != tuple(SUITE_PLUGINS.split(",")):
        plugins._cached = None
