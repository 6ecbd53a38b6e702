"""The Triton kernels under Triton's CPU interpreter (run with TRITON_INTERPRET=1), against float64.

Prints one line per case and exits 1 on the first mismatch. Used by hooks/tests/test_kernels.py.
"""

import math
import sys

import torch

from openrlhf_hooks.kernels import _triton


def reference(logits, labels, temperature, rows):
    x = logits.double() / temperature
    x = x if rows is None else x[rows]
    log_p = torch.log_softmax(x, -1)
    p = log_p.exp()
    entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
    # analytic gradient of sum(gH * H + gL * logprob) w.r.t. x, with p log p := 0 where p = 0
    return entropy, log_p.gather(1, labels[:, None]).squeeze(1), p, torch.where(p > 0, log_p, torch.zeros_like(p))


def check(name, logits, labels, temperature=1.0, rows=None, tol=1e-5, grad_tol=1e-5):
    g_h = torch.randn(labels.shape[0])
    g_l = torch.randn(labels.shape[0])
    entropy, logprob, row_max, log_z = _triton.forward(logits, labels, rows, temperature)
    grad = _triton.backward(logits, labels, rows, temperature, entropy, row_max, log_z, g_h, g_l)
    ref_h, ref_l, p, log_p = reference(logits, labels, temperature, rows)
    onehot = torch.zeros_like(p).scatter_(1, labels[:, None], 1.0)
    ref_grad_rows = (-g_h.double()[:, None] * p * (log_p + ref_h[:, None]) + g_l.double()[:, None] * (onehot - p)) / temperature
    ref_grad = torch.zeros_like(logits, dtype=torch.float64)
    if rows is None:
        ref_grad = ref_grad_rows
    else:
        ref_grad[rows] = ref_grad_rows
    scale_h = ref_h.abs().clamp(min=1)
    scale_l = ref_l.abs().clamp(min=1)
    errors = (
        ((entropy.double() - ref_h).abs() / scale_h).max().item(),
        ((logprob.double() - ref_l).abs() / scale_l).max().item(),
        ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max().clamp(min=1e-12)).item(),
    )
    # rows not evaluated: exactly zero (the zero fill), not merely small against the largest gradient
    others = torch.zeros(logits.shape[0], dtype=torch.bool)
    if rows is not None:
        others[:] = True
        others[rows] = False
    untouched = bool((grad[others] == 0).all())
    ok = errors[0] < tol and errors[1] < tol and errors[2] < grad_tol
    ok = ok and grad.dtype == logits.dtype and grad.shape == logits.shape and untouched
    print(
        f"{name}: entropy {errors[0]:.1e} logprob {errors[1]:.1e} grad {errors[2]:.1e} {grad.dtype} "
        f"{'ok' if ok else 'FAIL'}"
    )
    if not ok:
        sys.exit(1)


def main():
    torch.manual_seed(0)
    logits = torch.randn(6, 300) * 3
    labels = torch.randint(0, 300, (6,))
    check("fp32 V=300", logits, labels)
    check("fp32 temperature 0.7", logits, labels, temperature=0.7)
    check("bf16", logits.to(torch.bfloat16), labels, tol=1e-5, grad_tol=1e-2)
    padded = logits.clone()
    padded[:, 250:] = -math.inf
    padded[0, :100] = 1e4  # huge, flat
    check("-inf padding and huge logits", padded, torch.randint(0, 250, (6,)))
    check("odd V=1", torch.randn(3, 1), torch.zeros(3, dtype=torch.long))
    check("odd V=129 across blocks", torch.randn(4, 129) * 5, torch.randint(0, 129, (4,)))
    rows = torch.tensor([1, 4])
    check("row subset", logits, torch.randint(0, 300, (2,)), rows=rows)
    # the gradient comes back in the logits' dtype, other rows zero; out of order, across blocks
    rows = torch.tensor([5, 0, 3])
    check("bf16 row subset", logits.to(torch.bfloat16), torch.randint(0, 300, (3,)), rows=rows, grad_tol=1e-2)
    check("fp16 row subset", logits.to(torch.float16), torch.randint(0, 300, (3,)), rows=rows, grad_tol=1e-2)


if __name__ == "__main__":
    main()
