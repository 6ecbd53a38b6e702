"""Token entropy H = -sum_v p_v log p_v over the vocabulary, computed in bounded memory."""

from __future__ import annotations

from typing import Optional

import torch

# Largest float32 slice [rows, V] that forward or backward materialises at once.
CHUNK_BYTES = 64 * 1024 * 1024


def _rows_per_chunk(vocab: int, chunk_rows: Optional[int]) -> int:
    if chunk_rows is not None:
        return max(1, int(chunk_rows))
    return max(1, CHUNK_BYTES // (4 * max(1, vocab)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _entropy_rows(x: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of x (already in the compute dtype); -inf entries carry probability 0."""
    shifted = x - x.max(dim=-1, keepdim=True).values
    log_z = torch.logsumexp(shifted, dim=-1)
    p = torch.softmax(shifted, dim=-1)
    # -inf logits have p = 0; zeroing them avoids 0 * -inf = nan in sum(p * x).
    finite = shifted.masked_fill(torch.isneginf(shifted), 0.0)
    return log_z - (p * finite).sum(dim=-1)


class _ChunkedEntropy(torch.autograd.Function):
    """Saves only the input and the per-row entropy; backward recomputes softmax chunk by chunk."""

    @staticmethod
    def forward(ctx, logits2d: torch.Tensor, chunk_rows: int) -> torch.Tensor:
        compute = _compute_dtype(logits2d.dtype)
        out = torch.empty(logits2d.shape[0], dtype=compute, device=logits2d.device)
        for start in range(0, logits2d.shape[0], chunk_rows):
            rows = logits2d[start : start + chunk_rows].to(compute)
            out[start : start + chunk_rows] = _entropy_rows(rows)
        ctx.save_for_backward(logits2d, out)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits2d, entropy = ctx.saved_tensors
        compute = entropy.dtype
        grad_in = torch.empty_like(logits2d)
        step = ctx.chunk_rows
        for start in range(0, logits2d.shape[0], step):
            rows = logits2d[start : start + step].to(compute)
            log_p = torch.log_softmax(rows, dim=-1)
            p = log_p.exp()
            # dH/dx_v = -p_v (log p_v + H); p_v = 0 (incl. -inf logits) contributes exactly 0.
            term = torch.where(p > 0, log_p + entropy[start : start + step, None], torch.zeros_like(log_p))
            g = -p * term * grad_out[start : start + step, None]
            grad_in[start : start + step] = g.to(logits2d.dtype)
        return grad_in, None


def token_entropy(logits: torch.Tensor, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Entropy in nats of softmax(logits) over the last dimension.

    logits: [..., V], any float dtype; -inf entries (padded vocabulary) have probability 0.
    Returns [...]: float64 for float64 input, float32 otherwise. Differentiable.
    At most `chunk_rows` rows (default: a CHUNK_BYTES float32 slice) are upcast at once, in the
    forward and in the backward; only the input and the [...] result are kept for backward.
    """
    if not logits.is_floating_point():
        raise TypeError(f"token_entropy needs floating-point logits, got {logits.dtype}")
    if logits.dim() == 0:
        raise ValueError("token_entropy needs logits with a vocabulary dimension, got a 0-d tensor")
    lead = logits.shape[:-1]
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.shape[0] == 0:
        return torch.zeros(lead, dtype=_compute_dtype(logits.dtype), device=logits.device)
    rows = _rows_per_chunk(flat.shape[-1], chunk_rows)
    return _ChunkedEntropy.apply(flat, rows).reshape(lead)
