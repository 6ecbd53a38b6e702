"""The rank-side entropy capture: the fused kernel on action rows equals the plain entropy of the
host's action window, for padded and for packed logits, values and gradients."""

import torch

from float64_reference import ref_token_entropy
from openrlhf_hooks.trainer import action_entropy


def batch():
    torch.manual_seed(0)
    b, t, v = 3, 12, 40
    logits = torch.randn(b, t, v, dtype=torch.float64) * 2
    sequences = torch.randint(0, v, (b, t))
    attention_mask = torch.ones(b, t, dtype=torch.long)
    attention_mask[1, -4:] = 0  # right padding
    action_mask = torch.zeros(b, t - 1, dtype=torch.bool)
    action_mask[0, 3:6] = action_mask[0, 8:11] = True
    action_mask[1, 2:7] = True
    action_mask[2, 5:11] = True
    return logits, sequences, attention_mask, action_mask


def expected(logits, action_mask):
    # the host's alignment: entropy[:, :-1][:, -A:] of the padded logits, masked
    return ref_token_entropy(logits)[:, :-1][:, -action_mask.shape[1] :] * action_mask


def test_padded_logits():
    logits, sequences, attention_mask, action_mask = batch()
    x = logits.clone().requires_grad_(True)
    got = action_entropy(x, sequences, attention_mask, action_mask, packed=False)
    y = logits.clone().requires_grad_(True)
    want = expected(y, action_mask)
    assert torch.allclose(got.double(), want, atol=1e-5)
    weights = torch.randn_like(want)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-5)
    assert (x.grad[:, -1] == 0).all()  # the last position predicts nothing and is never read


def test_packed_logits_map_back_to_the_padded_batch():
    logits, sequences, attention_mask, action_mask = batch()
    packed = logits[attention_mask.bool()].unsqueeze(0)  # [1, nnz, V] in attention-mask order
    got = action_entropy(packed, sequences, attention_mask, action_mask, packed=True)
    assert torch.allclose(got.double(), expected(logits, action_mask), atol=1e-5)
