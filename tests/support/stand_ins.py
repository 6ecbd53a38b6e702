"""Stand-ins for the two modules OpenRLHF imports at load time that do not install on a CPU machine.

Only `flash_attn` and `vllm` (and the submodules OpenRLHF 0.11.2 imports from them), as OpenRLHF's
own tests do. Nothing here is called on the tested paths: the flash_attn padding helpers serve only
--ds.packing_samples, and vLLM only the rollout engines. `flash_attn.ops` is left absent on purpose,
so the host's log-prob code takes its plain-torch fallback.
"""

import sys
import types
from importlib.machinery import ModuleSpec


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = ModuleSpec(name, loader=None)
    module.__path__ = []
    for key, value in attrs.items():
        setattr(module, key, value)
    return module


def _unavailable(what: str):
    def call(*args, **kwargs):
        raise RuntimeError(f"{what} is a CPU-test stand-in and cannot be called")

    return call


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} is a CPU-test stand-in and cannot be built")


def install() -> None:
    """Put the stand-ins into sys.modules unless the real modules import."""
    for real in ("flash_attn", "vllm"):
        if real in sys.modules:
            continue
        try:
            __import__(real)
            continue
        except ImportError:
            pass
        if real == "flash_attn":
            names = ("index_first_axis", "pad_input", "rearrange", "unpad_input")
            sys.modules.update(
                {
                    "flash_attn": _module("flash_attn"),
                    "flash_attn.bert_padding": _module(
                        "flash_attn.bert_padding", **{n: _unavailable(f"flash_attn.bert_padding.{n}") for n in names}
                    ),
                    "flash_attn.utils": _module("flash_attn.utils"),
                    "flash_attn.utils.distributed": _module(
                        "flash_attn.utils.distributed", all_gather=_unavailable("flash_attn all_gather")
                    ),
                }
            )
        else:
            sampling = type("SamplingParams", (_Unavailable,), {})
            tokens = type("TokensPrompt", (_Unavailable,), {})
            sys.modules.update(
                {
                    "vllm": _module("vllm", SamplingParams=sampling),
                    "vllm.inputs": _module("vllm.inputs", TokensPrompt=tokens),
                    "vllm.utils": _module("vllm.utils", random_uuid=_unavailable("vllm.utils.random_uuid")),
                }
            )
