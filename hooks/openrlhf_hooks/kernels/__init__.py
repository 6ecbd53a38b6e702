"""Fused per-token entropy and chosen-token log-prob, with an autograd backward.

On CUDA (with Triton installed) a Triton kernel: forward reads the logits once, backward reads them
once and writes the gradient once, extra memory O(N). Elsewhere a chunked torch path with the same
signature and results. Set OPENRLHF_HOOKS_KERNEL=torch to force the torch path on CUDA.

A service of the hook layer: any loss plugin that asks for entropy (RankLoss.needs_entropy) gets it
from here, through the adapter in trainer.py.

The gradient w.r.t. logits is returned in the logits' dtype (bf16 logits, bf16 gradient), computed
in float32 and rounded once on the store. It is a dense tensor of the logits' shape, so with `rows`
it is all zeros except the evaluated rows, which are the only ones computed and written. Why not less:
autograd requires a gradient of the input's shape and casts any other dtype to the input's (so a
narrower one would only add a cast); a sparse gradient fails on the host's `reshape` of its logits
("reshape is not implemented for sparse tensors"); and the host's own log-prob gradient over the
same logits is dense N x V anyway, into which autograd adds this one. In OpenRLHF 0.11.2 the
logits arrive as float32 (Actor.forward upcasts them), so there the gradient is float32 N x V.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from . import _cpu


def _triton_module():
    try:
        from . import _triton
    except ImportError:
        return None
    return _triton


def _backend(logits: torch.Tensor):
    if logits.is_cuda and os.environ.get("OPENRLHF_HOOKS_KERNEL", "auto") != "torch":
        module = _triton_module()
        if module is not None:
            return module
    return _cpu


class _EntropyLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, rows, temperature):
        backend = _backend(logits)
        entropy, logprob, row_max, log_z = backend.forward(logits, labels, rows, temperature)
        ctx.save_for_backward(logits, labels, rows if rows is not None else labels, entropy, row_max, log_z)
        ctx.has_rows = rows is not None
        ctx.temperature = temperature
        ctx.backend = backend
        return entropy, logprob

    @staticmethod
    def backward(ctx, grad_entropy, grad_logprob):
        logits, labels, rows, entropy, row_max, log_z = ctx.saved_tensors
        rows = rows if ctx.has_rows else None
        grad_entropy = torch.zeros_like(entropy) if grad_entropy is None else grad_entropy.float()
        grad_logprob = torch.zeros_like(entropy) if grad_logprob is None else grad_logprob.float()
        grad = ctx.backend.backward(
            logits, labels, rows, ctx.temperature, entropy, row_max, log_z, grad_entropy, grad_logprob
        )
        return grad, None, None, None


def entropy_logprob(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    rows: Optional[torch.Tensor] = None,
):
    """Entropy H and log p(label) of softmax(logits / temperature), per row.

    logits: [N, V] (bf16/fp16/fp32, rows contiguous; -inf entries have probability 0); labels: [N]
    (or [len(rows)]) token ids; temperature: divides the float32 logits, as the host does;
    rows: optional LongTensor of distinct row indices to evaluate (others are not read, and get zero
    gradient; a repeated index would get one of its gradients, not their sum).
    Returns (entropy, logprob), both float32 [N] (or [len(rows)]), differentiable w.r.t. logits.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n = logits.shape[0] if rows is None else rows.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    labels = labels.to(device=logits.device, dtype=torch.long)
    if rows is not None:
        rows = rows.to(device=logits.device, dtype=torch.long)
    return _EntropyLogprob.apply(logits, labels, rows, float(temperature))


__all__ = ["entropy_logprob"]
