"""M-RoPE position ids against transformers' own Qwen2-VL ``get_rope_index``."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import Qwen2VLConfig, Qwen2VLModel

from comp.models.positions import get_mrope_position_ids, packed_mrope_position_ids

VOCAB, PAD, VISION_START, VISION_END, IMAGE = 64, 0, 58, 59, 60
MERGE = 2
IDS = dict(image_token_id=IMAGE, vision_start_token_id=VISION_START, spatial_merge_size=MERGE)


@pytest.fixture(scope="module")
def qwen2vl():
    """A tiny Qwen2-VL whose ``get_rope_index`` is the oracle."""
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2])),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2,
                           spatial_merge_size=MERGE),
        image_token_id=IMAGE, vision_start_token_id=VISION_START, video_token_id=61,
    )
    return Qwen2VLModel(config).eval()


def oracle(model, ids_BL, grid_N3, mask_BL):
    token_type_BL = (ids_BL == IMAGE).int()
    if mask_BL is not None:
        token_type_BL = token_type_BL * mask_BL.int()
    return model.get_rope_index(ids_BL, token_type_BL, image_grid_thw=grid_N3, attention_mask=mask_BL)


def random_sample(rng: random.Random, num_images: int) -> tuple[list[int], list[list[int]]]:
    """Text pieces with images ``<vision_start> <image>*n <vision_end>`` in between."""
    ids, grids = [], []
    for n in range(num_images + 1):
        ids += [rng.randrange(3, 50) for _ in range(rng.randrange(0 if n else 1, 6))]
        if n < num_images:
            h, w = MERGE * rng.randrange(1, 6), MERGE * rng.randrange(1, 6)
            grids.append([1, h, w])
            ids += [VISION_START] + [IMAGE] * (h * w // MERGE**2) + [VISION_END]
    return ids, grids


def random_batch(rng: random.Random, max_images: int, side: str):
    rows = [random_sample(rng, rng.randrange(0, max_images + 1)) for _ in range(rng.randrange(1, 5))]
    L = max(len(ids) for ids, _ in rows) + rng.randrange(0, 3)
    ids_BL = torch.full((len(rows), L), PAD, dtype=torch.long)
    mask_BL = torch.zeros(len(rows), L, dtype=torch.long)
    for b, (ids, _) in enumerate(rows):
        sl = slice(L - len(ids), L) if side == "left" else slice(0, len(ids))
        ids_BL[b, sl] = torch.tensor(ids)
        mask_BL[b, sl] = 1
    grids = [g for _, gs in rows for g in gs]
    grid_N3 = torch.tensor(grids, dtype=torch.long) if grids else None
    return ids_BL, grid_N3, mask_BL


@pytest.mark.parametrize("side", ["left", "right"])
def test_matches_qwen2vl_get_rope_index_random_batches(qwen2vl, side):
    rng = random.Random(0 if side == "left" else 1)
    seen_images = 0
    for _ in range(60):
        ids_BL, grid_N3, mask_BL = random_batch(rng, max_images=3, side=side)
        seen_images += 0 if grid_N3 is None else grid_N3.shape[0]
        want_pos, want_delta = oracle(qwen2vl, ids_BL, grid_N3, mask_BL)
        got_pos, got_delta = get_mrope_position_ids(ids_BL, grid_N3, mask_BL, **IDS)
        assert got_pos.shape == want_pos.shape and got_pos.dtype == want_pos.dtype
        torch.testing.assert_close(got_pos, want_pos, rtol=0, atol=0)
        torch.testing.assert_close(got_delta, want_delta.long(), rtol=0, atol=0)
    assert seen_images > 60


def test_without_mask_and_without_images(qwen2vl):
    rng = random.Random(2)
    ids, grids = random_sample(rng, 2)
    ids_BL, grid_N3 = torch.tensor([ids]), torch.tensor(grids)
    for args in ((ids_BL, grid_N3), (torch.randint(3, 50, (3, 7)), None)):
        want_pos, want_delta = oracle(qwen2vl, *args, None)
        got_pos, got_delta = get_mrope_position_ids(*args, **IDS)
        torch.testing.assert_close(got_pos, want_pos, rtol=0, atol=0)
        torch.testing.assert_close(got_delta, want_delta.long(), rtol=0, atol=0)


def test_image_layout_by_hand():
    # text t0; image 4x6 patches -> 2x3 merged; then text continues at start + 3.
    ids = [5, VISION_START] + [IMAGE] * 6 + [VISION_END, 7]
    pos, delta = get_mrope_position_ids(torch.tensor([ids]), torch.tensor([[1, 4, 6]]), **IDS)
    assert pos[:, 0].tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],
    ]
    assert delta.tolist() == [[7 - 10]]


def test_packed_equals_separate_rows():
    rng = random.Random(3)
    samples = [random_sample(rng, k) for k in (2, 0, 1, 3)]
    ids_L = torch.tensor([t for ids, _ in samples for t in ids] + [PAD] * 3)
    cu = torch.tensor([0] + [len(ids) for ids, _ in samples]).cumsum(0)
    grid_N3 = torch.tensor([g for _, gs in samples for g in gs])
    got_3L = packed_mrope_position_ids(ids_L, grid_N3, cu, **IDS)
    want = [get_mrope_position_ids(torch.tensor([ids]), torch.tensor(gs) if gs else None, **IDS)[0][:, 0]
            for ids, gs in samples]
    torch.testing.assert_close(got_3L, torch.cat(want + [torch.zeros(3, 3, dtype=torch.long)], 1), rtol=0, atol=0)


def test_bad_inputs_give_clear_errors():
    ids = torch.tensor([[5, VISION_START] + [IMAGE] * 4 + [VISION_END]])
    with pytest.raises(ValueError, match="hold 4 image tokens .* needs 6"):
        get_mrope_position_ids(ids, torch.tensor([[1, 4, 6]]), **IDS)
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        get_mrope_position_ids(ids, torch.tensor([[1, 4, 3]]), **IDS)
    no_start = torch.tensor([[5, 6] + [IMAGE] * 4 + [VISION_END]])
    with pytest.raises(ValueError, match=r"image 0 \(row 0\).*vision_start"):
        get_mrope_position_ids(no_start, torch.tensor([[1, 4, 4]]), **IDS)
    across = torch.tensor([5, VISION_START, IMAGE, IMAGE, IMAGE, IMAGE])
    with pytest.raises(ValueError, match=r"image 0 \(packed sample 0\).*contiguous"):
        packed_mrope_position_ids(across, torch.tensor([[1, 4, 4]]), torch.tensor([0, 4, 6]), **IDS)
