"""Sample lengths for the length-grouped sampler: parallel pass, on-disk cache, shipped sizes."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from comp.data import lengths as L
from comp.data.dataset import MixtureDataset
from comp.data.image import CompImageProcessor
from comp.data.mixture import load_mixture


def turn(q: str, a: str = "a red circle") -> list[dict]:
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


@pytest.fixture()
def data(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for k, (w, h) in enumerate([(90, 60), (40, 100), (300, 200), (56, 56)]):
        Image.new("RGB", (w, h), (k * 40, 10, 10)).save(images / f"{k}.png")
    records = []
    for i in range(40):
        if i % 5 == 4:
            records.append({"id": f"t{i}", "conversations": turn("Say hi." * (i + 1), "hi")})
        else:
            records.append({"id": f"i{i}", "image": f"{i % 4}.png", "conversations": turn("<image>\nWhat?" * (i + 1))})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return path


def dataset(path, tiny_dir, max_num_vistoken=16):
    specs = load_mixture(path, image_folder=path.parent / "images")
    return MixtureDataset(specs, AutoTokenizer.from_pretrained(tiny_dir("qwen2")),
                          CompImageProcessor(max_num_vistoken=max_num_vistoken), model_max_length=512)


def test_parallel_pass_equals_the_sequential_one(data, tiny_dir, monkeypatch):
    ds = dataset(data, tiny_dir)
    monkeypatch.setattr(L, "MIN_SAMPLES_PER_WORKER", 1)
    parallel = L.compute_lengths(ds, workers=2)
    sequential = ds.modality_lengths
    assert np.array_equal(parallel, sequential)
    assert (sequential < 0).sum() == 8 and (sequential > 0).sum() == 32


def test_cache_is_read_back_and_keyed_by_data_and_settings(data, tiny_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = L.cached_lengths(dataset(data, tiny_dir), cache)
    assert len(list(cache.glob("*.npy"))) == 1

    def fail(*_):
        raise AssertionError("computed again although cached")

    monkeypatch.setattr(L, "compute_lengths", fail)
    assert np.array_equal(L.cached_lengths(dataset(data, tiny_dir), cache), first)
    monkeypatch.undo()

    # another pixel budget changes the counts: another key
    L.cached_lengths(dataset(data, tiny_dir, max_num_vistoken=64), cache)
    # the data file changed (same size, new mtime): another key
    stat = os.stat(data)
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    L.cached_lengths(dataset(data, tiny_dir), cache)
    assert len(list(cache.glob("*.npy"))) == 3
    assert not list(cache.glob("*.tmp"))


def test_none_never_caches(data, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("COMP_CACHE", str(tmp_path / "env_cache"))
    L.cached_lengths(dataset(data, tiny_dir), "none")
    assert not (tmp_path / "env_cache").exists()
    L.cached_lengths(dataset(data, tiny_dir))
    assert len(list((tmp_path / "env_cache" / "lengths").glob("*.npy"))) == 1


def test_shipped_image_sizes_are_used_without_opening_the_image(tmp_path, tiny_dir):
    (tmp_path / "images").mkdir()
    records = [
        {"id": "one", "image": "absent.png", "width": 300, "height": 200, "conversations": turn("<image>")},
        {"id": "two", "image": ["a.png", "b.png"], "image_sizes": [[300, 200], [40, 100]],
         "conversations": turn("<image><image>")},
        {"id": "bad", "image": "absent.png", "width": 0, "height": 200, "conversations": turn("<image>")},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    ds = dataset(path, tiny_dir)
    tokens = ds.image_processor.num_visual_tokens
    answer = len("a red circle") // 4  # the text estimate: UTF-8 bytes / 4 (no user text here)
    assert ds.estimate_lengths().tolist() == [
        answer + tokens(200, 300),
        answer + tokens(200, 300) + tokens(100, 40),
        answer + 1,  # an unusable size: the header is read; the file is missing, so 1 (skipped at load)
    ]
