"""entropy_logprob (openrlhf_hooks.kernels) against a float64 reference: values and gradients.

The CPU path runs here; the Triton kernel runs the same checks in the GPU test below (skipped
without CUDA) and in benchmarks/entropy_gpu.py.
"""

import math

import pytest
import torch

from openrlhf_hooks.kernels import _cpu, entropy_logprob


def reference(logits, labels, temperature=1.0, rows=None):
    x = logits.double() / temperature
    if rows is not None:
        x = x[rows]
    log_p = x - torch.logsumexp(x, -1, keepdim=True)
    p = log_p.exp()
    entropy = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
    return entropy, log_p.gather(1, labels[:, None]).squeeze(1)


def check(logits, labels, temperature=1.0, rows=None, tol=2e-5, grad_tol=2e-5):
    torch.manual_seed(0)
    x = logits.clone().requires_grad_(True)
    entropy, logprob = entropy_logprob(x, labels, temperature, rows=rows)
    assert entropy.dtype == logprob.dtype == torch.float32
    g_h, g_l = torch.randn_like(entropy), torch.randn_like(logprob)
    (entropy * g_h + logprob * g_l).sum().backward()

    y = logits.detach().double().requires_grad_(True)
    ref_h, ref_l = reference(y, labels, temperature, rows)
    (ref_h * g_h.double() + ref_l * g_l.double()).sum().backward()
    assert torch.allclose(entropy.double(), ref_h, rtol=tol, atol=tol)
    assert torch.allclose(logprob.double(), ref_l, rtol=tol, atol=tol)
    finite = torch.isfinite(y.grad)
    assert x.grad.dtype == logits.dtype
    assert torch.isfinite(x.grad).all()
    assert torch.allclose(x.grad.double()[finite], y.grad[finite], rtol=grad_tol, atol=grad_tol)
    return x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, 1000, 4099])
def test_matches_float64(dtype, vocab):
    torch.manual_seed(vocab)
    logits = (torch.randn(33, vocab) * 3).to(dtype)
    labels = torch.randint(0, vocab, (33,))
    # bf16/fp16 gradients are rounded to the input dtype
    grad_tol = 2e-5 if dtype == torch.float32 else 1e-2
    check(logits, labels, grad_tol=grad_tol)


def test_temperature_like_the_host():
    torch.manual_seed(1)
    logits = torch.randn(9, 300) * 5
    labels = torch.randint(0, 300, (9,))
    check(logits, labels, temperature=0.7, grad_tol=1e-4)  # logits / T reach ~30: float32-sized error
    # the host divides the float32 logits by the temperature before its softmax
    host = torch.log_softmax(logits.float() / 0.7, -1).gather(1, labels[:, None]).squeeze(1)
    assert torch.allclose(entropy_logprob(logits, labels, 0.7)[1], host, atol=1e-6)


def test_huge_logits_and_neg_inf_padding():
    torch.manual_seed(2)
    logits = torch.randn(6, 257) * 1e4
    logits[:, 200:] = -math.inf  # padded vocabulary
    logits[0, :200] = 1e4  # flat huge row: uniform over 200 entries
    labels = torch.randint(0, 200, (6,))
    grad = check(logits, labels, tol=1e-4, grad_tol=1e-4)
    assert (grad[:, 200:] == 0).all()
    entropy, _ = entropy_logprob(logits, labels)
    assert entropy[0].item() == pytest.approx(math.log(200), rel=1e-6)


def test_row_subset_reads_only_those_rows():
    torch.manual_seed(3)
    logits = torch.randn(20, 50)
    rows = torch.tensor([3, 7, 8, 19])
    labels = torch.randint(0, 50, (4,))
    grad = check(logits, labels, rows=rows)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[rows] = False
    assert (grad[untouched] == 0).all()
    poisoned = logits.clone()
    poisoned[untouched] = float("nan")
    assert torch.equal(entropy_logprob(poisoned, labels, rows=rows)[0], entropy_logprob(logits, labels, rows=rows)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [None, [10, 0, 5, 6, 11]], ids=["all-rows", "row-subset"])
def test_cpu_backward_returns_the_logits_dtype_and_zero_for_other_rows(dtype, rows, monkeypatch):
    # The backend is called directly: autograd casts whatever a backward returns to the input's
    # dtype, so x.grad.dtype alone would not show a float32 gradient being built and cast down.
    monkeypatch.setattr(_cpu, "CHUNK_BYTES", 4 * 40 * 2)  # two rows per chunk: rows span chunks
    torch.manual_seed(6)
    logits = (torch.randn(12, 40) * 3).to(dtype)
    rows = None if rows is None else torch.tensor(rows)
    n = 12 if rows is None else len(rows)
    labels = torch.randint(0, 40, (n,))
    g_h, g_l = torch.randn(n), torch.randn(n)
    entropy, _, row_max, log_z = _cpu.forward(logits, labels, rows, 0.8)
    grad = _cpu.backward(logits, labels, rows, 0.8, entropy, row_max, log_z, g_h, g_l)
    assert grad.dtype == dtype and grad.shape == logits.shape

    y = logits.double().requires_grad_(True)
    ref_h, ref_l = reference(y, labels, 0.8, rows)
    (ref_h * g_h.double() + ref_l * g_l.double()).sum().backward()
    tol = 2e-5 if dtype == torch.float32 else 1e-2  # rounded once to bf16/fp16 on the store
    assert torch.allclose(grad.double(), y.grad, rtol=tol, atol=tol)
    if rows is not None:
        others = torch.ones(12, dtype=torch.bool)
        others[rows] = False
        assert (grad[others] == 0).all() and (grad[rows] != 0).any()


def test_gradcheck_float64():
    torch.manual_seed(4)
    x = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (5,))

    def both(t):
        entropy, logprob = entropy_logprob(t, labels, 1.3)
        return entropy, logprob

    # the kernel computes in float32, so gradcheck's tolerances are float32-sized
    assert torch.autograd.gradcheck(both, (x,), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_only_one_output_used():
    logits = torch.randn(4, 30, requires_grad=True)
    labels = torch.randint(0, 30, (4,))
    entropy, _ = entropy_logprob(logits, labels)
    entropy.sum().backward()
    y = logits.detach().double().requires_grad_(True)
    reference(y, labels)[0].sum().backward()
    assert torch.allclose(logits.grad.double(), y.grad, atol=1e-5)


def test_chunks_are_bounded(monkeypatch):
    monkeypatch.setattr(_cpu, "CHUNK_BYTES", 4 * 64 * 3)  # three rows of V = 64 at a time
    seen = []
    original = _cpu._shifted

    def spy(logits, index, temperature, row_max=None):
        out = original(logits, index, temperature, row_max)
        seen.append(out[0].shape[0])
        return out

    monkeypatch.setattr(_cpu, "_shifted", spy)
    logits = torch.randn(10, 64, requires_grad=True)
    labels = torch.randint(0, 64, (10,))
    entropy, logprob = entropy_logprob(logits, labels)
    (entropy + logprob).sum().backward()
    assert max(seen) == 3 and sum(seen) == 20  # forward and backward, 10 rows each


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"logits must be \[N, V\]"):
        entropy_logprob(torch.randn(2, 3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        entropy_logprob(torch.randn(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        entropy_logprob(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), temperature=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs CUDA")
def test_triton_kernel_matches_float64_on_cuda():
    torch.manual_seed(5)
    for dtype in (torch.bfloat16, torch.float32):
        logits = (torch.randn(64, 151936, device="cuda") * 3).to(dtype)
        logits[:, -100:] = -math.inf
        labels = torch.randint(0, 151836, (64,), device="cuda")
        check(logits, labels, temperature=0.9, grad_tol=2e-5 if dtype == torch.float32 else 1e-2)
        rows = torch.tensor([1, 5, 63], device="cuda")
        check(logits, labels[:3], rows=rows, grad_tol=2e-5 if dtype == torch.float32 else 1e-2)


def test_input_logits_are_not_modified():
    logits = torch.randn(8, 100, requires_grad=True)
    before = logits.detach().clone()
    entropy, logprob = entropy_logprob(logits, torch.randint(0, 100, (8,)), temperature=0.5)
    (entropy + logprob).sum().backward()
    assert torch.equal(logits.detach(), before)


def test_triton_kernel_under_the_cpu_interpreter():
    """The Triton kernels themselves, run by Triton's CPU interpreter (tests/support/triton_checks.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]  # the repository (this file is hooks/tests/test_kernels.py)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    done = subprocess.run(
        [sys.executable, str(root / "tests/support/triton_checks.py")], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.count(" ok") == 9
