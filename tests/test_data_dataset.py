"""MixtureDataset: good samples kept, every bad one skipped with its reason and counted."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from comp.data.collator import DataCollator
from comp.data.dataset import MixtureDataset, Skipped, SkipStats, TooManySkips, resolve_image_path
from comp.data.image import CompImageProcessor
from comp.data.mixture import load_mixture
from comp.data.records import SKIP_REASONS, SkipSample

MAX_LEN = 96


def turn(q: str, a: str | None = "a red circle") -> list[dict]:
    out = [{"from": "human", "value": q}]
    return out + ([{"from": "gpt", "value": a}] if a is not None else [])


def make_mixed(root: Path) -> tuple[Path, dict[str, str | None]]:
    """A JSONL file with good and bad records; returns it and id -> expected skip reason."""
    images = root / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (90, 60), (200, 10, 10)).save(images / "wide.png")
    Image.new("L", (40, 100), 128).save(images / "tall.jpg")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (30, 30)).save(root / "outside.png")
    Image.new("RGB", (402, 2)).save(images / "sliver.png")  # aspect ratio 201
    (images / "folder.png").mkdir()  # a directory named like an image
    with zipfile.ZipFile(images / "shard.zip", "w") as z:  # a member whose CRC fails
        z.writestr(zipfile.ZipInfo("member.png"), (images / "wide.png").read_bytes())
    raw = bytearray((images / "shard.zip").read_bytes())
    raw[60:64] = b"\0\0\0\0"  # inside the stored member's data
    (images / "shard.zip").write_bytes(bytes(raw))
    records = [
        ("good_one", {"image": "wide.png", "conversations": turn("<image>\nWhat is it?")}, None),
        ("good_two", {"image": ["wide.png", "tall.jpg"], "conversations": turn("<image> vs <image>")}, None),
        ("good_noph", {"image": "tall.jpg", "conversations": turn("Describe.")}, None),
        ("good_text", {"conversations": turn("Say hi.", "hi")}, None),
        ("bad_missing", {"image": "nope.png", "conversations": turn("<image>")}, "missing_image"),
        ("bad_decode", {"image": "broken.png", "conversations": turn("<image>")}, "undecodable_image"),
        ("bad_member", {"image": "shard.zip/member.png", "conversations": turn("<image>")}, "bad_member"),
        ("bad_dir", {"image": "folder.png", "conversations": turn("<image>")}, "bad_image_path"),
        ("bad_escape", {"image": "../outside.png", "conversations": turn("<image>")}, "path_escape"),
        ("bad_aspect", {"image": "sliver.png", "conversations": turn("<image>")}, "unprocessable_image"),
        ("bad_count", {"image": "wide.png", "conversations": turn("<image><image>")}, "placeholder_mismatch"),
        ("bad_shape", {"image": "wide.png", "conversations": "none"}, "malformed_record"),
        ("bad_long", {"image": "wide.png", "conversations": turn("one two three " * 40) + turn("<image>")},
         "too_long"),  # the image's turn starts after the long one: its span would be cut
        ("bad_unsup", {"image": "wide.png", "conversations": turn("<image>", None)}, "no_supervised_tokens"),
    ]
    lines = [json.dumps({"id": rid, **rec}) for rid, rec, _ in records]
    lines.insert(3, '{"id": "bad_json", "conversations": [}')  # a syntax error on line 4
    path = root / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    expected = {rid: reason for rid, _, reason in records} | {"bad_json": "malformed_record"}
    return path, expected


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir("qwen2"))


@pytest.fixture(scope="module")
def processor():
    return CompImageProcessor(max_num_vistoken=16)


@pytest.fixture()
def mixed(tmp_path, tokenizer, processor):
    path, expected = make_mixed(tmp_path)
    specs = load_mixture(path, image_folder=tmp_path / "images")
    return MixtureDataset(specs, tokenizer, processor, model_max_length=MAX_LEN), expected


def test_every_good_sample_kept_every_bad_one_reported(mixed):
    dataset, expected = mixed
    assert len(dataset) == len(expected)
    items = [dataset[i] for i in range(len(dataset))]
    kept = [x for x in items if not isinstance(x, Skipped)]
    skipped = [x for x in items if isinstance(x, Skipped)]
    assert len(kept) == sum(r is None for r in expected.values()) == 4
    reasons = {}
    for s in skipped:
        rid = s.where.split("(id ")[-1].rstrip(")") if "(id " in s.where else "bad_json"
        reasons[rid] = s.reason
    assert reasons == {rid: r for rid, r in expected.items() if r is not None}
    assert set(reasons.values()) == set(SKIP_REASONS)  # every class is exercised
    json_error = next(s for s in skipped if "record 3" in s.where)
    assert ":4:" in json_error.detail  # file:line:column of the syntax error
    stats = SkipStats()
    stats.update(len(kept), skipped)
    assert stats.kept + stats.skipped == len(dataset) and stats.skipped == len(expected) - 4
    assert sorted(stats.counts.elements()) == sorted(r for r in expected.values() if r)


def test_samples_carry_images_and_labels(mixed, tokenizer, processor):
    dataset, _ = mixed
    one, two, noph, text = (dataset[i] for i in (0, 1, 2, 4))  # record 3 is the syntax error
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for sample, sizes in ((one, [(60, 90)]), (two, [(60, 90), (100, 40)]), (noph, [(100, 40)])):
        assert sample["has_image"] and sample["pixel_values"].dtype == torch.float32
        assert sample["image_grid_thw"].shape == (len(sizes), 3)
        want = sum(processor.num_visual_tokens(h, w) for h, w in sizes)
        assert int((sample["input_ids"] == pad).sum()) == want
        assert sample["pixel_values"].shape[0] == int(sample["image_grid_thw"].prod(-1).sum())
    assert not text["has_image"] and text["pixel_values"] is None and text["image_grid_thw"] is None
    assert tokenizer.decode(text["labels"][text["labels"] != -100]) == "hi<|im_end|>"
    # no placeholder: the image comes right after the user header (after the default system turn)
    vision_start = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert "<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>" in tokenizer.decode(noph["input_ids"])
    assert int((noph["input_ids"] == vision_start).sum()) == 1


def test_dataloader_workers_bring_skips_to_the_main_process(mixed, tokenizer):
    dataset, expected = mixed
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2,
                                         collate_fn=DataCollator(tokenizer.pad_token_id))
    stats = SkipStats()
    for batch in loader:
        stats.update(batch.num_samples, batch.skipped)
    assert stats.kept == 4 and stats.skipped == len(expected) - 4
    assert set(stats.examples) == set(SKIP_REASONS)
    with pytest.raises(TooManySkips, match="too many bad samples") as info:
        stats.check(0.01)
    assert "missing_image: 1" in str(info.value)
    stats.check(0.9)
    stats.check(0.01, min_samples=1000)  # too few samples for a verdict yet


def test_skip_stats_logs_each_reason_once(caplog):
    stats = SkipStats()
    marks = [Skipped("missing_image", f"file {i}", f"d.json record {i}") for i in range(3)]
    with caplog.at_level("WARNING"):
        stats.update(97, marks)
    assert len(caplog.records) == 1 and "d.json record 0" in caplog.text
    assert stats.counts["missing_image"] == 3
    stats.check(0.03)
    with pytest.raises(TooManySkips):
        stats.check(0.02)


def test_modality_lengths(mixed, processor):
    dataset, expected = mixed
    lengths = dataset.modality_lengths
    assert lengths.shape == (len(expected),) and np.all(lengths != 0)
    assert lengths[0] > 0 and lengths[4] < 0  # image sample, text-only sample
    assert lengths[0] >= processor.num_visual_tokens(60, 90)


@pytest.mark.parametrize("rel", ["../x.png", "/etc/passwd", "a/../../x.png"])
def test_path_escape(tmp_path, rel):
    with pytest.raises(SkipSample, match="path_escape"):
        resolve_image_path(tmp_path, rel)
    assert resolve_image_path(tmp_path, "a/../b.png") == tmp_path / "b.png"


def test_json_array_mixture_with_sampling(tmp_path, tokenizer, processor):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": i, "conversations": turn(f"q{i}", f"answer {i}")} for i in range(10)]))
    yml = tmp_path / "mix.yaml"
    yml.write_text("datasets:\n  - {json_path: d.json, sampling_strategy: 'end:3'}\n"
                   "  - {json_path: d.json, sampling_strategy: 'first:20%'}\n")
    dataset = MixtureDataset.from_yaml(yml, tokenizer, processor, model_max_length=MAX_LEN)
    answers = [tokenizer.decode(dataset[i]["labels"][dataset[i]["labels"] != -100]) for i in range(len(dataset))]
    assert answers == [f"answer {i}<|im_end|>" for i in (7, 8, 9, 0, 1)]
