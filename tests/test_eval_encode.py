"""comp encode and the shared frozen-feature extraction (comp.eval.features)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import skimage
import torch
from safetensors import safe_open

from comp.data.image import image_size
from comp.eval import encode, features
from comp.eval.features import cached_features, encode_files, load_encoder, plan_batches, to_raster
from comp.models.vision.packing import patchify

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
# odd sizes and modes: RGB 451x300, L 384x303, RGBA 400x328, L 384x191, JPEG 640x427, P 14x25
PHOTOS = ["chelsea.png", "coins.png", "horse.png", "page.png", "rocket.jpg", "no_time_for_that_tiny.gif"]


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    return [SKIMAGE_DATA / name for name in PHOTOS]


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    return load_encoder(tiny_dir("siglip"), use_rope=True, max_num_vistoken=64)


def test_plan_batches_keeps_order_and_budget():
    assert plan_batches([3, 4, 2, 9, 1, 1], budget=8) == [[0, 1], [2], [3], [4, 5]]
    assert plan_batches([], budget=8) == []
    groups = plan_batches([5] * 7, budget=16)
    assert [i for g in groups for i in g] == list(range(7))
    assert all(5 * len(g) <= 16 for g in groups)
    with pytest.raises(ValueError, match="positive"):
        plan_batches([1], budget=0)


def test_to_raster_undoes_the_merge_window_order():
    image_CHW = torch.randn(3, 4 * 14, 6 * 14)
    raster_TK = image_CHW.reshape(3, 4, 14, 6, 14).permute(1, 3, 0, 2, 4).reshape(24, 3 * 14 * 14)
    assert torch.equal(to_raster(patchify(image_CHW, 14), 4, 6), raster_TK)


def test_features_do_not_depend_on_batching(encoder, photos):
    one_batch, grid_a = encode_files(encoder, photos, batch_tokens=100_000)
    per_image, grid_b = encode_files(encoder, photos, batch_tokens=1)
    assert torch.equal(grid_a, grid_b)
    for a, b, (_, h, w) in zip(one_batch, per_image, grid_a.tolist()):
        assert a.shape == (h * w, 32)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_features_equal_a_direct_forward_in_raster_order(encoder, photos):
    tokens, grid = encode_files(encoder, photos[:1])
    batch = encoder.processor(photos[:1])
    with torch.no_grad():
        direct_TD = encoder.model(batch["pixel_values"], batch["image_grid_thw"])
    _, h, w = grid[0].tolist()
    assert torch.equal(tokens[0], to_raster(direct_TD, h, w))


def test_cache_reuses_one_forward_pass(encoder, photos, tmp_path):
    calls = []
    hook = encoder.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        first, grid1 = cached_features(encoder, photos[:3], tmp_path)
        passes = len(calls)
        second, grid2 = cached_features(encoder, photos[:3], tmp_path)
    finally:
        hook.remove()
    assert passes >= 1 and len(calls) == passes  # the second call ran no forward pass
    assert torch.equal(grid1, grid2) and all(torch.equal(a, b) for a, b in zip(first, second))
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 1


def test_cache_key_follows_resolution_images_and_weights(tiny_dir, photos):
    native = load_encoder(tiny_dir("siglip"), max_num_vistoken=64)
    fixed = load_encoder(tiny_dir("siglip"), resolution=112)
    key = features.cache_key(native, photos[:2])
    assert key == features.cache_key(load_encoder(tiny_dir("siglip"), max_num_vistoken=64), photos[:2])
    assert key != features.cache_key(fixed, photos[:2])
    assert key != features.cache_key(native, photos[:3])
    assert key != features.cache_key(native, photos[1:2] + photos[:1])


def test_comp_encode_writes_tokens_pooled_and_grid(tiny_dir, photos, tmp_path, capsys):
    out = tmp_path / "feats.safetensors"
    rc = encode.main([str(tiny_dir("siglip")), *map(str, photos), "--out", str(out),
                      "--max_num_vistoken", "64", "--batch_tokens", "300", "--use_rope", "1"])
    assert rc == 0, capsys.readouterr().err
    assert f"{len(photos)} images" in capsys.readouterr().out
    encoder = load_encoder(tiny_dir("siglip"), use_rope=True, max_num_vistoken=64)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
        assert json.loads(meta["files"]) == [str(p) for p in photos]
        assert meta["order"] == "raster"
        for i, photo in enumerate(photos):
            key = f"{i}/{photo.stem}"
            tokens, pooled, grid = (f.get_tensor(f"{key}/{n}") for n in ("tokens", "pooled", "grid_thw"))
            height, width = encoder.processor.resized_size(*image_size(photo))
            assert grid.tolist() == [1, height // 14, width // 14]
            assert tokens.shape == (height * width // 196, 32)
            torch.testing.assert_close(pooled, tokens.mean(0))
        assert len(list(f.keys())) == 3 * len(photos)


def test_comp_encode_names_the_bad_file(tiny_dir, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    assert encode.main([str(tiny_dir("siglip")), str(missing), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "nope.png" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert encode.main([str(tiny_dir("siglip")), str(broken), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "broken.png" in capsys.readouterr().err


def test_fixed_resolution_gives_one_grid_for_all_sizes(tiny_dir, photos):
    encoder = load_encoder(tiny_dir("siglip"), resolution=112)
    tokens, grid = encode_files(encoder, photos)
    assert grid.tolist() == [[1, 8, 8]] * len(photos)
    assert all(t.shape == (64, 32) for t in tokens)


def test_comp_command_dispatches_encode(tiny_dir, photos, tmp_path):
    out = tmp_path / "f.safetensors"
    cmd = [sys.executable, "-m", "comp", "encode", str(tiny_dir("siglip")), str(photos[0]),
           "--out", str(out), "--max_num_vistoken", "16"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr
    with safe_open(out, "pt") as f:
        assert sorted(f.keys()) == ["0/chelsea/grid_thw", "0/chelsea/pooled", "0/chelsea/tokens"]
