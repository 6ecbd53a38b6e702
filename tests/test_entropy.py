"""token_entropy against a float64 reference, its gradient, and its bounded memory."""

import math

import pytest
import torch

from openrlhf_epo.core import entropy as entropy_module
from openrlhf_epo.core import token_entropy


def reference_entropy(logits: torch.Tensor) -> torch.Tensor:
    """float64, straight from the definition H = -sum p log p with 0 log 0 = 0."""
    x = logits.double()
    log_p = x - torch.logsumexp(x, dim=-1, keepdim=True)
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)


def test_hand_values():
    # Uniform over V outcomes: H = log V. A one-hot-like distribution: H -> 0.
    assert token_entropy(torch.zeros(1, 8)).item() == pytest.approx(math.log(8), rel=1e-6)
    # Two outcomes with logits (0, log 3): p = (1/4, 3/4), H = -(1/4 log 1/4 + 3/4 log 3/4).
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert token_entropy(torch.tensor([[0.0, math.log(3.0)]])).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_matches_float64_reference_and_dtype(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 17, 1001) * 4).to(dtype)
    out = token_entropy(logits)
    assert out.shape == (3, 17)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Compare with the reference on the SAME (rounded) input: the only error is the compute precision.
    expected = reference_entropy(logits)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert torch.allclose(out.double(), expected, rtol=tol, atol=tol)


def test_huge_logits():
    torch.manual_seed(1)
    logits = torch.randn(4, 300) * 1e4
    logits[0] = 1e4  # a flat row of huge values is still uniform
    out = token_entropy(logits)
    assert torch.isfinite(out).all()
    assert out[0].item() == pytest.approx(math.log(300), rel=1e-6)
    assert torch.allclose(out.double(), reference_entropy(logits), atol=1e-5)


def test_neg_inf_padded_vocabulary():
    torch.manual_seed(2)
    logits = torch.randn(5, 64, dtype=torch.float64, requires_grad=False)
    padded = torch.cat([logits, torch.full((5, 16), -math.inf, dtype=torch.float64)], dim=-1)
    padded.requires_grad_(True)
    out = token_entropy(padded)
    assert torch.allclose(out, reference_entropy(logits), rtol=1e-12)
    out.sum().backward()
    assert torch.isfinite(padded.grad).all()
    assert (padded.grad[:, 64:] == 0).all()


def test_gradient_matches_autograd_of_reference():
    torch.manual_seed(3)
    x = torch.randn(6, 50, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, dtype=torch.float64)
    (token_entropy(x, chunk_rows=4) * weights).sum().backward()
    y = x.detach().clone().requires_grad_(True)
    (reference_entropy(y) * weights).sum().backward()
    assert torch.allclose(x.grad, y.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    torch.manual_seed(4)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: token_entropy(t, chunk_rows=2), (x,))


def test_bf16_gradient_dtype_and_value():
    torch.manual_seed(5)
    x = torch.randn(4, 257).to(torch.bfloat16).requires_grad_(True)
    token_entropy(x).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    y = x.detach().double().requires_grad_(True)
    reference_entropy(y).sum().backward()
    assert torch.allclose(x.grad.double(), y.grad, atol=1e-2)


def test_chunking_does_not_change_results():
    torch.manual_seed(6)
    x = torch.randn(37, 129, dtype=torch.float64)
    full = token_entropy(x, chunk_rows=1000)
    for rows in (1, 5, 36):
        assert torch.equal(token_entropy(x, chunk_rows=rows), full)


def test_saved_for_backward_is_only_input_and_output(monkeypatch):
    """Memory bound: backward keeps the input and the [N] entropies, never a float32 [N, V] copy."""
    n, vocab = 64, 4096
    x = torch.randn(n, vocab).to(torch.bfloat16).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = token_entropy(x, chunk_rows=8)
    assert sum(saved) <= x.numel() * x.element_size() + out.numel() * out.element_size()


def test_default_chunk_is_bounded_by_chunk_bytes(monkeypatch):
    seen_rows = []
    original = entropy_module._entropy_rows

    def spy(rows):
        seen_rows.append(rows.shape[0])
        return original(rows)

    monkeypatch.setattr(entropy_module, "CHUNK_BYTES", 4 * 100 * 10)
    monkeypatch.setattr(entropy_module, "_entropy_rows", spy)
    token_entropy(torch.randn(95, 100))
    assert max(seen_rows) == 10 and sum(seen_rows) == 95


def test_rejects_integer_and_scalar_input():
    with pytest.raises(TypeError, match="floating-point"):
        token_entropy(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocabulary dimension"):
        token_entropy(torch.tensor(1.0))
