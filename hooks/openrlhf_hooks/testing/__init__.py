"""Check a loss plugin's rank side on CPU, through OpenRLHF 0.11.2's real training step.

    python -m openrlhf_hooks.testing --loss_plugin NAME [--NAME.knob VALUE ...] [--steps 2]
        [--advantages zero|random] [--tolerance 1e-5] [--keep DIR] [other launcher flags]

It trains a tiny Qwen2 on one fixed batch of 8 multi-turn samples (turns of action tokens between
observation tokens, unequal lengths) twice, with the plugin installed by the hook layer exactly as
in a run: the host's DeepspeedStrategy, Actor, replay buffer, ActorPPOTrainer.ppo_train and
training_step (with their loss normalisers, `loss_batch_info`), DeepSpeed ZeRO-2, over gloo:

- reference: 1 rank, the whole batch in one micro-batch (gas 1);
- split:     2 ranks, 2 micro-batches of 2 samples each per rank (gas 2).

A term normalised like the host (docs/plugins.md, "Normalise like the host") gives both the same
gradient at every optimizer step; a plain per-micro-batch `.mean()` does not, because the
micro-batches hold different numbers of action tokens. With `--advantages zero` (the default) the
host's policy loss has no gradient, so the gradient compared is the plugin's alone. It also reports
whether every rank returned the same metrics and the same state_dict, as the host needs.

From Python (e.g. in your plugin's tests):

    from openrlhf_hooks.testing import check_normalisation
    report = check_normalisation(["--loss_plugin", "myplugin", "--myplugin.coef", "0.1"])
    assert report.ok, report.describe()

Two things differ from a `--cpu` run, both to make the comparison exact: training is in float32
(the host offers only bf16 and fp16, so this module lets its convert_to_torch_dtype accept "fp32"
in the worker processes it starts), and the rollout is replaced by the fixed batch. The host's
CUDA-only calls are replaced by CPU mode's REPLACEMENTS (hooks/openrlhf_hooks/cpu_mode.py), as in a `--cpu` run.
"""


import importlib

# Loaded on first use, so that `python -m openrlhf_hooks.testing.tiny_model` does not import its own
# module twice (once through this package, once as __main__).
_EXPORTS = {
    "NormalisationReport": "check",
    "check_normalisation": "check",
    "relative_difference": "check",
    "rank_experience": "fixed_batch",
    "sample_batch": "fixed_batch",
    "build_rank": "ranks",
    "host_args": "ranks",
    "record_gradients": "ranks",
    "train_float32": "ranks",
    "train_ranks": "ranks",
    "tiny_qwen2": "tiny_model",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
