"""Image loading and Qwen2-VL-style preprocessing for native-resolution vision encoders.

Every image keeps its aspect ratio: ``smart_resize`` rounds both sides to multiples of
``patch_size * merge_size`` inside a pixel budget, and the patches of all images are packed
into one ``pixel_values`` matrix, rows in 2x2 merge-window order (Qwen2-VL's layout with a
temporal patch size of 1), so that a merger can concatenate 4 consecutive rows.

Shape legend: H, W image height / width in pixels; C colour channels (3); P patch size;
M merge size; T patches of all images together; D = C*P*P values per patch; N images.
"""
from __future__ import annotations

import errno
import json
import math
import os
import stat
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import InitVar, asdict, dataclass, field
from typing import IO, Any, ClassVar, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.utils import IMAGE_PROCESSOR_NAME

# Qwen2-VL's smart_resize refuses images whose long side is more than 200 times the short one.
MAX_ASPECT_RATIO = 200
# Refuse images above 2**27 (~134 M) pixels before decoding: about 400 MB as RGB, well above
# any training photo, and below Pillow's own hard limit, so this check and its message win.
DEFAULT_MAX_IMAGE_PIXELS = 2**27
DEFAULT_MAX_NUM_VISTOKEN = 1024  # merged tokens per image: comp train's budget (and comp data show's)
# The processor's budget when none is given, in merged tokens: Qwen2-VL's default
# max_pixels = 28 * 28 * 1280 and min_pixels = 56 * 56 (4 tokens).
PROCESSOR_MAX_NUM_VISTOKEN = 1280
PROCESSOR_MIN_NUM_VISTOKEN = 4
# Files the folder readers (probe ImageFolders, ADE20K-layout images) take as images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

ImageSource = Union[str, os.PathLike, IO[bytes], Image.Image]
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]


class ImageLoadError(ValueError):
    """An image that cannot be used: missing, undecodable, truncated, or over the pixel limit."""


class ImagePathError(ImageLoadError):
    """An image path that names no usable file: ``missing`` (nothing there), ``not_a_file`` (a
    directory, pipe, socket or device: opening a pipe would block forever) or ``bad_name`` (a
    name the file system refuses, e.g. a component over 255 bytes)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


# Bytes at the end of a file searched for the end marker (some writers append padding).
TAIL_BYTES = 4096
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}


def regular_file(path: str | os.PathLike) -> int:
    """Size in bytes of the regular file at ``path`` (symlinks followed); ImagePathError
    otherwise. Only regular files are images: a FIFO or device given as one hangs a reader."""
    name = repr(os.fspath(path))
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ImagePathError(f"cannot load image {name}: file not found", "missing") from None
    except OSError as err:  # ENAMETOOLONG, ELOOP, EACCES, ...
        fix = {errno.ELOOP: "a symbolic link on the path points back into itself; fix the link",
               errno.ENAMETOOLONG: "fix the path (each path component must be at most 255 bytes)",
               errno.EACCES: "make the file readable"}.get(err.errno, "fix the path")
        raise ImagePathError(f"cannot load image {name}: {err.strerror or err}; {fix}", "bad_name") from None
    except ValueError as err:  # embedded NUL
        raise ImagePathError(f"cannot load image {name}: {err}", "bad_name") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a named pipe" if stat.S_ISFIFO(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device" if
                stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise ImagePathError(f"cannot load image {name}: it is {kind}, not a regular file; "
                             "only regular files are images", "not_a_file")
    return st.st_size


def truncation_problem(source: str | os.PathLike | IO[bytes], image_format: str | None) -> str | None:
    """Why a JPEG or PNG file (path or seekable binary file) is cut short (no end-of-image
    marker / IEND chunk near its end), or None. Reads the last few KB only: cheap enough for
    every image of a dataset."""
    marker = _END_MARKERS.get(image_format or "")
    if marker is None:
        return None
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            tail = _tail(f)
    else:
        position = source.tell()
        tail = _tail(source)
        source.seek(position)
    if marker in tail:
        return None
    what = "end-of-image marker (FFD9)" if marker != b"IEND" else "IEND chunk"
    return (f"the {image_format} file is truncated: no {what} in its last {TAIL_BYTES} bytes "
            "(an interrupted download or copy?); re-fetch the file")


def _tail(f: IO[bytes]) -> bytes:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - TAIL_BYTES))
    return f.read()


# ----------------------------------------------------------------------------- sizes


def smart_resize(height: int, width: int, factor: int = 28,
                 min_pixels: int = 28 * 28 * PROCESSOR_MIN_NUM_VISTOKEN,
                 max_pixels: int = 28 * 28 * PROCESSOR_MAX_NUM_VISTOKEN) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area in [min_pixels, max_pixels],
    aspect ratio kept as closely as the rounding allows. Same arithmetic, operation for
    operation, as transformers' Qwen2-VL, so that token counts agree to the pixel."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    aspect = max(height, width) / min(height, width)
    if aspect > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {height}x{width} pixels has an aspect ratio of {aspect:.1f}, "
                         f"above the {MAX_ASPECT_RATIO} that Qwen2-VL's smart_resize accepts; "
                         "crop or pad it first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ----------------------------------------------------------------------------- loading


def load_image(source: ImageSource, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode ``source`` (path or binary file) into an RGB image, EXIF orientation applied;
    a PIL image is only converted. Raises ImageLoadError naming the file for anything unusable (see ``decode``)."""
    image = decode(source, max_image_pixels)
    try:
        return to_rgb(image)
    except ValueError as err:
        raise ImageLoadError(f"cannot load image {_source_name(source)}: {err}") from err


def decode(source: ImageSource, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode the first frame of ``source`` in its own mode, EXIF orientation applied.

    The size in the header is checked against ``max_image_pixels`` before any pixel is
    decoded, so a decompression bomb costs neither time nor memory. Truncated files raise
    (unless someone set ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``, which pads with grey).
    Limits above Pillow's own (2 x ``PIL.Image.MAX_IMAGE_PIXELS``) need that raised too.
    """
    if isinstance(source, Image.Image):
        return source
    with _opened(source) as (image, name):
        width, height = image.size
        if width * height > max_image_pixels:
            raise ImageLoadError(
                f"cannot load image {name}: {width}x{height} = {width * height:,} pixels is "
                f"above the limit of {max_image_pixels:,} (a decompression bomb?); "
                "raise max_image_pixels if the image is genuine")
        if isinstance(source, (str, os.PathLike)) or getattr(source, "seekable", lambda: False)():
            problem = truncation_problem(source, image.format)
            if problem:
                raise ImageLoadError(f"cannot load image {name}: the data cannot be decoded: {problem}")
        image.load()
        return ImageOps.exif_transpose(image)


def image_size(source: str | os.PathLike | IO[bytes]) -> tuple[int, int]:
    """(height, width) of the image ``load_image`` returns, read from the header alone (no
    pixel decoded, no pixel limit): EXIF orientations 5-8 swap the sides. For token counts."""
    with _opened(source) as (image, _):
        width, height = image.size
        if image.format == "TIFF":  # Pillow reports (and decodes) TIFFs already oriented
            return height, width
        if image.format == "PNG":  # Pillow's PNG getexif() decodes, to look behind the pixels
            exif = Image.Exif()
            if image.info.get("exif"):
                exif.load(image.info["exif"])
        else:
            exif = image.getexif()
        swapped = exif.get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    return (width, height) if swapped else (height, width)


@contextmanager
def _opened(source: str | os.PathLike | IO[bytes]) -> Iterator[tuple[Image.Image, str]]:
    """Image.open (header only) with every failure, inside the block too, as ImageLoadError."""
    name = _source_name(source)
    if isinstance(source, (str, os.PathLike)):
        regular_file(source)
    try:
        with warnings.catch_warnings():  # the pixel limit in decode replaces Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                yield image, name
    except ImageLoadError:
        raise
    except FileNotFoundError as err:
        raise ImageLoadError(f"cannot load image {name}: file not found") from err
    except UnidentifiedImageError as err:
        raise ImageLoadError(f"cannot load image {name}: Pillow does not recognise it as an "
                             "image it can read (not an image, or a format variant it lacks)") from err
    except Image.DecompressionBombError as err:
        raise ImageLoadError(f"cannot load image {name}: {err}") from err
    except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, KeyError, ...
        raise ImageLoadError(f"cannot load image {name}: the data cannot be decoded "
                             f"(corrupt, truncated or an unsupported encoding): "
                             f"{type(err).__name__}: {err}") from err


def _source_name(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    return repr(getattr(source, "name", None) or f"<{type(source).__name__}>")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as RGB; see ``to_rgb_or_gray`` for the rules."""
    return to_rgb_or_gray(image).convert("RGB")


def to_rgb_or_gray(image: Image.Image) -> Image.Image:
    """Mode RGB or L, pixel for pixel what ``to_rgb`` gives (L is RGB with equal channels):
    the processor resizes L images as one band instead of three, under half the work.

    - Transparency (alpha band, or a palette / colour-key ``transparency``) is composited over
      white: the colour under transparent pixels is arbitrary (often black), and logos,
      documents and icons are drawn for a light page. transformers' Qwen2-VL does the same.
    - 16-bit and 32-bit modes are scaled to 8 bits (see ``to_uint8``) instead of clipped.
    - Everything else (1, P, CMYK, YCbCr, ...) goes through Pillow's own conversion.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return Image.fromarray(to_uint8(np.asarray(image)), "L")
    bands = image.getbands()
    if "A" in bands or "a" in bands or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in ("RGB", "L"):
        return image
    if image.mode == "1":
        return image.convert("L")
    return image.convert("RGB")


def to_uint8(values: np.ndarray) -> np.ndarray:
    """8-bit copy of integer or float pixels, rounded to nearest.

    uint8 passes through; uint16 spans its full range (65535 -> 255). Formats that do not
    declare a range (Pillow's I and F modes) are read by their largest value: floats up to
    1.0 as [0, 1], other values up to 255 as 8-bit, anything larger as 16-bit (clipped).
    """
    if values.dtype == np.uint8:
        return values
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:  # either byte order
        top = 65535.0
    else:
        peak = float(values.max()) if values.size else 0.0
        top = 1.0 if values.dtype.kind == "f" and peak <= 1.0 else 255.0 if peak <= 255 else 65535.0
    scaled = np.clip(values.astype(np.float64), 0.0, top) * (255.0 / top)
    return np.rint(scaled).astype(np.uint8)


def array_to_image(pixels: np.ndarray) -> Image.Image:
    """HWC (C = 1, 3 or 4: RGBA) or HW array, uint8 or float in [0, 1], as a PIL image."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
        raise ValueError(f"image array must be HxW or HxWxC with C in (1, 3, 4), got shape "
                         f"{pixels.shape}")
    if pixels.dtype == np.uint8:
        pixels_u8 = pixels
    elif pixels.dtype.kind == "f":
        if pixels.size and not (0.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0):
            raise ValueError(f"float image arrays must hold values in [0, 1], got "
                             f"[{pixels.min()}, {pixels.max()}]; pass uint8 for 0..255")
        pixels_u8 = np.rint(pixels.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        raise ValueError(f"image arrays must be uint8 or float in [0, 1], got {pixels.dtype}")
    mode = "L" if pixels_u8.ndim == 2 else ("RGB" if pixels_u8.shape[2] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(pixels_u8), mode)


# ----------------------------------------------------------------------------- processor


def _triple(values: float | Sequence[float], name: str) -> tuple[float, float, float]:
    values = [float(values)] * 3 if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{name} needs 3 values (R, G, B), got {values}")
    return tuple(values)


def _pixel_budget(bound: str, pixels: int | None, tokens: int | None, default_tokens: int,
                  token_pixels: int) -> int:
    """A pixel budget given in pixels or in merged LLM tokens (each ``token_pixels``), not both."""
    if pixels is not None and tokens is not None:
        raise ValueError(f"give either {bound}_pixels or {bound}_num_vistoken, not both")
    if pixels is not None:
        return int(pixels)
    return token_pixels * (default_tokens if tokens is None else tokens)


@dataclass(kw_only=True)
class CompImageProcessor(BaseImageProcessor):
    """Images -> ``BatchFeature(pixel_values [T, D] float32, image_grid_thw [N, 3] int64)``.

    Takes transformers' Qwen2-VL image processor arguments; the pixel budget may instead be
    given in LLM tokens after the merge, as CoMP's scripts do (``max_num_vistoken``:
    max_pixels = P*P*M*M*max_num_vistoken, default PROCESSOR_MAX_NUM_VISTOKEN; ``min_num_vistoken``
    likewise, default PROCESSOR_MIN_NUM_VISTOKEN).
    ``force_resize=N`` first resizes every image to N x N (CoMP Stage I: 384, II-a: 1024),
    then applies smart_resize as usual. Normalisation comes from the vision encoder's
    preprocessor config (``from_pretrained``).

    A ``BaseImageProcessor`` for transformers (``AutoImageProcessor``, ``ProcessorMixin``,
    ``save_pretrained``), with its own pixel path: transformers' backends resize per channel
    in float, this one resizes 8-bit images with Pillow and patchifies in one pass.
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values", "image_grid_thw"]

    min_pixels: int | None = None
    max_pixels: int | None = None
    patch_size: int = 14
    merge_size: int = 2
    image_mean: Sequence[float] = tuple(OPENAI_CLIP_MEAN)
    image_std: Sequence[float] = tuple(OPENAI_CLIP_STD)
    resample: int = int(Image.Resampling.BICUBIC)
    force_resize: int | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_num_vistoken: InitVar[int | None] = None
    min_num_vistoken: InitVar[int | None] = None
    _scale_C11: np.ndarray = field(init=False, repr=False, compare=False)
    _shift_C11: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self, max_num_vistoken: int | None, min_num_vistoken: int | None) -> None:
        super().__init__()
        token_pixels = self.patch_size ** 2 * self.merge_size ** 2
        self.min_pixels = _pixel_budget("min", self.min_pixels, min_num_vistoken, PROCESSOR_MIN_NUM_VISTOKEN,
                                        token_pixels)
        self.max_pixels = _pixel_budget("max", self.max_pixels, max_num_vistoken, PROCESSOR_MAX_NUM_VISTOKEN,
                                        token_pixels)
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.force_resize is not None and self.force_resize < 1:
            raise ValueError(f"force_resize must be a positive size, got {self.force_resize}")
        self.image_mean = _triple(self.image_mean, "image_mean")
        self.image_std = _triple(self.image_std, "image_std")
        self.resample = int(self.resample)
        # rescale and normalise fused: (x/255 - mean)/std = x*scale + shift, per channel
        mean, std = np.array(self.image_mean), np.array(self.image_std)
        self._scale_C11 = (1.0 / (255.0 * std)).astype(np.float32)[:, None, None]
        self._shift_C11 = (-mean / std).astype(np.float32)[:, None, None]

    # -- sizes (no pixels touched) --

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the processor resizes an image of this size to."""
        if self.force_resize is not None:
            height = width = self.force_resize
        return smart_resize(height, width, self.patch_size * self.merge_size,
                            self.min_pixels, self.max_pixels)

    def num_visual_tokens(self, height: int, width: int) -> int:
        """LLM tokens (after the merge) an image of this size produces."""
        resized_h, resized_w = self.resized_size(height, width)
        window = self.patch_size * self.merge_size
        return (resized_h // window) * (resized_w // window)

    # -- pixels --

    def __call__(self, images: ImageInput | Sequence[ImageInput],
                 return_tensors: str | None = "pt") -> BatchFeature:
        """One image or a list of them -> packed patches. Paths are decoded by the rules of
        ``load_image`` (EXIF orientation, pixel limit); PIL images and arrays (HWC with C in
        1, 3, 4 or HW; uint8, or float in [0, 1]) are taken as they are, converted to RGB."""
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("no images given")
        sources = [self._rgb_or_gray(item) for item in items]
        sizes_N2 = [self.resized_size(im.height, im.width) for im in sources]
        P, C = self.patch_size, 3
        grid_N3 = np.array([(1, h // P, w // P) for h, w in sizes_N2], dtype=np.int64)
        pixel_values_TD = np.empty((int(grid_N3.prod(axis=1).sum()), C * P * P), dtype=np.float32)
        start = 0
        for image, (height, width) in zip(sources, sizes_N2):
            if self.force_resize is not None:
                image = _resize(image, self.force_resize, self.force_resize, self.resample)
            pixels = np.asarray(_resize(image, height, width, self.resample))
            rows = height * width // (P * P)
            self._patchify_into(pixels, pixel_values_TD[start:start + rows])
            start += rows
        if return_tensors == "pt":
            data = {"pixel_values": torch.from_numpy(pixel_values_TD),
                    "image_grid_thw": torch.from_numpy(grid_N3)}
        else:
            data = {"pixel_values": pixel_values_TD, "image_grid_thw": grid_N3}
        return BatchFeature(data=data)

    def _rgb_or_gray(self, item: ImageInput) -> Image.Image:
        if isinstance(item, Image.Image):
            return to_rgb_or_gray(item)
        if isinstance(item, np.ndarray):
            return to_rgb_or_gray(array_to_image(item))
        if isinstance(item, (str, os.PathLike)):
            image = decode(item, self.max_image_pixels)
            try:
                return to_rgb_or_gray(image)
            except ValueError as err:
                raise ImageLoadError(f"cannot load image {_source_name(item)}: {err}") from err
        raise TypeError(f"images must be PIL images, paths or numpy arrays, got {type(item).__name__}")

    def _patchify_into(self, pixels: np.ndarray, out_TD: np.ndarray) -> None:
        """Normalise HWC (or HW) uint8 pixels into ``out_TD``, rows in merge-window order,
        each row channel-major, then patch row, then patch column.

        The merge-window reordering is one uint8 copy (a quarter of the float bytes); the
        float work is then two contiguous passes, gray images broadcast to 3 channels in them.
        """
        P, M = self.patch_size, self.merge_size
        height, width = pixels.shape[:2]
        pixels_HWC = pixels.reshape(height, width, -1)
        window_u8 = np.ascontiguousarray(
            pixels_HWC.reshape(height // (P * M), M, P, width // (P * M), M, P, -1)
            .transpose(0, 3, 1, 4, 6, 2, 5))  # (h/PM, w/PM, M, M, C or 1, P, P)
        out = out_TD.reshape(*window_u8.shape[:4], 3, P, P)
        np.multiply(window_u8, self._scale_C11, out=out)
        out += self._shift_C11

    # -- configuration --

    def to_dict(self) -> dict[str, Any]:
        config = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        config["image_mean"], config["image_std"] = list(self.image_mean), list(self.image_std)
        return {"image_processor_type": type(self).__name__, **config}

    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike, revision: str | None = None,
                        **overrides: Any) -> "CompImageProcessor":
        """Read a ``preprocessor_config.json`` (directory, file or Hub id). A CoMP config restores every
        setting; a vision encoder's (SigLIP, DINOv2 / Bit, AIMv2 / CLIP) gives its image_mean
        and image_std, the rest staying Qwen2-VL's. ``overrides`` win, and a pixel budget in
        either form replaces the stored one."""
        from comp.hub import resolve_model_dir

        try:
            path = resolve_model_dir(pretrained, revision)
        except FileNotFoundError as err:
            raise ValueError(f"cannot read the image processor config: {err}") from err
        path = path / IMAGE_PROCESSOR_NAME if path.is_dir() else path
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read the image processor config {str(path)!r}: {err}") from err
        return cls.from_dict(config, source=str(path), **overrides)

    @classmethod
    def from_dict(cls, config: dict, *, source: str = "the config", return_unused_kwargs: bool = False,
                  **overrides: Any):
        """From a preprocessor config's contents (see ``from_pretrained``). transformers'
        contract: ``return_unused_kwargs`` gives ``(processor, {})`` (an unknown override raises)."""
        config = {k: v for k, v in config.items() if k != "processor_class"}
        if config.get("image_processor_type") == cls.__name__:
            config.pop("image_processor_type")
            kwargs = dict(config)
        else:
            missing = [k for k in ("image_mean", "image_std") if k not in config and k not in overrides]
            if missing:
                raise ValueError(f"{source!r} has no {' or '.join(missing)}; write them (the "
                                 "encoder's normalisation) or pass them as arguments")
            kwargs = {k: config[k] for k in ("image_mean", "image_std") if k in config}
        for bound in ("min", "max"):
            if f"{bound}_pixels" in overrides or f"{bound}_num_vistoken" in overrides:
                kwargs.pop(f"{bound}_pixels", None)
        try:
            processor = cls(**{**kwargs, **overrides})
        except TypeError as err:  # an unknown setting
            raise ValueError(f"{source!r} does not fit {cls.__name__}: {err}") from err
        return (processor, {}) if return_unused_kwargs else processor

def _resize(image: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    """Pillow resize on 8-bit data, as transformers' PIL backend does (same filter, same
    rounding); an image already at the size is used as is."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=Image.Resampling(resample))
