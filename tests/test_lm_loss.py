"""Chunked causal LM loss against cross-entropy on the full logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from comp.models.losses import chunked_causal_lm_loss

B, L, D, V = 3, 11, 16, 37


def inputs(seed: int, ignore_fraction: float, bias: bool = False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, D, generator=g, dtype=dtype).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=dtype).requires_grad_()
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[torch.rand(B, L, generator=g) < ignore_fraction] = -100
    bias_V = torch.randn(V, generator=g, dtype=dtype).requires_grad_() if bias else None
    return hidden, weight, labels, bias_V


def full_logits_loss(hidden, weight, labels, bias=None, reduction="mean"):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction=reduction)


def grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 30, 4096])
@pytest.mark.parametrize("ignore_fraction", [0.0, 0.4])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_grads_equal_full_logits(chunk_size, ignore_fraction, reduction):
    hidden, weight, labels, _ = inputs(chunk_size, ignore_fraction)
    want = full_logits_loss(hidden, weight, labels, reduction=reduction)
    got = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=chunk_size, reduction=reduction)
    # A sum of ~30 token losses is ~250, where one fp32 step is 1.5e-5: compare it relatively.
    torch.testing.assert_close(got, want, rtol=1e-6 if reduction == "sum" else 0, atol=1e-5)
    for g, w in zip(grads(got, hidden, weight), grads(want, hidden, weight)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_bias_and_upstream_gradient_scale():
    hidden, weight, labels, bias = inputs(1, 0.3, bias=True)
    want = 2.5 * full_logits_loss(hidden, weight, labels, bias)
    got = 2.5 * chunked_causal_lm_loss(hidden, weight, labels, chunk_size=5, lm_head_bias_V=bias)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for g, w in zip(grads(got, hidden, weight, bias), grads(want, hidden, weight, bias)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    hidden, weight, bias = (torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()
                            for shape in ((2, 5, 4), (7, 4), (7,)))
    labels = torch.tensor([[1, 6, -100, 0, 3], [-100, 2, 2, -100, 5]])
    fn = lambda h, w, b: chunked_causal_lm_loss(h, w, labels, chunk_size=3, lm_head_bias_V=b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_no_supervised_token_is_zero_and_connected():
    hidden, weight, labels, _ = inputs(3, 1.0)
    labels[:, 0] = 5  # position 0's label is never a target (shift)
    loss = chunked_causal_lm_loss(hidden, weight, labels)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    g_hidden, g_weight = grads(loss, hidden, weight)
    assert torch.count_nonzero(g_hidden) == 0 and torch.count_nonzero(g_weight) == 0


def test_bf16_inputs_match_bf16_full_logits():
    hidden, weight, labels, _ = inputs(4, 0.3, dtype=torch.bfloat16)
    want = full_logits_loss(hidden, weight, labels)
    got = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=6)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for g, w in zip(grads(got, hidden, weight), grads(want, hidden, weight)):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-3)


def test_bad_labels_give_clear_error():
    hidden, weight, labels, _ = inputs(5, 0.0)
    labels[0, 3] = V
    with pytest.raises(ValueError, match=rf"labels must be in \[0, {V}\)"):
        chunked_causal_lm_loss(hidden, weight, labels)
    with pytest.raises(ValueError, match="reduction"):
        chunked_causal_lm_loss(hidden, weight, labels, reduction="none")


def test_frozen_head_hidden_gradient_still_exact():
    hidden, weight, labels, _ = inputs(6, 0.3)
    weight.requires_grad_(False)
    got = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=4)
    want = full_logits_loss(hidden, weight, labels)
    (g_got,), (g_want,) = grads(got, hidden), grads(want, hidden)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-5)
