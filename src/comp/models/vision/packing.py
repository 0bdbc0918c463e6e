"""Packing helpers for variable-size images in one token sequence (pure functions).

Shape legend: T tokens of all images packed, N images, K = C*P*P values of one patch,
h x w the patch grid of one image, m the merge size (2).

Token order inside an image is the 2x2 merge-window order of Qwen2-VL: the grid viewed as
(h/m, w/m, m, m), so that m*m consecutive tokens form one merge window.
"""
from __future__ import annotations

import torch


def cu_seqlens(lengths: list[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Cumulative sequence starts [N+1] as int32, the varlen-attention contract."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return out.to(device) if device is not None else out


def merge_window_perm(h: int, w: int, merge: int = 2) -> torch.Tensor:
    """perm_L with ``x_merge = x_raster[perm]``: raster index of each merge-order token."""
    if h % merge or w % merge:
        raise ValueError(f"patch grid {h}x{w} is not divisible by the merge size {merge}")
    raster_hw = torch.arange(h * w).view(h // merge, merge, w // merge, merge)
    return raster_hw.permute(0, 2, 1, 3).reshape(-1)


def rowcol_ids(h: int, w: int, merge: int = 2) -> torch.Tensor:
    """pos_L2: (row, col) of each token of an h x w grid, in merge-window order."""
    perm = merge_window_perm(h, w, merge)
    return torch.stack([perm // w, perm % w], dim=-1)


def patchify(image_CHW: torch.Tensor, patch: int, merge: int = 2) -> torch.Tensor:
    """[C, H, W] -> [h*w, C*P*P] in merge-window order, as Qwen2VLImageProcessor with
    temporal_patch_size=1 lays rows out (channel-major, then patch row, then column)."""
    c, height, width = image_CHW.shape
    if height % (patch * merge) or width % (patch * merge):
        raise ValueError(f"image {height}x{width} is not a multiple of patch*merge = {patch * merge}")
    h, w = height // patch, width // patch
    x = image_CHW.reshape(c, h // merge, merge, patch, w // merge, merge, patch)
    return x.permute(1, 4, 2, 5, 0, 3, 6).reshape(h * w, c * patch * patch)


def insert_first(x_TD: torch.Tensor, rows_ND: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Put rows_ND[i] in front of image i's tokens: [T, D] -> [T+N, D] (DINOv2's CLS)."""
    pieces = []
    for i, part in enumerate(torch.split(x_TD, lengths)):
        pieces += [rows_ND[i : i + 1], part]
    return torch.cat(pieces)


def patch_linear(patches_TK: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """A stride-P Conv2d on non-overlapping patches is one matmul on the flattened patches
    (weights stay Conv2d-shaped so checkpoints load unchanged)."""
    weight = conv.weight.flatten(1)
    return torch.nn.functional.linear(patches_TK.to(weight.dtype), weight, conv.bias)
