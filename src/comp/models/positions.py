"""M-RoPE position ids (Qwen2-VL style) for text interleaved with images.

Text tokens get one id shared by the three rows (temporal, height, width) and advance it by
one; an image's merged tokens get ``start + (0, row, col)`` and the text after it resumes at
``start + max(rows, cols)``. ``get_mrope_position_ids`` matches transformers' Qwen2-VL
``get_rope_index`` for images (t = 1), padding included: padded positions hold 0 and
``rope_deltas = max position + 1 - number of real tokens`` per row, the offset that decoding
adds to plain 1D positions after the prompt.

The work is vectorised over tokens: every token contributes an "advance" (1 for text, the
image's span on its first token, 0 otherwise); an exclusive cumulative sum of advances that
restarts at each segment (a batch row, or a packed sample) gives each text token's id and
each image's start.

Shape legend: B batch rows, L sequence length, T flattened tokens, N images, I image
tokens, S segments (rows or packed samples), 3 the (t, h, w) rows.
"""
from __future__ import annotations

import torch

__all__ = ["get_mrope_position_ids", "packed_mrope_position_ids"]


def _mrope_flat(
    input_ids_T: torch.Tensor,
    segment_T: torch.Tensor,
    valid_T: torch.Tensor,
    image_grid_thw_N3: torch.Tensor | None,
    num_segments: int,
    *,
    image_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int,
    segment_name: str,
) -> torch.Tensor:
    """Position ids ``[3, T]`` of flattened tokens; ``segment_T`` must be non-decreasing.

    Images are consumed in order: image n owns the next ``h*w/merge**2`` image tokens, which
    must be contiguous, inside one segment and right after ``<|vision_start|>``.
    """
    device = input_ids_T.device
    is_image_T = (input_ids_T == image_token_id) & valid_T
    image_pos_I = is_image_T.nonzero().squeeze(1)
    grid_N3 = _check_grid(image_grid_thw_N3, spatial_merge_size, device)
    tokens_N = grid_N3[:, 1] * grid_N3[:, 2] // spatial_merge_size**2
    if int(tokens_N.sum()) != image_pos_I.numel():
        raise ValueError(
            f"input_ids hold {image_pos_I.numel()} image tokens (id {image_token_id}) but "
            f"image_grid_thw ({grid_N3.shape[0]} images) needs {int(tokens_N.sum())} "
            f"(h*w/{spatial_merge_size}**2 per image); expand each image placeholder to its grid"
        )

    advance_T = valid_T.long()
    advance_T[is_image_T] = 0
    pos_3T = torch.zeros(3, input_ids_T.numel(), dtype=torch.long, device=device)
    if grid_N3.shape[0]:
        image_I = torch.repeat_interleave(torch.arange(grid_N3.shape[0], device=device), tokens_N)
        first_N = torch.cumsum(tokens_N, 0) - tokens_N
        first_pos_N = image_pos_I[first_N]
        last_pos_N = image_pos_I[first_N + tokens_N - 1]
        _check_images(input_ids_T, segment_T, first_pos_N, last_pos_N, tokens_N,
                      vision_start_token_id, segment_name)
        span_N = torch.maximum(grid_N3[:, 1], grid_N3[:, 2]) // spatial_merge_size
        advance_T[first_pos_N] = span_N

    # Exclusive cumsum of advances, restarted at each segment.
    before_T = torch.cumsum(advance_T, 0) - advance_T
    seg_total_S = torch.zeros(num_segments, dtype=torch.long, device=device)
    seg_total_S.index_add_(0, segment_T, advance_T)
    before_T = before_T - (torch.cumsum(seg_total_S, 0) - seg_total_S)[segment_T]

    pos_3T[:, valid_T] = before_T[valid_T]
    if grid_N3.shape[0]:
        k_I = torch.arange(image_pos_I.numel(), device=device) - first_N[image_I]
        width_I = (grid_N3[:, 2] // spatial_merge_size)[image_I]
        start_I = before_T[first_pos_N][image_I]
        pos_3T[0, image_pos_I] = start_I
        pos_3T[1, image_pos_I] = start_I + k_I // width_I
        pos_3T[2, image_pos_I] = start_I + k_I % width_I
    return pos_3T


def _check_grid(grid_N3: torch.Tensor | None, merge: int, device: torch.device) -> torch.Tensor:
    if grid_N3 is None:
        return torch.zeros(0, 3, dtype=torch.long, device=device)
    grid_N3 = torch.as_tensor(grid_N3, device=device).long().reshape(-1, 3)
    if (grid_N3[:, 0] != 1).any():
        raise ValueError(f"image_grid_thw must have t == 1 (images only), got {grid_N3.tolist()}")
    if ((grid_N3[:, 1:] % merge) != 0).any() or (grid_N3[:, 1:] <= 0).any():
        raise ValueError(
            f"image_grid_thw h and w must be positive multiples of spatial_merge_size={merge}, "
            f"got {grid_N3.tolist()}"
        )
    return grid_N3


def _check_images(
    input_ids_T: torch.Tensor,
    segment_T: torch.Tensor,
    first_pos_N: torch.Tensor,
    last_pos_N: torch.Tensor,
    tokens_N: torch.Tensor,
    vision_start_token_id: int,
    segment_name: str,
) -> None:
    split_N = (last_pos_N - first_pos_N + 1 != tokens_N) | (segment_T[first_pos_N] != segment_T[last_pos_N])
    prev_N = (first_pos_N - 1).clamp(min=0)
    no_start_N = (first_pos_N == 0) | (input_ids_T[prev_N] != vision_start_token_id)
    no_start_N |= segment_T[prev_N] != segment_T[first_pos_N]
    for bad_N, what in ((split_N, f"image tokens are not one contiguous run inside one {segment_name}"),
                        (no_start_N, f"image tokens do not follow <|vision_start|> (id {vision_start_token_id})")):
        if bad_N.any():
            n = int(bad_N.nonzero()[0])
            raise ValueError(
                f"image {n} ({segment_name} {int(segment_T[first_pos_N[n]])}): {what}; each image "
                f"needs <|vision_start|> followed by exactly h*w/merge**2 image tokens"
            )


def get_mrope_position_ids(
    input_ids_BL: torch.Tensor,
    image_grid_thw_N3: torch.Tensor | None,
    attention_mask_BL: torch.Tensor | None = None,
    *,
    image_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(position_ids [3, B, L], rope_deltas [B, 1])`` as Qwen2-VL's ``get_rope_index``.

    ``image_grid_thw_N3`` lists the images of all rows in order (patch grid before merging).
    Padding (``attention_mask == 0``, left or right) gets position 0 and is skipped when
    counting. A row without real tokens gets delta 0. ``vision_start_token_id`` only serves
    the check that every image follows its ``<|vision_start|>``; mismatched token counts,
    split images and bad grids raise ``ValueError`` naming the image and row.
    """
    B, L = input_ids_BL.shape
    device = input_ids_BL.device
    valid_BL = (torch.ones_like(input_ids_BL, dtype=torch.bool) if attention_mask_BL is None
                else attention_mask_BL.to(device).bool())
    segment_BL = torch.arange(B, device=device).unsqueeze(1).expand(B, L)
    pos_3T = _mrope_flat(
        input_ids_BL.reshape(-1), segment_BL.reshape(-1), valid_BL.reshape(-1), image_grid_thw_N3, B,
        image_token_id=image_token_id, vision_start_token_id=vision_start_token_id,
        spatial_merge_size=spatial_merge_size, segment_name="row",
    )
    position_ids_3BL = pos_3T.reshape(3, B, L).to(input_ids_BL.dtype)
    top_B = pos_3T.reshape(3, B, L).masked_fill(~valid_BL, -1).amax(dim=(0, 2))
    rope_deltas_B1 = (top_B + 1 - valid_BL.sum(1)).unsqueeze(1)
    return position_ids_3BL, rope_deltas_B1


def packed_mrope_position_ids(
    input_ids_L: torch.Tensor,
    image_grid_thw_N3: torch.Tensor | None,
    cu_seqlens_S1: torch.Tensor,
    *,
    image_token_id: int,
    vision_start_token_id: int,
    spatial_merge_size: int = 2,
) -> torch.Tensor:
    """Position ids ``[3, L]`` of several samples packed into one row.

    Sample ``s`` occupies ``[cu_seqlens[s], cu_seqlens[s+1])`` (the varlen-attention
    convention, ``cu_seqlens[0] == 0``); its positions start again at 0, exactly as if it
    were its own unpadded row of ``get_mrope_position_ids``. Tokens after ``cu_seqlens[-1]``
    are padding and get 0. Images are listed in order across the samples.
    """
    L = input_ids_L.numel()
    device = input_ids_L.device
    cu_S1 = torch.as_tensor(cu_seqlens_S1, device=device).long()
    if cu_S1.ndim != 1 or cu_S1.numel() < 1 or int(cu_S1[0]) != 0 or int(cu_S1[-1]) > L \
            or (cu_S1.diff() < 0).any():
        raise ValueError(
            f"cu_seqlens must be non-decreasing, start at 0 and end at most at {L} (the row length), "
            f"got {cu_S1.tolist()}"
        )
    index_L = torch.arange(L, device=device)
    num_samples = cu_S1.numel() - 1
    segment_L = (torch.searchsorted(cu_S1, index_L, right=True) - 1).clamp(max=max(num_samples - 1, 0))
    valid_L = index_L < cu_S1[-1]
    return _mrope_flat(
        input_ids_L.reshape(-1), segment_L, valid_L, image_grid_thw_N3, max(num_samples, 1),
        image_token_id=image_token_id, vision_start_token_id=vision_start_token_id,
        spatial_merge_size=spatial_merge_size, segment_name="packed sample",
    ).to(input_ids_L.dtype)
