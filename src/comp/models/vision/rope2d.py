"""C-RoPE: the VFM's learned absolute table resized to the image grid, plus 2D RoPE.

Shape legend: L tokens of one image, T tokens packed, S = g*g rows of the learned square
table, D model width, H heads, Dh head dim.

The 2D RoPE is Qwen2-VL's vision rotary: Dh/4 frequencies theta^(-2i/(Dh/2)); the row
angles and the column angles are concatenated to Dh/2 values, repeated to Dh and applied
with rotate-half to the whole head. Angles and the rotation are computed in float32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .configuration import POS_ORDERS
from .packing import merge_window_perm


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    return 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)


def rope_cos_sin(pos_T2: torch.Tensor, head_dim: int, theta: float = 10000.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) ids -> cos_TDh, sin_TDh (float32)."""
    inv = rope_inv_freq(head_dim, theta).to(pos_T2.device)
    angles = (pos_T2.float()[..., None] * inv).flatten(-2)  # [T, Dh/2]: rows then cols
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_THDh: torch.Tensor, cos_TDh: torch.Tensor, sin_TDh: torch.Tensor) -> torch.Tensor:
    xf = x_THDh.to(torch.promote_types(x_THDh.dtype, torch.float32))
    cos, sin = cos_TDh[:, None].to(xf.dtype), sin_TDh[:, None].to(xf.dtype)
    return (xf * cos + rotate_half(xf) * sin).to(x_THDh.dtype)


def resize_pos_table(table_SD: torch.Tensor, h: int, w: int, mode: str = "bicubic",
                     antialias: bool = False) -> torch.Tensor:
    """Learned square table -> [h*w, D] rows in raster order for an h x w grid.

    Interpolates in float32 (bicubic in half precision shifts the table) with
    align_corners=False and an explicit output size, as transformers' SigLIP and DINOv2 do;
    the native grid is returned unchanged.
    """
    side = math.isqrt(table_SD.shape[0])
    if side * side != table_SD.shape[0]:
        raise ValueError(f"position table has {table_SD.shape[0]} rows, not a square grid")
    if (h, w) == (side, side):
        return table_SD
    grid = table_SD.float().T.reshape(1, -1, side, side)
    align = False if mode in ("bilinear", "bicubic") else None
    grid = F.interpolate(grid, size=(h, w), mode=mode, align_corners=align, antialias=antialias)
    return grid.reshape(-1, h * w).T.to(table_SD.dtype)


def packed_abs_positions(table_SD: torch.Tensor, grids_hw: list[tuple[int, int]], mode: str,
                         antialias: bool, order: str, merge: int = 2) -> torch.Tensor:
    """Resized table rows for every packed token -> [T, D].

    order "merge": rows permuted to the tokens' merge-window order (correct).
    order "raster": rows left in raster order while tokens are in merge-window order, the
    reference implementation's defect, kept only for its released checkpoints.
    """
    if order not in POS_ORDERS:
        raise ValueError(f"pos_order must be 'merge' or 'raster', got {order!r}")
    cache: dict[tuple[int, int], torch.Tensor] = {}
    rows = []
    for hw in grids_hw:
        if hw not in cache:
            table = resize_pos_table(table_SD, *hw, mode=mode, antialias=antialias)
            if order == "merge":
                table = table[merge_window_perm(*hw, merge).to(table.device)]
            cache[hw] = table
        rows.append(cache[hw])
    return torch.cat(rows) if len(rows) > 1 else rows[0]
