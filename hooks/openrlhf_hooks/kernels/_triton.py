"""Triton kernels: one program per row, streaming the vocabulary in blocks.

Forward reads each logit once and keeps, per row, an online max m, s = sum exp(x - m) and
t = sum exp(x - m) (x - m), rescaled when m grows, so H = log s - t / s needs no subtraction of two
large numbers (safe for |x| ~ 1e4). Backward reads each logit once and writes its gradient once,
from the saved per-row max, log-normaliser and H. Extra memory: O(N).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

_CONFIGS = [
    triton.Config({"BLOCK": b}, num_warps=w, num_stages=st)
    for b in (2048, 4096, 8192)
    for w in (4, 8, 16)
    for st in (2, 3)
]
# Triton's CPU interpreter (TRITON_INTERPRET=1, used by the CPU tests) cannot benchmark configs.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRETER_BLOCK = 128


def _tuned(kernel):
    return kernel if INTERPRETED else triton.autotune(configs=_CONFIGS, key=["V"])(kernel)


@triton.jit
def _forward_kernel(
    logits_ptr, labels_ptr, rows_ptr, entropy_ptr, logprob_ptr, max_ptr, log_z_ptr,
    stride, V, inv_temperature,
    HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + pid).to(tl.int64)
    else:
        row = pid.to(tl.int64)
    base = logits_ptr + row * stride
    neg_inf = float("-inf")
    m = float("-inf")
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        x = tl.load(base + offsets, mask=offsets < V, other=neg_inf).to(tl.float32) * inv_temperature
        new_m = tl.maximum(m, tl.max(x, 0))
        safe_m = tl.where(new_m == neg_inf, 0.0, new_m)
        live = x != neg_inf
        d = tl.where(live, x - safe_m, 0.0)
        e = tl.where(live, tl.exp(d), 0.0)
        # rescale the running sums to the new max (nothing to rescale while s == 0)
        shift = tl.where(s > 0, m - safe_m, 0.0)
        scale = tl.exp(shift)
        t = (t + s * shift) * scale + tl.sum(e * d, 0)
        s = s * scale + tl.sum(e, 0)
        m = new_m
    log_s = tl.log(s)
    label = tl.load(labels_ptr + pid).to(tl.int64)
    chosen = tl.load(base + label).to(tl.float32) * inv_temperature
    tl.store(entropy_ptr + pid, log_s - t / s)
    tl.store(logprob_ptr + pid, (chosen - m) - log_s)
    tl.store(max_ptr + pid, m)
    tl.store(log_z_ptr + pid, log_s)


@triton.jit
def _backward_kernel(
    logits_ptr, labels_ptr, rows_ptr, grad_ptr, grad_entropy_ptr, grad_logprob_ptr, entropy_ptr, max_ptr, log_z_ptr,
    stride, grad_stride, V, inv_temperature,
    HAS_ROWS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + pid).to(tl.int64)
    else:
        row = pid.to(tl.int64)
    base = logits_ptr + row * stride
    out = grad_ptr + row * grad_stride
    g_h = tl.load(grad_entropy_ptr + pid)
    g_l = tl.load(grad_logprob_ptr + pid)
    h = tl.load(entropy_ptr + pid)
    m = tl.load(max_ptr + pid)
    log_z = tl.load(log_z_ptr + pid)
    label = tl.load(labels_ptr + pid).to(tl.int64)
    neg_inf = float("-inf")
    for start in range(0, V, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < V
        x = tl.load(base + offsets, mask=inside, other=neg_inf).to(tl.float32) * inv_temperature
        live = x != neg_inf
        log_p = tl.where(live, (x - m) - log_z, 0.0)
        p = tl.where(live, tl.exp(log_p), 0.0)
        g = -p * (g_h * (log_p + h) + g_l)
        g = tl.where(offsets == label, g + g_l, g) * inv_temperature
        tl.store(out + offsets, g.to(out.dtype.element_ty), mask=inside)


_forward = _tuned(_forward_kernel)
_backward = _tuned(_backward_kernel)
_fixed = {"BLOCK": _INTERPRETER_BLOCK} if INTERPRETED else {}


def forward(logits, labels, rows: Optional[torch.Tensor], temperature: float):
    n = logits.shape[0] if rows is None else rows.shape[0]
    entropy = torch.empty(n, dtype=torch.float32, device=logits.device)
    logprob, row_max, log_z = torch.empty_like(entropy), torch.empty_like(entropy), torch.empty_like(entropy)
    if n:
        _forward[(n,)](
            logits, labels, rows if rows is not None else labels, entropy, logprob, row_max, log_z,
            logits.stride(0), logits.shape[1], 1.0 / temperature, HAS_ROWS=rows is not None, **_fixed,
        )  # fmt: skip
    return entropy, logprob, row_max, log_z


def backward(logits, labels, rows, temperature, entropy, row_max, log_z, grad_entropy, grad_logprob):
    # In the logits' dtype and shape (see kernels/__init__.py): the kernel computes in float32 registers
    # and rounds on the store; with rows, the zero fill is the only write to the other rows.
    grad = torch.empty_like(logits) if rows is None else torch.zeros_like(logits)
    n = entropy.shape[0]
    if n:
        _backward[(n,)](
            logits, labels, rows if rows is not None else labels, grad,
            grad_entropy.contiguous(), grad_logprob.contiguous(), entropy, row_max, log_z,
            logits.stride(0), grad.stride(0), logits.shape[1], 1.0 / temperature, HAS_ROWS=rows is not None, **_fixed,
        )  # fmt: skip
    return grad
