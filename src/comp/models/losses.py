"""Causal LM loss that never materialises the full ``[tokens, vocab]`` logits.

At Qwen2.5's 151,936-token vocabulary, fp32 logits for 65k tokens are 40 GB before the
softmax and its gradient double that. Only supervised positions are kept, then the
cross-entropy runs over chunks of rows in a custom autograd function that saves the hidden
rows and per-row log-sum-exp and recomputes each chunk's logits in backward. Gradients for
the hidden rows, head weight and bias are accumulated chunk by chunk, and skipped for
inputs that need none (a frozen head in Stage I). Peak extra memory is about two
``[chunk, vocab]`` fp32 buffers plus, for a trained head, one fp32 ``[vocab, D]`` gradient.

The matmul runs in the inputs' dtype (as ``lm_head`` would in the model); the softmax and
cross-entropy are computed in fp32.

Shape legend: B batch, L sequence, D hidden width, V vocabulary, N supervised rows, C chunk rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["chunked_causal_lm_loss"]


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """Sum over rows of ``cross_entropy(h_ND @ W_VD.T + b_V, target_N)``, in chunks of rows."""

    @staticmethod
    def forward(ctx, h_ND, weight_VD, bias_V, target_N, chunk_size: int):
        acc = torch.promote_types(h_ND.dtype, torch.float32)
        lse_N = torch.empty(h_ND.shape[0], dtype=acc, device=h_ND.device)
        total = torch.zeros((), dtype=acc, device=h_ND.device)
        for start in range(0, h_ND.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits_CV = F.linear(h_ND[rows], weight_VD, bias_V).to(acc)
            lse_N[rows] = torch.logsumexp(logits_CV, dim=-1)
            total += (lse_N[rows] - logits_CV.gather(1, target_N[rows, None]).squeeze(1)).sum()
        ctx.save_for_backward(h_ND, weight_VD, bias_V, target_N, lse_N)
        ctx.chunk_size = chunk_size
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h_ND, weight_VD, bias_V, target_N, lse_N = ctx.saved_tensors
        acc = lse_N.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h_ND = torch.empty_like(h_ND) if need_h else None
        grad_w_VD = torch.zeros(weight_VD.shape, dtype=acc, device=weight_VD.device) if need_w else None
        grad_b_V = torch.zeros(bias_V.shape, dtype=acc, device=bias_V.device) if need_b else None
        for start in range(0, h_ND.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            # d loss / d logits = softmax - onehot(target), built in place in the logits buffer.
            grad_CV = F.linear(h_ND[rows], weight_VD, bias_V).to(acc)
            grad_CV.sub_(lse_N[rows, None]).exp_()
            grad_CV.scatter_add_(1, target_N[rows, None], grad_CV.new_full((grad_CV.shape[0], 1), -1.0))
            grad_CV.mul_(grad_total)
            if need_b:
                grad_b_V.add_(grad_CV.sum(0))
            grad_CV = grad_CV.to(h_ND.dtype)
            if need_h:
                grad_h_ND[rows] = grad_CV @ weight_VD
            if need_w and grad_CV.dtype == acc:
                grad_w_VD.addmm_(grad_CV.t(), h_ND[rows])
            elif need_w:  # low-precision matmul, accumulated in fp32 across chunks
                grad_w_VD.add_(grad_CV.t() @ h_ND[rows])
        return (
            grad_h_ND,
            grad_w_VD.to(weight_VD.dtype) if need_w else None,
            grad_b_V.to(bias_V.dtype) if need_b else None,
            None,
            None,
        )


def chunked_causal_lm_loss(
    hidden_BLD: torch.Tensor,
    lm_head_weight_VD: torch.Tensor,
    labels_BL: torch.Tensor,
    *,
    chunk_size: int = 4096,
    ignore_index: int = -100,
    reduction: str = "mean",
    lm_head_bias_V: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy: position ``t`` predicts ``labels[t + 1]``.

    ``reduction="mean"`` averages over supervised tokens (0 when there are none, still
    connected to ``hidden`` and the head so that every rank runs the same backward);
    ``"sum"`` lets callers normalise by a global token count. Returns an fp32 scalar.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden_BLD.shape[:2] != labels_BL.shape:
        raise ValueError(f"hidden {tuple(hidden_BLD.shape)} and labels {tuple(labels_BL.shape)} disagree on [B, L]")
    target_BL = labels_BL[:, 1:]
    keep_BL = target_BL != ignore_index
    target_N = target_BL[keep_BL]
    vocab = lm_head_weight_VD.shape[0]
    if target_N.numel() and (int(target_N.min()) < 0 or int(target_N.max()) >= vocab):
        raise ValueError(
            f"labels must be in [0, {vocab}) or {ignore_index} (ignored), got values in "
            f"[{int(target_N.min())}, {int(target_N.max())}]"
        )
    h_ND = hidden_BLD[:, :-1][keep_BL]
    total = _ChunkedCrossEntropySum.apply(h_ND, lm_head_weight_VD, lm_head_bias_V, target_N, chunk_size)
    return total / max(target_N.numel(), 1) if reduction == "mean" else total
