"""Attention over packed images, confined to each image; never a dense T x T mask.

Shape legend: T tokens packed, H heads, Dh head dim, N images.

Backends ("auto" picks the first that applies):
  "flash"  flash_attn_varlen_func (flash-attn installed, CUDA tensors)
  "varlen" torch.nn.attention.varlen.varlen_attn (CUDA tensors, torch >= 2.10)
  "sdpa"   one scaled_dot_product_attention call per run of equal-length images
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .configuration import ATTN_BACKENDS as BACKENDS
from .rope2d import apply_rope



def _has_flash() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _has_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    half = dtype in (torch.float16, torch.bfloat16)  # the CUDA varlen kernels take half types
    if device.type == "cuda" and half and _has_flash():
        return "flash"
    if device.type == "cuda" and half and _has_varlen():
        return "varlen"
    return "sdpa"


def _flash_varlen():
    """flash-attn's varlen kernel. Imported in a try block: transformers' remote-code check
    (comp export-vfm --standalone) would otherwise demand flash-attn of every user."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as err:
        raise ImportError("attn_backend='flash' needs the flash-attn package (pip install flash-attn)") from err
    return flash_attn_varlen_func


def _sdpa_per_image(q_THDh, k_THDh, v_THDh, lengths: list[int], scale: float) -> torch.Tensor:
    """Consecutive images of equal length share one batched call (same-size images are common)."""
    out, start, i = [], 0, 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        n, length = j - i, lengths[i]
        sl = slice(start, start + n * length)
        q, k, v = (x[sl].view(n, length, *x.shape[1:]).transpose(1, 2) for x in (q_THDh, k_THDh, v_THDh))
        o = F.scaled_dot_product_attention(q, k, v, scale=scale)
        out.append(o.transpose(1, 2).reshape(n * length, *q_THDh.shape[1:]))
        start, i = start + n * length, j
    return torch.cat(out) if len(out) > 1 else out[0]


def packed_attention(q_THDh: torch.Tensor, k_THDh: torch.Tensor, v_THDh: torch.Tensor,
                     lengths: list[int], cu_seqlens_N1: torch.Tensor, backend: str = "auto"
                     ) -> torch.Tensor:
    scale = q_THDh.shape[-1] ** -0.5
    backend = resolve_backend(backend, q_THDh.device, q_THDh.dtype)
    max_len = max(lengths)
    if backend == "flash":
        return _flash_varlen()(q_THDh, k_THDh, v_THDh, cu_seqlens_N1, cu_seqlens_N1,
                                      max_len, max_len, softmax_scale=scale)
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q_THDh, k_THDh, v_THDh, cu_seqlens_N1, cu_seqlens_N1, max_len, max_len,
                           scale=scale)
    return _sdpa_per_image(q_THDh, k_THDh, v_THDh, lengths, scale)


@dataclass(frozen=True)
class PackedContext:
    """What every layer needs about the packing, computed once per forward."""

    lengths: list[int]  # tokens per image (host ints: the per-image SDPA split needs them)
    cu_seqlens: torch.Tensor  # [N+1] int32
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos_TDh, sin_TDh or None (rope off)
    backend: str


def self_attention(q_TD: torch.Tensor, k_TD: torch.Tensor, v_TD: torch.Tensor, num_heads: int,
                   ctx: PackedContext) -> torch.Tensor:
    """Split heads, rotate q and k when RoPE is on, attend within each image, merge heads."""
    t, d = q_TD.shape
    q, k, v = (x.view(t, num_heads, d // num_heads) for x in (q_TD, k_TD, v_TD))
    if ctx.rope is not None:
        q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
    return packed_attention(q, k, v, ctx.lengths, ctx.cu_seqlens, ctx.backend).reshape(t, d)


class ProjectedSelfAttention(nn.Module):
    """Self-attention with q/k/v/out projections under the names SigLIP and AIMv2 checkpoints
    give them (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``)."""

    def __init__(self, hidden_size: int, num_heads: int, bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(hidden_size, hidden_size, bias=bias) for _ in range(4))

    def forward(self, x_TD: torch.Tensor, ctx: PackedContext) -> torch.Tensor:
        o = self_attention(self.q_proj(x_TD), self.k_proj(x_TD), self.v_proj(x_TD), self.num_heads, ctx)
        return self.out_proj(o)
