"""Collation (padding, images, skip markers), packing, and the modality/length-grouped sampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from comp.data.collator import DataCollator, first_fit
from comp.data.dataset import Skipped
from comp.data.sampler import ModalityLengthGroupedSampler, split_to_even_chunks
from comp.models.positions import get_mrope_position_ids, packed_mrope_position_ids

PAD, VS, IMG, VE = 0, 7, 9, 8


def sample(n_text: int, grids: list[tuple[int, int]], seed: int) -> dict:
    """A sample with images (each <vs> + h*w/4 image tokens + <ve>) then text; labels on the text."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [1], [-100]  # <|im_start|> first, masked like every real sample
    for h, w in grids:
        span = [VS] + [IMG] * (h * w // 4) + [VE]
        ids += span
        labels += [-100] * len(span)
    text = torch.randint(10, 50, (n_text,), generator=g).tolist()
    ids += text
    labels += text
    has = bool(grids)
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "has_image": has,
            "pixel_values": torch.randn(sum(h * w for h, w in grids), 6, generator=g) if has else None,
            "image_grid_thw": torch.tensor([(1, h, w) for h, w in grids]) if has else None}


SAMPLES = [sample(5, [(2, 2)], 0), sample(3, [], 1), sample(4, [(2, 4), (4, 2)], 2), sample(6, [], 3)]


def test_padding_images_and_skip_markers():
    marker = Skipped("missing_image", "x.png", "d.json record 1")
    batch = DataCollator(pad_token_id=PAD)([SAMPLES[0], marker, SAMPLES[1], SAMPLES[2]])
    lengths = [len(SAMPLES[i]["input_ids"]) for i in (0, 1, 2)]
    L = max(lengths)
    assert batch.inputs["input_ids"].shape == batch.inputs["labels"].shape == batch.inputs["attention_mask"].shape == (3, L)
    for row, (i, n) in enumerate(zip((0, 1, 2), lengths)):  # right padding
        assert torch.equal(batch.inputs["input_ids"][row, :n], SAMPLES[i]["input_ids"])
        assert torch.equal(batch.inputs["labels"][row, :n], SAMPLES[i]["labels"])
        assert (batch.inputs["input_ids"][row, n:] == PAD).all() and (batch.inputs["labels"][row, n:] == -100).all()
        assert batch.inputs["attention_mask"][row].tolist() == [1] * n + [0] * (L - n)
    assert batch.has_image_S.tolist() == [True, False, True]
    assert torch.equal(batch.inputs["pixel_values"], torch.cat([SAMPLES[0]["pixel_values"], SAMPLES[2]["pixel_values"]]))
    assert batch.inputs["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 4], [1, 4, 2]]
    assert batch.skipped == [marker]
    assert "cu_seqlens" not in batch.inputs
    assert batch.record_ids == [SAMPLES[i].get("record") for i in (0, 1, 2)]


def test_left_padding():
    batch = DataCollator(pad_token_id=PAD, padding_side="left")([SAMPLES[1], SAMPLES[3]])
    assert batch.inputs["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 1], [1] * 7]
    assert torch.equal(batch.inputs["input_ids"][0, 3:], SAMPLES[1]["input_ids"])
    assert (batch.inputs["labels"][0, :3] == -100).all()
    with pytest.raises(ValueError, match="right-padded"):
        DataCollator(pad_token_id=PAD, pack_length=8, padding_side="left")


def test_all_skipped_and_text_only_batches():
    batch = DataCollator(pad_token_id=PAD)([Skipped("too_long", "", "r0")])
    assert batch.inputs["input_ids"].shape == (0, 0) and len(batch.skipped) == 1
    batch = DataCollator(pad_token_id=PAD)([SAMPLES[1], SAMPLES[3]])
    assert batch.inputs["pixel_values"] is None and batch.inputs["image_grid_thw"] is None


def test_first_fit():
    assert first_fit([5, 4, 3, 2, 9], 9) == [[0, 1], [2, 3], [4]]
    assert first_fit([12, 1], 9) == [[0], [1]]  # an oversize sample gets its own row


def test_packing_boundaries_and_positions():
    lengths = [len(s["input_ids"]) for s in SAMPLES]
    assert lengths == [9, 4, 13, 7]
    batch = DataCollator(pad_token_id=PAD, pack_length=15)(SAMPLES)
    rows = first_fit(lengths, 15)
    assert rows == [[0, 1], [2], [3]]
    assert [c.tolist() for c in batch.inputs["cu_seqlens"]] == [[0, 9, 13], [0, 13], [0, 7]]
    assert all(c.dtype == torch.int32 for c in batch.inputs["cu_seqlens"])
    assert batch.inputs["input_ids"].shape == (3, 13)
    assert batch.inputs["attention_mask"].tolist() == [[1] * 13, [1] * 13, [1] * 7 + [0] * 6]
    assert (batch.inputs["input_ids"][2, 7:] == PAD).all() and (batch.inputs["labels"][2, 7:] == -100).all()
    assert batch.has_image_S.tolist() == [True, False, True, False]
    # Positions per packed row equal each sample's own unpacked positions.
    images_per_row = [sum(len(SAMPLES[i]["image_grid_thw"]) for i in row if SAMPLES[i]["has_image"]) for row in rows]
    assert images_per_row == [1, 2, 0]
    grids = batch.inputs["image_grid_thw"].split(images_per_row)
    for b, row in enumerate(rows):
        packed_3L = packed_mrope_position_ids(batch.inputs["input_ids"][b], grids[b], batch.inputs["cu_seqlens"][b],
                                              image_token_id=IMG, vision_start_token_id=VS)
        for k, i in enumerate(row):
            start, end = batch.inputs["cu_seqlens"][b][k:k + 2].tolist()
            alone, _ = get_mrope_position_ids(SAMPLES[i]["input_ids"][None], SAMPLES[i]["image_grid_thw"],
                                              image_token_id=IMG, vision_start_token_id=VS)
            assert torch.equal(packed_3L[:, start:end], alone[:, 0])
            assert torch.equal(batch.inputs["labels"][b, start:end], SAMPLES[i]["labels"])
            assert batch.inputs["labels"][b, start] == -100  # no loss term crosses a sample boundary


# -- sampler ------------------------------------------------------------------------------

def modality_lengths(n_mm: int, n_text: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    mm = rng.integers(50, 3000, n_mm).tolist()
    text = (-rng.integers(5, 500, n_text)).tolist()
    out = mm + text
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_groups_modalities_and_lengths(world_size):
    lengths = modality_lengths(203, 97)
    batch_size = 4
    sampler = ModalityLengthGroupedSampler(lengths, batch_size, world_size=world_size, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    mega = world_size * batch_size
    full = order[:len(order) - (203 % mega) - (97 % mega)]  # the mixed tail is last
    for start in range(0, len(full), mega):
        group = full[start:start + mega]
        assert len({lengths[i] > 0 for i in group}) == 1  # one modality per megabatch
        for rank in range(world_size):  # each rank's batch: dealt longest first
            chunk = [abs(lengths[i]) for i in group[rank * batch_size:(rank + 1) * batch_size]]
            assert chunk == sorted(chunk, reverse=True)
    tail = order[len(full):]
    assert tail == sorted(tail)


def test_sampler_is_deterministic_per_seed_and_epoch():
    lengths = modality_lengths(60, 40)
    a = ModalityLengthGroupedSampler(lengths, 4, world_size=2, seed=1)
    b = ModalityLengthGroupedSampler(lengths, 4, world_size=2, seed=1)
    torch.manual_seed(0)
    np.random.seed(0)
    first = list(a)
    torch.manual_seed(1)
    np.random.seed(1)
    assert list(b) == first
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(ModalityLengthGroupedSampler(lengths, 4, world_size=2, seed=2)) != first


def test_sampler_megabatches_are_sorted_and_balanced():
    lengths = [n for n in modality_lengths(64, 0)]  # one modality: plain length grouping
    order = list(ModalityLengthGroupedSampler(lengths, 8, world_size=1, seed=0))
    for start in range(0, 64, 8):
        group = [lengths[i] for i in order[start:start + 8]]
        assert group == sorted(group, reverse=True)
    chunks = split_to_even_chunks(list(range(8)), [8, 7, 6, 5, 4, 3, 2, 1], 2)
    assert chunks == [[0, 3, 4, 7], [1, 2, 5, 6]]  # totals 18 and 18


def test_sampler_rejects_zero_length():
    with pytest.raises(ValueError, match="non-zero"):
        list(ModalityLengthGroupedSampler([3, 0, -2], 1))
