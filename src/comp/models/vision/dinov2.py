"""DINOv2 with C-RoPE, in the parameter names transformers saves for ``Dinov2Model``.

On disk: ``embeddings.{cls_token, mask_token, position_embeddings, patch_embeddings.projection}``,
``encoder.layer.N.attention.attention.{query,key,value}``, ``attention.output.dense``,
``layer_scale{1,2}.lambda1``, ``norm{1,2}``, ``mlp.fc{1,2}``, final ``layernorm``.
The CoMP reference drops the CLS token and keeps the final LayerNorm (our default,
``keep_cls=False``). With ``keep_cls=True`` each image's sequence starts with its CLS token
(CLS table row added, never rotated by RoPE: it has no grid position). ``mask_token`` is
only for masked pre-training and is not loaded.

Shape legend: T tokens packed, N images, K = C*P*P, D width.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from .attention import PackedContext, self_attention
from .encoder import Family
from .mlp import MLP
from .packing import insert_first, patch_linear
from .rope2d import packed_abs_positions

INITIALIZER_RANGE = 0.02  # transformers' Dinov2Config default


def config_from_hf(hf) -> dict:
    """transformers' Dinov2Config -> CompVisionConfig fields (the MLP width is hidden*mlp_ratio)."""
    if hf.use_swiglu_ffn:
        raise ValueError("DINOv2 with a SwiGLU FFN (giant) is not supported; use ViT-S/B/L checkpoints")
    return dict(hidden_size=hf.hidden_size, intermediate_size=int(hf.hidden_size * hf.mlp_ratio),
                num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
                num_channels=hf.num_channels, image_size=hf.image_size, patch_size=hf.patch_size,
                hidden_act=hf.hidden_act, norm_eps=hf.layer_norm_eps, qkv_bias=hf.qkv_bias)


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        n = (cfg.image_size // cfg.patch_size) ** 2
        # loaded either way (so it saves back), trained only when kept
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size), requires_grad=cfg.keep_cls)
        self.patch_embeddings = PatchEmbeddings(cfg)
        self.position_embeddings = nn.Parameter(torch.zeros(1, n + 1, cfg.hidden_size))

    def forward(self, patches_TK: torch.Tensor, grids_hw: list[tuple[int, int]],
                lengths: list[int]) -> torch.Tensor:
        c = self.cfg
        table = self.position_embeddings[0]
        pos_TD = packed_abs_positions(table[1:], grids_hw, c.pos_interp_mode, c.pos_interp_antialias,
                                      c.pos_order, c.merge_size)
        x_TD = patch_linear(patches_TK, self.patch_embeddings.projection) + pos_TD
        if not c.keep_cls:
            return x_TD
        cls_ND = (self.cls_token[0] + table[:1]).expand(len(lengths), -1)
        return insert_first(x_TD, cls_ND, lengths)


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.query, self.key, self.value = (nn.Linear(d, d, bias=cfg.qkv_bias) for _ in range(3))


class SelfOutput(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.attention = SelfAttention(cfg)
        self.output = SelfOutput(cfg)

    def forward(self, x_TD: torch.Tensor, ctx: PackedContext) -> torch.Tensor:
        a = self.attention
        o = self_attention(a.query(x_TD), a.key(x_TD), a.value(x_TD), self.num_heads, ctx)
        return self.output.dense(o)


class LayerScale(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class Dinov2Layer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.layer_scale1 = LayerScale(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.layer_scale2 = LayerScale(cfg)

    def forward(self, x_TD: torch.Tensor, ctx: PackedContext) -> torch.Tensor:
        x_TD = x_TD + self.layer_scale1(self.attention(self.norm1(x_TD), ctx))
        return x_TD + self.layer_scale2(self.mlp(self.norm2(x_TD)))


def make_final_norm(cfg) -> nn.Module:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


def init_linear(weight: nn.Parameter) -> None:
    init.trunc_normal_(weight, std=INITIALIZER_RANGE)


FAMILY = Family(name="dinov2", config_from_hf=config_from_hf, Embeddings=Embeddings, Layer=Dinov2Layer,
                layers_attr="layer", final_norm="layernorm", make_final_norm=make_final_norm,
                init_linear=init_linear)
