"""Frozen encoder features of image files: token-budget batching, raster order, disk cache.

Shared by ``comp encode`` and ``comp probe``: every image goes through the encoder once at
its native resolution (or a fixed square one), images packed into batches by a token budget;
the caller gets each image's token features in raster order (``tokens.view(h, w, D)`` is the
patch grid) and their mean.

Shape legend: N images, T patch tokens of all images, n_i tokens of image i, D encoder
width, h x w an image's patch grid.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file
from tqdm.auto import tqdm

from comp.cliargs import positive_int
from comp.data.image import DEFAULT_MAX_IMAGE_PIXELS, PROCESSOR_MAX_NUM_VISTOKEN, CompImageProcessor, image_size
from comp.errors import UserError
from comp.files import atomic_output
from comp.hub import resolve_model_dir
from comp.models.vision.model import CompVisionModel
from comp.models.weights import save_file
from comp.models.vision.packing import merge_window_perm

CACHE_FORMAT = "comp-features/1"
# Evaluation budget when none is given: the processor's default, not the budget the VFM was
# trained with (a saved training config may hold Stage I's small one).
DEFAULT_EVAL_TOKENS = PROCESSOR_MAX_NUM_VISTOKEN


@dataclass
class Encoder:
    """A frozen encoder with the image preprocessing it was trained with."""

    model: CompVisionModel
    processor: CompImageProcessor
    source: Path  # the checkpoint directory
    setting: dict  # what changes the features besides the weights: rope, resolution, budget


def default_device() -> str:
    """This process's GPU (``LOCAL_RANK`` under a launcher), else the CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def load_encoder(vfm_dir: str | Path, *, use_rope: bool | None = None, resolution: int | None = None,
                 max_num_vistoken: int | None = None, device: str | None = None,
                 pos_order: str | None = None) -> Encoder:
    """An HF SigLIP / DINOv2 / AIMv2 or CoMP-VFM (directory or Hub id) as a frozen per-token encoder.

    ``resolution`` N resizes every image to N x N first (``force_resize``); None keeps the
    native size inside the ``max_num_vistoken`` budget (merged tokens; None:
    DEFAULT_EVAL_TOKENS, whatever budget the directory's training used). The image
    normalisation comes from the directory. A merger stored there is dropped: probes read
    the encoder itself. ``device`` None: CUDA when available. ``pos_order`` None: the
    directory's (raster for a detected reference-trained encoder). Features come back as
    float32 on the CPU.
    """
    from comp.models.kinds import refuse_non_finite, require_kind
    from comp.models.weights import check_weight_files

    vfm_dir = resolve_model_dir(vfm_dir)
    require_kind(vfm_dir, "comp-vfm", "vfm")
    try:
        check_weight_files(vfm_dir)  # a truncated or corrupt header: named, not a traceback
    except FileNotFoundError as err:
        raise UserError("the encoder has no weights", vfm_dir, str(err)) from None

    overrides = {} if pos_order is None else {"pos_order": pos_order}
    try:
        model = CompVisionModel.from_pretrained(vfm_dir, use_rope=use_rope, w_merger=0, **overrides)
    except RuntimeError as err:  # torch's load_state_dict report: one line per tensor
        mismatch = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        if not mismatch:
            raise
        raise UserError(f"the weights do not fit config.json ({mismatch[0]})", vfm_dir,
                        "use the config.json the weights were saved with") from None
    refuse_non_finite(model, vfm_dir)


    model.requires_grad_(False).to(device or default_device())
    tokens = DEFAULT_EVAL_TOKENS if max_num_vistoken is None else max_num_vistoken
    processor = CompImageProcessor.from_pretrained(vfm_dir, force_resize=resolution, max_num_vistoken=tokens,
                                                   min_num_vistoken=4)
    if processor.max_pixels > DEFAULT_MAX_IMAGE_PIXELS:
        raise UserError(f"--max_num_vistoken {tokens} allows {processor.max_pixels} pixels per image, above "
                        f"the limit of {DEFAULT_MAX_IMAGE_PIXELS}", vfm_dir,
                        f"use at most {tokens * DEFAULT_MAX_IMAGE_PIXELS // processor.max_pixels}")
    setting = {"use_rope": bool(model.config.use_rope), "pos_order": model.config.pos_order,
               "resolution": resolution, "max_num_vistoken": tokens,
               "min_pixels": processor.min_pixels, "max_pixels": processor.max_pixels}
    return Encoder(model, processor, vfm_dir, setting)


def at_resolution(encoder: Encoder, resolution: int | None) -> Encoder:
    """The same model (no second copy in memory) with images resized to ``resolution`` x
    ``resolution`` first (None: native), within the same token budget."""
    processor = replace(encoder.processor, force_resize=resolution, max_num_vistoken=None, min_num_vistoken=None)
    return replace(encoder, processor=processor, setting={**encoder.setting, "resolution": resolution})


def budget_text(encoder: Encoder) -> str:
    """The resolution rule in words, printed and saved by encode and probe."""
    s = encoder.setting
    side = int(s["max_pixels"] ** 0.5)
    native = (f"native resolution (each image at its own size, scaled down to at most "
              f"{s['max_num_vistoken']} merged tokens = {s['max_pixels']} pixels, about {side}x{side})")
    if s["resolution"] is None:
        return native
    return f"every image resized to {s['resolution']}x{s['resolution']} first, then " + native


def _resolution(value: str) -> int | None:
    if value == "native":
        return None
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--resolution must be 'native' or a size in pixels, got {value!r}")
    if size < 1:
        raise argparse.ArgumentTypeError(f"--resolution must be positive, got {size}")
    if size * size > DEFAULT_MAX_IMAGE_PIXELS:  # the resize alone would take gigabytes
        raise argparse.ArgumentTypeError(
            f"--resolution {size} makes {size * size} pixels per image, above the limit of "
            f"{DEFAULT_MAX_IMAGE_PIXELS}; use at most {math.isqrt(DEFAULT_MAX_IMAGE_PIXELS)}")
    return size


def add_budget_flags(parser) -> None:
    """--resolution and --max_num_vistoken, the same in encode and probe."""
    parser.add_argument("--resolution", type=_resolution, default=None,
                        help="'native' (default): each image at its own size within the budget; "
                             "N: every image resized to N x N first")
    parser.add_argument("--max_num_vistoken", type=positive_int, default=None,
                        help=f"pixel budget per image in merged (2x2) tokens (default {DEFAULT_EVAL_TOKENS}; "
                             "not the budget the VFM was trained with)")


def plan_batches(token_counts: list[int], budget: int) -> list[list[int]]:
    """Consecutive image indices grouped so each group's tokens stay within ``budget``; an
    image larger than the budget gets a group of its own (never dropped, never split)."""
    if budget < 1:
        raise ValueError(f"the token budget must be positive, got {budget}")
    groups: list[list[int]] = []
    used = 0
    for i, n in enumerate(token_counts):
        if groups and used + n <= budget:
            groups[-1].append(i)
            used += n
        else:
            groups.append([i])
            used = n
    return groups


def to_raster(tokens_TD: torch.Tensor, h: int, w: int, merge: int = 2) -> torch.Tensor:
    """One image's tokens from the encoder's 2x2 merge-window order to row-major order."""
    return tokens_TD[torch.argsort(merge_window_perm(h, w, merge))]


def patch_counts(encoder: Encoder, paths: list[Path | Image.Image]) -> list[int]:
    """Encoder tokens of each image, from the file headers alone (no pixel decoded)."""
    proc = encoder.processor
    counts = []
    for path in paths:
        size = (path.height, path.width) if isinstance(path, Image.Image) else image_size(path)
        height, width = proc.resized_size(*size)
        counts.append((height // proc.patch_size) * (width // proc.patch_size))
    return counts


@torch.no_grad()
def encode_files(encoder: Encoder, paths: list[Path | Image.Image], batch_tokens: int = 16384,
                 desc: str | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """-> (tokens per image, each [n_i, D] float32 in raster order; grid_N3). Image files or
    PIL images (crops of one, as a sliding window makes). A progress bar (images) is shown
    on a terminal when ``desc`` is given."""
    model, merge = encoder.model, encoder.model.config.merge_size
    tokens: list[torch.Tensor] = []
    grids: list[torch.Tensor] = []
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=None if desc else True, leave=False)
    for group in plan_batches(patch_counts(encoder, paths), batch_tokens):
        batch = encoder.processor([paths[i] for i in group], return_tensors="pt")
        grid_G3 = batch["image_grid_thw"]
        feats_TD = model(batch["pixel_values"].to(model.device, model.dtype), grid_G3.to(model.device))
        lengths = grid_G3.prod(-1).tolist()
        for (_, h, w), part in zip(grid_G3.tolist(), torch.split(feats_TD, lengths)):
            tokens.append(to_raster(part, h, w, merge).float().cpu())
        grids.append(grid_G3)
        bar.update(len(group))
    bar.close()
    return tokens, torch.cat(grids) if grids else torch.zeros(0, 3, dtype=torch.long)


def mean_pool(tokens: list[torch.Tensor]) -> torch.Tensor:
    """Mean of each image's tokens -> [N, D]."""
    return torch.stack([t.mean(0) for t in tokens])


# ----------------------------------------------------------------------------- cache


def cache_key(encoder: Encoder, paths: list[Path]) -> str:
    """Hash of what determines the features: the checkpoint (directory, config, weight
    files' size and mtime), the encoder setting, and the image files (path, size, mtime)."""
    h = hashlib.sha256(CACHE_FORMAT.encode())
    src = encoder.source.resolve()
    h.update(str(src).encode())
    for f in sorted(src.iterdir()):
        if f.suffix in (".json", ".safetensors"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(encoder.setting, sort_keys=True).encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"{Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def cached_features(encoder: Encoder, paths: list[Path], cache_dir: str | Path | None,
                    batch_tokens: int = 16384, desc: str | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``encode_files`` through a safetensors cache under ``cache_dir`` (None: no cache), so
    several probes (or reruns) share one forward pass over the same images."""
    if cache_dir is None:
        return encode_files(encoder, paths, batch_tokens, desc)
    file = Path(cache_dir) / f"features-{cache_key(encoder, paths)}.safetensors"
    if file.exists():
        stored = load_file(file)
        lengths = stored["lengths_N"].tolist()
        return list(torch.split(stored["tokens_TD"], lengths)), stored["grid_N3"]
    tokens, grid_N3 = encode_files(encoder, paths, batch_tokens, desc)
    file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(file) as tmp:  # a killed run leaves no half-written cache entry
        save_file({"tokens_TD": torch.cat(tokens).contiguous(),
                   "lengths_N": torch.tensor([len(t) for t in tokens]), "grid_N3": grid_N3},
                  tmp, metadata={"format": CACHE_FORMAT, "model": str(encoder.source),
                                 "files": json.dumps([str(p) for p in paths])})
    return tokens, grid_N3
