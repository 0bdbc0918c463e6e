"""load_image: every Pillow mode to RGB, EXIF orientation, first GIF frame, and bad files
(undecodable, truncated, decompression bombs) refused fast with ImageLoadError naming the file."""
from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comp import ImageLoadError
from comp.data.image import CompImageProcessor, decode, image_size, load_image, to_uint8

RGB_HWC = np.array([[[200, 100, 0], [0, 50, 250]], [[10, 20, 30], [255, 255, 255]]], np.uint8)


def saved(tmp_path: Path, image: Image.Image, name: str, **params) -> Path:
    path = tmp_path / name
    image.save(path, **params)
    return path


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# ----------------------------------------------------------------------------- modes


def test_gray_palette_and_bilevel_files(tmp_path):
    gray = Image.fromarray(np.array([[0, 90], [180, 255]], np.uint8), "L")
    assert np.array_equal(pixels(load_image(saved(tmp_path, gray, "l.png"))),
                          np.repeat(np.asarray(gray)[..., None], 3, axis=-1))
    palette = Image.fromarray(RGB_HWC).quantize(4)
    path = saved(tmp_path, palette, "p.png")
    assert decode(path).mode == "P"
    assert np.array_equal(pixels(load_image(path)), np.asarray(palette.convert("RGB")))
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((0, 0), 1)
    path = saved(tmp_path, bilevel, "one.png")
    assert decode(path).mode == "1"
    assert pixels(load_image(path)).tolist() == [[[255] * 3, [0] * 3]]


def test_alpha_is_composited_over_white(tmp_path):
    rgba_HWC = np.array([[[200, 100, 0, 0], [200, 100, 0, 255], [200, 100, 0, 128]]], np.uint8)
    out = pixels(load_image(saved(tmp_path, Image.fromarray(rgba_HWC, "RGBA"), "rgba.png")))
    alpha = 128 / 255
    expected_half = np.array([200, 100, 0]) * alpha + 255 * (1 - alpha)
    assert out[0, 0].tolist() == [255, 255, 255] and out[0, 1].tolist() == [200, 100, 0]
    assert np.abs(out[0, 2] - expected_half).max() <= 1

    la = Image.fromarray(np.array([[[40, 0], [40, 255]]], np.uint8), "LA")
    path = saved(tmp_path, la, "la.png")
    assert decode(path).mode == "LA"
    assert pixels(load_image(path)).tolist() == [[[255] * 3, [40] * 3]]

    palette = Image.fromarray(RGB_HWC).quantize(4)
    clear = palette.getpixel((0, 0))
    path = saved(tmp_path, palette, "pt.png", transparency=clear)
    assert decode(path).info["transparency"] is not None
    out = pixels(load_image(path))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert np.array_equal(out[1, 1], np.asarray(palette.convert("RGB"))[1, 1])

    colour_key = saved(tmp_path, Image.fromarray(RGB_HWC), "key.png", transparency=(10, 20, 30))
    assert pixels(load_image(colour_key))[1, 0].tolist() == [255, 255, 255]


def test_cmyk_and_ycbcr():
    cmyk = Image.frombytes("CMYK", (3, 1), bytes([0, 0, 0, 0, 255, 0, 0, 0, 0, 0, 0, 255]))
    assert pixels(load_image(cmyk)).tolist() == [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]]
    ycbcr = Image.fromarray(RGB_HWC).convert("YCbCr")
    assert np.abs(pixels(load_image(ycbcr)) - RGB_HWC).max() <= 3


def test_high_bit_depth_is_scaled_not_clipped(tmp_path):
    deep = Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16))
    path = saved(tmp_path, deep, "i16.png")
    assert decode(path).mode.startswith("I")
    assert pixels(load_image(path))[0, :, 0].tolist() == [0, 100, 255]

    int32 = Image.fromarray(np.array([[0, 7, 255]], np.int32), "I")
    path = saved(tmp_path, int32, "i32.tif")
    assert decode(path).mode == "I"
    assert pixels(load_image(path))[0, :, 0].tolist() == [0, 7, 255]

    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    path = saved(tmp_path, floats, "f.tif")
    assert decode(path).mode == "F"
    assert pixels(load_image(path))[0, :, 0].tolist() == [0, 128, 255]


def test_to_uint8_ranges():
    assert to_uint8(np.array([0, 32896, 65535], np.uint16)).tolist() == [0, 128, 255]
    assert to_uint8(np.array([0, 32896, 65535], ">u2")).tolist() == [0, 128, 255]
    assert to_uint8(np.array([0, 65535 // 2, 65535], np.int32)).tolist() == [0, 127, 255]
    assert to_uint8(np.array([-5, 3, 200], np.int32)).tolist() == [0, 3, 200]
    assert to_uint8(np.array([0.0, 0.25, 1.0], np.float32)).tolist() == [0, 64, 255]
    assert to_uint8(np.array([0.0, 2.0, 300.0], np.float32)).tolist() == [0, 0, 1]


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = saved(tmp_path, frames[0], "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(path) as image:
        assert image.n_frames == 3
    assert np.unique(pixels(load_image(path)).reshape(-1, 3), axis=0).tolist() == [[255, 0, 0]]


def test_exif_orientation_is_applied(tmp_path):
    """Stored 280 wide, red left half; Orientation 6 shows it rotated 90 degrees clockwise."""
    stored = Image.new("RGB", (280, 140), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 140, 140))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = saved(tmp_path, stored, "rotated.jpg", exif=exif, quality=95)
    shown = load_image(path)
    assert shown.size == (140, 280)
    assert image_size(path) == (280, 140)
    top, bottom = pixels(shown)[70, 70], pixels(shown)[210, 70]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]
    processor = CompImageProcessor(min_pixels=1)
    assert processor(path)["image_grid_thw"].tolist() == [[1, 20, 10]]
    assert processor(stored)["image_grid_thw"].tolist() == [[1, 10, 20]]


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_image_size_reads_the_header_as_load_image_will_show_it(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = Image.fromarray(np.zeros((30, 70, 3), np.uint8))
    for name in ("o.jpg", "o.png", "o.webp", "o.tif"):
        path = saved(tmp_path, stored, name, exif=exif)
        height, width = image_size(path)
        assert load_image(path).size == (width, height)
        assert (height, width) == ((70, 30) if orientation in (6, 8) else (30, 70))


def test_image_size_does_not_decode(tmp_path):
    start = time.perf_counter()
    assert image_size(bilevel_png(tmp_path / "big.png", 15000, 10000)) == (10000, 15000)
    assert time.perf_counter() - start < 1.0
    (tmp_path / "notes.txt").write_text("words")
    with pytest.raises(ImageLoadError, match="notes.txt.*does not recognise"):
        image_size(tmp_path / "notes.txt")


def test_file_objects_and_pil_images():
    buffer = io.BytesIO()
    Image.fromarray(RGB_HWC).save(buffer, "PNG")
    buffer.seek(0)
    assert np.array_equal(pixels(load_image(buffer)), RGB_HWC)
    assert np.array_equal(pixels(load_image(Image.fromarray(RGB_HWC))), RGB_HWC)
    with pytest.raises(ImageLoadError, match="<BytesIO>"):
        load_image(io.BytesIO(b"not an image"))


# ----------------------------------------------------------------------------- bad files


def refused(path: Path, match: str, **kwargs) -> ImageLoadError:
    start = time.perf_counter()
    with pytest.raises(ImageLoadError, match=match) as caught:
        load_image(path, **kwargs)
    assert time.perf_counter() - start < 1.0  # a correctness bound: never decode a bomb
    assert str(path) in str(caught.value)
    return caught.value


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_png(path: Path, width: int, height: int) -> Path:
    """A genuine all-black 1-bit PNG, streamed so that no full image is ever in memory."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 100) for _ in range(height // 100)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat)
                     + png_chunk(b"IEND", b""))
    return path


def test_truncated_jpeg(tmp_path):
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    data = saved(tmp_path, noisy, "whole.jpg").read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    refused(path, "cannot be decoded.*truncated")


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("just some words, not pixels\n")
    refused(path, "does not recognise it as an image")
    with pytest.raises(ImageLoadError, match="notes.png"):
        CompImageProcessor()([path])


def test_missing_file(tmp_path):
    refused(tmp_path / "absent.jpg", "file not found")


def test_200_megapixel_png_is_refused_before_decoding(tmp_path, monkeypatch):
    path = bilevel_png(tmp_path / "bomb.png", 20000, 10000)
    assert path.stat().st_size < 100_000
    # Pillow's own hard limit (2 x PIL.Image.MAX_IMAGE_PIXELS) fires first in Image.open ...
    refused(path, r"200000000 pixels\) exceeds limit")
    # ... and without it, ours does.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    refused(path, r"20000x10000 = 200,000,000 pixels is above the limit of 134,217,728")


def test_pixel_limit_is_configurable_and_checked_on_the_header(tmp_path):
    genuine = bilevel_png(tmp_path / "genuine.png", 4000, 3000)
    assert load_image(genuine).size == (4000, 3000)
    refused(genuine, "12,000,000 pixels is above the limit of 10,000,000", max_image_pixels=10_000_000)
    # Same header, pixel data destroyed: the limit message (not a decode error) shows that
    # the size was checked before decoding.
    data = bytearray(genuine.read_bytes())
    data[60:80] = b"\xff" * 20
    broken = tmp_path / "broken.png"
    broken.write_bytes(bytes(data))
    refused(broken, "cannot be decoded")
    refused(broken, "above the limit of 10,000,000", max_image_pixels=10_000_000)
    processor = CompImageProcessor(max_image_pixels=10_000_000)
    with pytest.raises(ImageLoadError, match="above the limit"):
        processor(str(genuine))


def tiff_with_compression(path: Path, compression: int) -> Path:
    """A valid little-endian TIFF whose Compression tag (259) is rewritten."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (10, 20, 30)).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(struct.unpack_from("<H", data, ifd)[0]):
        offset = ifd + 2 + 12 * entry
        if struct.unpack_from("<H", data, offset)[0] == 259:
            struct.pack_into("<H", data, offset + 8, compression)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("compression", [50001, 65000])  # WebP-in-TIFF (not built in), unknown
def test_tiff_with_a_compression_pillow_cannot_decode(tmp_path, compression):
    assert load_image(tiff_with_compression(tmp_path / "plain.tif", 1)).size == (16, 8)
    refused(tiff_with_compression(tmp_path / "odd.tif", compression), "cannot load image")


@pytest.mark.parametrize("kind", ["loop", "long"])
def test_unusable_paths_name_their_own_cause(tmp_path, kind):
    from comp.data.image import ImagePathError, regular_file

    if kind == "loop":
        (tmp_path / "a").symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to(tmp_path / "a")
        path, cause = tmp_path / "a" / "x.png", "symbolic link on the path points back into itself"
    else:
        path, cause = tmp_path / ("x" * 300 + ".png"), "at most 255 bytes"
    with pytest.raises(ImagePathError, match=cause) as err:
        regular_file(path)
    assert err.value.kind == "bad_name"
