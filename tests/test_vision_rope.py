"""C-RoPE pieces: the 2D rotary (oracle: transformers' Qwen2-VL vision rotary) and the
resized absolute table."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLVisionRotaryEmbedding

from comp.models.vision.packing import merge_window_perm, rowcol_ids
from comp.models.vision.rope2d import (apply_rope, packed_abs_positions, resize_pos_table,
                                       rope_cos_sin, rope_inv_freq)


def test_cos_sin_equal_qwen2_vl_vision_rotary():
    cfg = tf.Qwen2VLVisionConfig(embed_dim=64, num_heads=4)  # head dim 16
    pos_T2 = rowcol_ids(4, 6)
    cos_ref, sin_ref = Qwen2VLVisionRotaryEmbedding(cfg)(torch.zeros(1), pos_T2)
    cos, sin = rope_cos_sin(pos_T2, 16)
    assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)


def test_inv_freq_rejects_bad_head_dim():
    assert rope_inv_freq(72).shape == (18,)  # So400M: 16 heads of 72
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_inv_freq(30)


def _score(q_D, k_D, pos_q, pos_k, head_dim):
    pos = torch.tensor([pos_q, pos_k])
    cos, sin = rope_cos_sin(pos, head_dim)
    x = torch.stack([q_D, k_D])[:, None].double()
    r = apply_rope(x, cos.double(), sin.double())[:, 0]
    return float(r[0] @ r[1])


def test_score_depends_only_on_row_col_offset():
    torch.manual_seed(0)
    hd = 16
    q, k = torch.randn(hd), torch.randn(hd)
    for offset in [(0, 0), (1, 0), (0, 3), (-2, 5), (7, -4)]:
        scores = [_score(q, k, (r, c), (r + offset[0], c + offset[1]), hd)
                  for r, c in [(0, 0), (3, 1), (10, 20), (2, 9)]]
        assert max(scores) - min(scores) < 1e-5, (offset, scores)  # float32 angles
    # and it does depend on the offset (rows and columns separately)
    base = _score(q, k, (0, 0), (0, 0), hd)
    assert abs(_score(q, k, (0, 0), (1, 0), hd) - base) > 1e-4
    assert abs(_score(q, k, (0, 0), (0, 1), hd) - base) > 1e-4


def test_apply_rope_keeps_dtype_and_norm():
    x = torch.randn(5, 2, 8, dtype=torch.bfloat16)
    cos, sin = rope_cos_sin(rowcol_ids(2, 2).repeat(2, 1)[:5], 8)
    y = apply_rope(x, cos, sin)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().norm(dim=-1), x.float().norm(dim=-1), atol=0.05, rtol=0.02)


def test_resize_table_native_unchanged_and_matches_interpolate():
    table = torch.randn(16, 8)
    assert resize_pos_table(table, 4, 4) is table
    out = resize_pos_table(table, 6, 10)
    ref = F.interpolate(table.T.reshape(1, 8, 4, 4), size=(6, 10), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out, ref.reshape(8, 60).T)
    with pytest.raises(ValueError, match="square"):
        resize_pos_table(torch.randn(15, 8), 4, 4)


def test_abs_positions_follow_merge_order_or_reference_raster():
    table = torch.randn(16, 8)
    grids = [(4, 4), (2, 6), (4, 4)]
    merged = packed_abs_positions(table, grids, "bicubic", False, "merge")
    raster = packed_abs_positions(table, grids, "bicubic", False, "raster")
    assert merged.shape == raster.shape == (16 + 12 + 16, 8)
    torch.testing.assert_close(merged[:16], table[merge_window_perm(4, 4)])
    torch.testing.assert_close(raster[:16], table)
    # each merge-order token gets the row of its own (row, col)
    rc = rowcol_ids(4, 4)
    torch.testing.assert_close(merged[:16], table[rc[:, 0] * 4 + rc[:, 1]])
    with pytest.raises(ValueError, match="pos_order"):
        packed_abs_positions(table, grids, "bicubic", False, "zigzag")
