"""2x2 patch merger from the VFM width to the LLM width (Qwen2-VL's PatchMerger).

Shape legend: T tokens in merge-window order, D VFM width, E LLM width, m merge size.
Parameter names ``ln_q``, ``mlp.0``, ``mlp.2`` are Qwen2-VL's.
"""
from __future__ import annotations

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
