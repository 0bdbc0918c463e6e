"""The two-layer MLP block of SigLIP and DINOv2 (parameter names ``fc1``, ``fc2``)."""
from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
