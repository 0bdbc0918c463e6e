"""CompImageProcessor: parity with transformers' Qwen2-VL PIL processor (temporal patch 1),
patch layout, pixel budget, inputs, and configs read from the tiny encoder checkpoints."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

import comp
from comp.data.image import CompImageProcessor, load_image, smart_resize
from comp.models.tiny import CLIP_MEAN_STD, IMAGENET_MEAN_STD, SIGLIP_MEAN_STD

skimage_data = pytest.importorskip("skimage.data")
PHOTO_PATHS = sorted(p for p in Path(skimage_data.data_dir).iterdir() if p.suffix in (".png", ".jpg"))
TOKEN = 14 * 14 * 4  # pixels per merged token


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    assert len(PHOTO_PATHS) >= 10, "scikit-image ships its sample photos in skimage/data"
    images = []
    for path in PHOTO_PATHS:
        with Image.open(path) as image:
            image.load()
            images.append(image)
    assert {"RGB", "L", "RGBA"} <= {im.mode for im in images}
    return images


def pair(max_tokens: int, min_tokens: int = 4, mean_std=SIGLIP_MEAN_STD, **ours_kwargs):
    """(transformers baseline, ours) with the same normalisation and pixel budget."""
    mean, std = mean_std
    base = Qwen2VLImageProcessorPil(temporal_patch_size=1, min_pixels=TOKEN * min_tokens,
                                    max_pixels=TOKEN * max_tokens, image_mean=mean, image_std=std)
    ours = CompImageProcessor(max_num_vistoken=max_tokens, min_num_vistoken=min_tokens,
                              image_mean=mean, image_std=std, **ours_kwargs)
    return base, ours


def assert_same(expected, actual) -> None:
    assert actual["pixel_values"].dtype == torch.float32
    assert actual["image_grid_thw"].dtype == torch.int64
    assert torch.equal(actual["image_grid_thw"], expected["image_grid_thw"])
    assert actual["pixel_values"].shape == expected["pixel_values"].shape
    assert (actual["pixel_values"] - expected["pixel_values"]).abs().max().item() <= 1e-4


# ----------------------------------------------------------------------------- smart_resize


def test_smart_resize_equals_transformers_on_random_sizes():
    rng = random.Random(0)
    budgets = [(TOKEN * 4, TOKEN * 1024), (TOKEN * 4, TOKEN * 3000), (TOKEN * 256, TOKEN * 300),
               (56 * 56, 28 * 28 * 1280)]
    for _ in range(4000):
        height, width = rng.randint(1, 5000), rng.randint(1, 5000)
        if max(height, width) / min(height, width) > 200:
            continue
        lo, hi = rng.choice(budgets)
        assert smart_resize(height, width, 28, lo, hi) == hf_smart_resize(height, width, 28, lo, hi)


def test_smart_resize_rules():
    for height, width in [(1, 1), (500, 371), (1411, 1411), (2800, 14), (7, 1200)]:
        h, w = smart_resize(height, width, 28, TOKEN * 4, TOKEN * 1024)
        assert h % 28 == 0 and w % 28 == 0
        assert TOKEN * 4 <= h * w <= TOKEN * 1024


@pytest.mark.parametrize("height, width", [(3000, 12), (12, 3000)])
def test_aspect_ratio_above_200_is_refused_like_transformers(height, width):
    """transformers refuses these; so do we (same rule), with a message that says what to do."""
    image = Image.new("RGB", (width, height), (10, 200, 30))
    base, ours = pair(1024)
    with pytest.raises(ValueError, match="aspect ratio"):
        base(image, return_tensors="pt")
    with pytest.raises(ValueError, match=rf"{height}x{width}.*250\.0.*above the 200.*crop or pad"):
        ours(image)
    with pytest.raises(ValueError, match="aspect ratio"):
        ours.num_visual_tokens(height, width)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("max_tokens, min_tokens, mean_std", [
    (1024, 4, SIGLIP_MEAN_STD),     # CoMP Stage I budget: mostly downscaling by a little
    (64, 4, CLIP_MEAN_STD),         # strong downscaling
    (3000, 2000, IMAGENET_MEAN_STD),  # min budget above the photos: upscaling
])
def test_parity_on_skimage_photos(photos, max_tokens, min_tokens, mean_std):
    base, ours = pair(max_tokens, min_tokens, mean_std)
    for image in photos:
        assert_same(base(image, return_tensors="pt"), ours(image))


def test_parity_batch_of_photos_and_paths(photos):
    base, ours = pair(1024)
    expected = base(photos, return_tensors="pt")
    assert_same(expected, ours(photos))
    assert_same(expected, ours(PHOTO_PATHS))  # sample photos carry no EXIF orientation


@pytest.mark.parametrize("height, width", [(1, 1), (2800, 14), (14, 2800), (3000, 15), (15, 3000), (57, 3)])
def test_parity_on_extreme_synthetic_sizes(height, width):
    pixels = np.random.default_rng(height * 7 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    for base, ours in (pair(1024), pair(16, 4, CLIP_MEAN_STD)):
        assert_same(base(image, return_tensors="pt"), ours(image))


def test_parity_on_transparent_and_palette_modes():
    """The photos' alpha sits over white pixels; random alpha tells composites apart."""
    rng = np.random.default_rng(5)
    rgba = Image.fromarray(rng.integers(0, 256, (45, 70, 4), dtype=np.uint8), "RGBA")
    palette = rgba.convert("RGB").quantize(16)
    palette.info["transparency"] = 3
    images = [rgba, rgba.convert("LA"), palette, rgba.convert("CMYK"), rgba.convert("1")]
    base, ours = pair(64)
    for image in images:
        assert_same(base(image, return_tensors="pt"), ours(image))


@pytest.mark.parametrize("size, side_patches", [(384, 28), (100, 8)])  # 384 -> 392, 100 -> 112 pixels
def test_parity_with_force_resize(photos, size, side_patches):
    base, ours = pair(1024, force_resize=size)
    for image in photos[::3]:
        square = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        result = ours(image)
        assert_same(base(square, return_tensors="pt"), result)
        assert result["image_grid_thw"].tolist() == [[1, side_patches, side_patches]]


# ----------------------------------------------------------------------------- layout and budget


def test_rows_follow_merge_windows_channel_major():
    """Read the layout back from pixel values that encode their own position."""
    height, width, P = 56, 84, 14
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pixels = np.stack([rows, cols, (rows + cols) % 7], axis=-1).astype(np.uint8)
    processor = CompImageProcessor(image_mean=0.0, image_std=1.0, min_pixels=1, max_pixels=10**6)
    values_TD = processor(pixels, return_tensors="np")["pixel_values"]
    decoded = np.rint(values_TD * 255).astype(int).reshape(-1, 3, P, P)
    order = [(window_row * 2 + dr, window_col * 2 + dc)
             for window_row in range(2) for window_col in range(3) for dr in range(2) for dc in range(2)]
    assert len(order) == len(decoded)
    for (patch_row, patch_col), patch_CPP in zip(order, decoded):
        window = pixels[patch_row * P:(patch_row + 1) * P, patch_col * P:(patch_col + 1) * P]
        assert np.array_equal(patch_CPP, window.transpose(2, 0, 1))


def test_vistoken_budget_and_counts(photos):
    processor = CompImageProcessor(max_num_vistoken=1024, image_mean=0.5, image_std=0.5)
    assert (processor.min_pixels, processor.max_pixels) == (TOKEN * 4, TOKEN * 1024)
    for image in photos + [Image.new("L", (3, 500))]:
        grid = processor(image)["image_grid_thw"][0]
        assert processor.num_visual_tokens(image.height, image.width) == grid.prod().item() // 4 <= 1024
    forced = CompImageProcessor(force_resize=384)
    assert forced.num_visual_tokens(31, 1000) == (392 // 28) ** 2
    with pytest.raises(ValueError, match="either max_pixels or max_num_vistoken"):
        CompImageProcessor(max_pixels=TOKEN * 10, max_num_vistoken=10)
    with pytest.raises(ValueError, match="min_pixels <= max_pixels"):
        CompImageProcessor(min_num_vistoken=100, max_num_vistoken=10)


# ----------------------------------------------------------------------------- inputs


def test_pil_path_and_array_inputs_agree(tmp_path):
    rng = np.random.default_rng(3)
    rgb_HWC = rng.integers(0, 256, (61, 90, 3), dtype=np.uint8)
    gray_HW = rng.integers(0, 256, (61, 90), dtype=np.uint8)
    Image.fromarray(rgb_HWC).save(tmp_path / "rgb.png")
    processor = CompImageProcessor(max_num_vistoken=16)
    expected = processor(Image.fromarray(rgb_HWC))
    for same in (rgb_HWC, rgb_HWC.astype(np.float32) / 255, str(tmp_path / "rgb.png"), tmp_path / "rgb.png"):
        assert torch.equal(processor(same)["pixel_values"], expected["pixel_values"])
    gray = processor(Image.fromarray(gray_HW).convert("RGB"))["pixel_values"]
    for same in (gray_HW, gray_HW[:, :, None], Image.fromarray(gray_HW)):
        assert torch.equal(processor(same)["pixel_values"], gray)
    rgba_HWC = np.concatenate([rgb_HWC, np.full((61, 90, 1), 255, np.uint8)], axis=-1)
    assert torch.equal(processor(rgba_HWC)["pixel_values"], expected["pixel_values"])


def test_bad_arrays_are_refused_clearly():
    processor = CompImageProcessor()
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        processor(np.full((30, 30, 3), 2.0, np.float32))
    with pytest.raises(ValueError, match="uint8 or float"):
        processor(np.zeros((30, 30, 3), np.int64))
    with pytest.raises(ValueError, match="HxWxC with C in"):
        processor(np.zeros((3, 30, 30, 2), np.uint8))
    with pytest.raises(TypeError, match="PIL images, paths or numpy arrays"):
        processor(torch.zeros(3, 30, 30))
    with pytest.raises(ValueError, match="return_tensors"):
        processor(np.zeros((30, 30), np.uint8), return_tensors="tf")


def test_numpy_output_equals_torch_output():
    processor = CompImageProcessor()
    image = Image.new("RGB", (100, 70), (1, 2, 3))
    as_np, as_pt = processor(image, return_tensors="np"), processor(image)
    assert isinstance(as_np["pixel_values"], np.ndarray)
    assert np.array_equal(as_np["pixel_values"], as_pt["pixel_values"].numpy())


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("kind, mean_std", [("siglip", SIGLIP_MEAN_STD), ("dinov2", IMAGENET_MEAN_STD),
                                            ("aimv2", CLIP_MEAN_STD)])
def test_from_pretrained_encoder_configs_and_round_trip(tiny_dir, tmp_path, photos, kind, mean_std):
    processor = CompImageProcessor.from_pretrained(tiny_dir(kind), max_num_vistoken=256, force_resize=200)
    assert processor.image_mean == pytest.approx(mean_std[0])
    assert processor.image_std == pytest.approx(mean_std[1])
    assert (processor.max_pixels, processor.force_resize, processor.resample) == (TOKEN * 256, 200, 3)
    assert processor.save_pretrained(tmp_path) == [str(tmp_path / "preprocessor_config.json")]
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["image_mean"] == list(mean_std[0])
    again = CompImageProcessor.from_pretrained(tmp_path)
    assert again == processor
    assert torch.equal(again(photos[0])["pixel_values"], processor(photos[0])["pixel_values"])
    smaller = CompImageProcessor.from_pretrained(tmp_path, max_num_vistoken=16)
    assert (smaller.max_pixels, smaller.min_pixels, smaller.force_resize) == (TOKEN * 16, TOKEN * 4, 200)


def test_from_pretrained_reports_the_file(tmp_path):
    config = tmp_path / "preprocessor_config.json"
    config.write_text(json.dumps({"image_processor_type": "SiglipImageProcessor"}))
    with pytest.raises(ValueError, match=r"preprocessor_config.json' has no image_mean or image_std"):
        CompImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="cannot read the image processor config"):
        CompImageProcessor.from_pretrained(tmp_path / "missing")
    config.write_text(json.dumps({"image_processor_type": "CompImageProcessor", "colour": 1}))
    with pytest.raises(ValueError, match="does not fit CompImageProcessor.*colour"):
        CompImageProcessor.from_pretrained(tmp_path)


def test_public_names():
    assert comp.CompImageProcessor is CompImageProcessor
    assert issubclass(comp.ImageLoadError, ValueError)
    assert load_image(PHOTO_PATHS[0]).mode == "RGB"
