"""2x2 patch merger from the VFM width to the LLM width (Qwen2-VL's PatchMerger).

Shape legend: T tokens in merge-window order, D VFM width, E LLM width, m merge size.
Parameter names ``ln_q``, ``mlp.0``, ``mlp.2`` are Qwen2-VL's.

A new merger is initialised as the reference's: it lives inside the VFM's transformers model
there, so the family's ``_init_weights`` initialises its linear layers (SigLIP: LeCun normal;
DINOv2: truncated normal, std = initializer_range 0.02; AIMv2: normal, std 0.02; see each
family's ``init_linear``), biases zero, LayerNorm weight 1 and bias 0.

Shipped by ``comp export-vfm --standalone``: imports only torch.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class PatchMerger(nn.Module):
    def __init__(self, d_vit: int, d_llm: int, merge_size: int = 2):
        super().__init__()
        self.d_in = d_vit * merge_size**2
        self.ln_q = nn.LayerNorm(d_vit, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.d_in, self.d_in), nn.GELU(), nn.Linear(self.d_in, d_llm))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """[T, D] -> [T/m^2, E]: m*m consecutive tokens (one merge window) become one."""
        if x_TD.shape[0] * x_TD.shape[1] % self.d_in:
            raise ValueError(f"{x_TD.shape[0]} tokens do not form whole merge windows")
        return self.mlp(self.ln_q(x_TD).view(-1, self.d_in))


def init_merger(merger: PatchMerger, init_linear: Callable[[nn.Parameter], None]) -> PatchMerger:
    """Initialise a new merger as the VFM family initialises its linear layers (see above)."""
    with torch.no_grad():
        for layer in (merger.mlp[0], merger.mlp[2]):
            init_linear(layer.weight)
            layer.bias.zero_()
        merger.ln_q.weight.fill_(1.0)
        merger.ln_q.bias.zero_()
    return merger
