"""Packing helpers (pure functions) and packed attention confined to each image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as tf

from comp import CompVisionModel
from comp.models.vision.attention import packed_attention, resolve_backend
from comp.models.vision.packing import cu_seqlens, insert_first, merge_window_perm, patchify, rowcol_ids


def test_cu_seqlens_int32():
    cu = cu_seqlens([24, 4, 32])
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 24, 28, 60]


def test_merge_window_perm_and_rowcol():
    assert merge_window_perm(2, 4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    assert rowcol_ids(2, 4).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    with pytest.raises(ValueError, match="merge size"):
        merge_window_perm(3, 4)


def test_patchify_equals_qwen2vl_image_processor():
    """Oracle: transformers' Qwen2VLImageProcessorPil with temporal_patch_size=1."""
    img_HWC = np.random.default_rng(0).random((56, 84, 3), dtype=np.float32)
    proc = tf.Qwen2VLImageProcessorPil(temporal_patch_size=1, do_resize=False, do_rescale=False,
                                       do_normalize=False, patch_size=14, merge_size=2)
    ref = proc(images=[img_HWC], return_tensors="pt", input_data_format="channels_last")
    assert ref["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert torch.equal(patchify(torch.from_numpy(img_HWC).permute(2, 0, 1), 14), ref["pixel_values"])
    with pytest.raises(ValueError, match="multiple of patch"):
        patchify(torch.zeros(3, 42, 56), 14)


def test_insert_first():
    x = torch.arange(5.0)[:, None]
    out = insert_first(x, torch.tensor([[10.0], [20.0]]), [2, 3])
    assert out[:, 0].tolist() == [10, 0, 1, 20, 2, 3, 4]


def test_packed_sdpa_equals_per_image_attention():
    torch.manual_seed(0)
    lengths = [6, 6, 4, 9, 6]  # equal neighbours are batched together
    q, k, v = (torch.randn(sum(lengths), 2, 8) for _ in range(3))
    out = packed_attention(q, k, v, lengths, cu_seqlens(lengths), backend="sdpa")
    for qi, ki, vi, oi in zip(*(torch.split(x, lengths) for x in (q, k, v, out))):
        ref = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (qi, ki, vi))).transpose(0, 1)
        torch.testing.assert_close(oi, ref)
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("dense", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("kind", ["siglip", "dinov2", "dinov2+cls", "aimv2"])
@pytest.mark.parametrize("use_rope", [False, True])
def test_packing_invariance(tiny_dir, kind, use_rope):
    """Three images of different sizes packed together = each image alone."""
    family, _, cls = kind.partition("+")
    model = CompVisionModel.from_pretrained(tiny_dir(family), use_rope=use_rope, keep_cls=bool(cls))
    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 14 * h, 14 * w, generator=gen) for h, w in [(4, 6), (2, 2), (8, 4)]]
    patches = [patchify(im, 14) for im in images]
    grids = [[1, im.shape[1] // 14, im.shape[2] // 14] for im in images]
    with torch.no_grad():
        packed = model(torch.cat(patches), torch.tensor(grids))
        alone = [model(p, torch.tensor([g])) for p, g in zip(patches, grids)]
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(alone[0][:4], alone[2][:4], atol=1e-3)  # images really differ
