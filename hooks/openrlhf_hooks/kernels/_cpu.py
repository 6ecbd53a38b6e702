"""Chunked entropy + log-prob with plain torch ops: bounded float32 slices, few passes per slice.

Per slice of rows, relative to the row max m (so huge logits lose no precision):
    e = exp(x - m), z = sum e, H = log z - sum(e log e) / z, log p(label) = (x_label - m) - log z
and in backward, with p = e / z:
    dL/dx = [-gH (p log p + p H) - gL p + gL onehot] / T
-inf logits (padded vocabulary) have e = 0; their log is clamped to a finite value so 0 * log
stays 0. One exp per logit in forward and one in backward.
"""

from __future__ import annotations

from typing import Optional

import torch

# Float32 slice [rows, V] materialised at once: on CPU small enough to stay in cache (measured
# fastest with benchmarks/entropy_cpu.py); on a GPU without Triton, large enough to fill the device.
CHUNK_BYTES = 2 * 1024 * 1024
CHUNK_BYTES_GPU = 256 * 1024 * 1024


def _chunks(n: int, vocab: int, device: torch.device):
    budget = CHUNK_BYTES if device.type == "cpu" else CHUNK_BYTES_GPU
    step = max(1, budget // (4 * max(1, vocab)))
    return ((start, min(n, start + step)) for start in range(0, n, step))


def _shifted(logits, index, temperature: float, row_max=None):
    """float32 (x / T - m) for the rows in index, and m (computed when not given)."""
    x = logits[index].to(torch.float32, copy=True)  # a copy: the in-place ops below must not touch logits
    if temperature != 1.0:
        x.div_(temperature)
    peak = x.max(dim=-1).values if row_max is None else row_max
    x.sub_(peak[:, None])
    return x, peak


_FLOOR = -1e30  # stands for log 0: e * _FLOOR == 0 when e == 0


def forward(logits, labels, rows: Optional[torch.Tensor], temperature: float):
    """(entropy, logprob, row_max, log_z), each float32 [n]: n = len(rows) or logits.shape[0]."""
    n = logits.shape[0] if rows is None else rows.shape[0]
    entropy = torch.empty(n, dtype=torch.float32, device=logits.device)
    logprob, row_max, log_z = torch.empty_like(entropy), torch.empty_like(entropy), torch.empty_like(entropy)
    for start, end in _chunks(n, logits.shape[1], logits.device):
        index = slice(start, end) if rows is None else rows[start:end]
        shifted, peak = _shifted(logits, index, temperature)
        chosen = shifted.gather(1, labels[start:end, None]).squeeze(1)
        e = shifted.exp()
        z = e.sum(-1)
        e_log_e = torch.linalg.vecdot(e, shifted.clamp_(min=_FLOOR))
        row_log_z = z.log()
        entropy[start:end] = row_log_z - e_log_e / z
        logprob[start:end] = chosen - row_log_z
        row_max[start:end], log_z[start:end] = peak, row_log_z
    return entropy, logprob, row_max, log_z


def backward(logits, labels, rows, temperature, entropy, row_max, log_z, grad_entropy, grad_logprob):
    """d/dlogits of sum(gH * H + gL * logprob)."""
    n = entropy.shape[0]
    # In the logits' dtype and shape (see kernels/__init__.py); float32 exists only per chunk.
    grad = torch.empty_like(logits) if rows is None else torch.zeros_like(logits)
    for start, end in _chunks(n, logits.shape[1], logits.device):
        index = slice(start, end) if rows is None else rows[start:end]
        log_p, _ = _shifted(logits, index, temperature, row_max[start:end] + log_z[start:end])
        p = log_p.exp()
        g_h = grad_entropy[start:end, None]
        g_l = grad_logprob[start:end, None]
        # g = -p (gH log p + gH H + gL)
        g = log_p.clamp_(min=_FLOOR).mul_(g_h).add_(g_h * entropy[start:end, None] + g_l).mul_(p).neg_()
        g.scatter_add_(1, labels[start:end, None], g_l)
        if temperature != 1.0:
            g.div_(temperature)
        grad[index] = g.to(logits.dtype)
    return grad
