"""SigLIP vision tower (So400M included) with C-RoPE, in transformers' parameter names.

Names follow ``SiglipVisionModel`` (``embeddings.*``, ``encoder.layers.N.*``); the two-tower
``SiglipModel`` checkpoint (google/siglip-so400m-patch14-384) stores them under
``vision_model.``. As in the CoMP reference there is no post-layernorm and no pooling head:
features are the last encoder layer's output.

Shape legend: T tokens packed, K = C*P*P, D width.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init

from .attention import PackedContext, ProjectedSelfAttention
from .encoder import Family
from .mlp import MLP
from .packing import patch_linear
from .rope2d import packed_abs_positions


def config_from_hf(hf) -> dict:
    """transformers' SiglipConfig (two towers) or SiglipVisionConfig -> CompVisionConfig fields."""
    v = getattr(hf, "vision_config", None) or hf
    return dict(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
                hidden_act=v.hidden_act, norm_eps=v.layer_norm_eps)


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size)

    def forward(self, patches_TK: torch.Tensor, grids_hw: list[tuple[int, int]],
                lengths: list[int]) -> torch.Tensor:
        c = self.cfg
        pos_TD = packed_abs_positions(self.position_embedding.weight, grids_hw, c.pos_interp_mode,
                                      c.pos_interp_antialias, c.pos_order, c.merge_size)
        return patch_linear(patches_TK, self.patch_embedding) + pos_TD


class SiglipLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = ProjectedSelfAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x_TD: torch.Tensor, ctx: PackedContext) -> torch.Tensor:
        x_TD = x_TD + self.self_attn(self.layer_norm1(x_TD), ctx)
        return x_TD + self.mlp(self.layer_norm2(x_TD))


def init_linear(weight: nn.Parameter) -> None:
    """LeCun normal: truncated at 2 std, std sqrt(1/fan_in) after truncation (SigLIP's rule)."""
    std = math.sqrt(1.0 / weight.shape[1]) / 0.87962566103423978
    init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


FAMILY = Family(name="siglip", config_from_hf=config_from_hf, Embeddings=Embeddings, Layer=SiglipLayer,
                layers_attr="layers", final_norm=None, make_final_norm=None, init_linear=init_linear)
