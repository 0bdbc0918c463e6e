"""What every vision family shares: the interface a family declares (``Family``) and the
layer stack (``Encoder``).

A family module (siglip.py, dinov2.py, aimv2.py) writes only what differs: its embeddings,
its layer (attention + MLP in the family's parameter names) and how a transformers config of
the family maps to CompVisionConfig fields. families.py lists them.

Shipped by ``comp export-vfm --standalone``: imports only torch and sibling modules.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """One VFM family, in transformers' parameter names (state-dict keys equal the source
    checkpoint's, so original directories load without conversion).

    config_from_hf: transformers config of the family (two-tower or vision-only) -> the
        CompVisionConfig architecture fields.
    Embeddings: ``(config)``; ``forward(patches_TK, grids_hw, lengths) -> x_TD``.
    Layer: ``(config)``; ``forward(x_TD, ctx: PackedContext) -> x_TD``.
    layers_attr: the stack's attribute under ``encoder.`` ("layers" or "layer").
    final_norm: attribute name of the norm after the last layer, or None.
    make_final_norm: ``(config) -> nn.Module`` building it (None when final_norm is None).
    init_linear: initialises a Linear/Conv2d weight as the family's ``_init_weights`` does
        (used for a new merger and for randomly initialised models).
    """

    name: str
    config_from_hf: Callable[[object], dict]
    Embeddings: type[nn.Module]
    Layer: type[nn.Module]
    layers_attr: str
    final_norm: str | None
    make_final_norm: Callable[[object], nn.Module] | None
    init_linear: Callable[[nn.Parameter], None]


class Encoder(nn.Module):
    """``num_hidden_layers`` of the family's Layer under the family's attribute name."""

    def __init__(self, config, family: Family):
        super().__init__()
        self.layers_attr = family.layers_attr
        self.add_module(family.layers_attr,
                        nn.ModuleList(family.Layer(config) for _ in range(config.num_hidden_layers)))

    @property
    def blocks(self) -> nn.ModuleList:
        return getattr(self, self.layers_attr)
