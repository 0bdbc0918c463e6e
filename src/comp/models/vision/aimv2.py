"""AIMv2 vision tower with C-RoPE, in the parameter names of transformers' ``Aimv2VisionModel``
(``embeddings.{patch_embed, rms_norm, position_embedding}``, ``encoder.layers.N.*``,
``rms_norm``; the two-tower ``Aimv2Model`` stores them under ``vision_model.``).

The absolute table is added after patch_embed + rms_norm, as in transformers. The final
``rms_norm`` is kept (AIMv2's features are defined after it, like DINOv2's final LayerNorm
in the CoMP reference); the attention-pooling ``head`` is not loaded. Only the learned-table
variants are supported (``is_native`` checkpoints use a sinusoidal table instead).

Shape legend: T tokens packed, K = C*P*P, D width.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN

from .attention import PackedContext, ProjectedSelfAttention
from .encoder import Family
from .packing import patch_linear
from .rope2d import packed_abs_positions

INITIALIZER_RANGE = 0.02  # transformers' Aimv2VisionConfig default


def config_from_hf(hf) -> dict:
    """transformers' Aimv2Config (two towers) or Aimv2VisionConfig -> CompVisionConfig fields."""
    v = getattr(hf, "vision_config", None) or hf
    if v.is_native:
        raise ValueError("AIMv2 'native' checkpoints (sinusoidal positions) are not supported; "
                         "use a learned-table AIMv2 such as apple/aimv2-large-patch14-224/336/448")
    return dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
                hidden_act=v.hidden_act, norm_eps=v.rms_norm_eps, qkv_bias=v.qkv_bias,
                mlp_bias=v.mlp_bias)


class RMSNorm(nn.Module):
    """Normalises in float32, then scales in the input dtype (as transformers' Aimv2RMSNorm)."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.rms_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size)

    def forward(self, patches_TK: torch.Tensor, grids_hw: list[tuple[int, int]],
                lengths: list[int]) -> torch.Tensor:
        c = self.cfg
        pos_TD = packed_abs_positions(self.position_embedding.weight, grids_hw, c.pos_interp_mode,
                                      c.pos_interp_antialias, c.pos_order, c.merge_size)
        return self.rms_norm(patch_linear(patches_TK, self.patch_embed)) + pos_TD


class FFN(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.mlp_bias)
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Aimv2Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = ProjectedSelfAttention(cfg.hidden_size, cfg.num_attention_heads, bias=cfg.qkv_bias)
        self.ffn = FFN(cfg)
        self.rms_norm1 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.rms_norm2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x_TD: torch.Tensor, ctx: PackedContext) -> torch.Tensor:
        x_TD = x_TD + self.attention(self.rms_norm1(x_TD), ctx)
        return x_TD + self.ffn(self.rms_norm2(x_TD))


def make_final_norm(cfg) -> nn.Module:
    return RMSNorm(cfg.hidden_size, cfg.norm_eps)


def init_linear(weight: nn.Parameter) -> None:
    init.normal_(weight, std=INITIALIZER_RANGE)


FAMILY = Family(name="aimv2", config_from_hf=config_from_hf, Embeddings=Embeddings, Layer=Aimv2Layer,
                layers_attr="layers", final_norm="rms_norm", make_final_norm=make_final_norm,
                init_linear=init_linear)
