"""Frozen encoder features of image files: token-budget batching, raster order, disk cache.

Shared by ``comp encode`` and ``comp probe``: every image goes through the encoder once at
its native resolution (or a fixed square one), images packed into batches by a token budget;
the caller gets each image's token features in raster order (``tokens.view(h, w, D)`` is the
patch grid) and their mean.

Shape legend: N images, T patch tokens of all images, n_i tokens of image i, D encoder
width, h x w an image's patch grid.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from comp.data.image import CompImageProcessor, image_size
from comp.models.vision.model import CompVisionModel
from comp.models.vision.packing import merge_window_perm

CACHE_FORMAT = "comp-features/1"


@dataclass
class Encoder:
    """A frozen encoder with the image preprocessing it was trained with."""

    model: CompVisionModel
    processor: CompImageProcessor
    source: Path  # the checkpoint directory
    setting: dict  # what changes the features besides the weights: rope, resolution, budget


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_encoder(vfm_dir: str | Path, *, use_rope: bool | None = None, resolution: int | None = None,
                 max_num_vistoken: int | None = None, device: str | None = None,
                 pos_order: str | None = None) -> Encoder:
    """An HF SigLIP / DINOv2 / AIMv2 or CoMP-VFM directory as a frozen per-token encoder.

    ``resolution`` N resizes every image to N x N first (``force_resize``); None keeps the
    native size inside the ``max_num_vistoken`` budget (merged tokens, the processor's default
    when None). A merger stored in the directory is dropped: probes read the encoder itself.
    ``device`` None: CUDA when available. ``pos_order`` None: the directory's (raster for a
    detected reference-trained encoder). Features always come back as float32 on the CPU.
    """
    vfm_dir = Path(vfm_dir)
    overrides = {} if pos_order is None else {"pos_order": pos_order}
    model = CompVisionModel.from_pretrained(vfm_dir, use_rope=use_rope, w_merger=0, **overrides)
    model.requires_grad_(False).to(device or default_device())
    kwargs = {"force_resize": resolution}
    if max_num_vistoken is not None:
        kwargs["max_num_vistoken"] = max_num_vistoken
    processor = CompImageProcessor.from_pretrained(vfm_dir, **kwargs)
    setting = {"use_rope": bool(model.config.use_rope), "pos_order": model.config.pos_order,
               "resolution": resolution,
               "min_pixels": processor.min_pixels, "max_pixels": processor.max_pixels}
    return Encoder(model, processor, vfm_dir, setting)


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


def patch_counts(encoder: Encoder, paths: list[Path]) -> list[int]:
    """Encoder tokens of each image, from the file headers alone (no pixel decoded)."""
    proc = encoder.processor
    counts = []
    for path in paths:
        height, width = proc.resized_size(*image_size(path))
        counts.append((height // proc.patch_size) * (width // proc.patch_size))
    return counts


@torch.no_grad()
def encode_files(encoder: Encoder, paths: list[Path],
                 batch_tokens: int = 16384) -> tuple[list[torch.Tensor], torch.Tensor]:
    """-> (tokens per image, each [n_i, D] float32 in raster order; grid_N3)."""
    model, merge = encoder.model, encoder.model.config.merge_size
    tokens: list[torch.Tensor] = []
    grids: list[torch.Tensor] = []
    for group in plan_batches(patch_counts(encoder, paths), batch_tokens):
        batch = encoder.processor([paths[i] for i in group], return_tensors="pt")
        grid_G3 = batch["image_grid_thw"]
        feats_TD = model(batch["pixel_values"].to(model.device, model.dtype), grid_G3.to(model.device))
        lengths = grid_G3.prod(-1).tolist()
        for (_, h, w), part in zip(grid_G3.tolist(), torch.split(feats_TD, lengths)):
            tokens.append(to_raster(part, h, w, merge).float().cpu())
        grids.append(grid_G3)
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
                    batch_tokens: int = 16384) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``encode_files`` through a safetensors cache under ``cache_dir`` (None: no cache), so
    several probes (or reruns) share one forward pass over the same images."""
    if cache_dir is None:
        return encode_files(encoder, paths, batch_tokens)
    file = Path(cache_dir) / f"features-{cache_key(encoder, paths)}.safetensors"
    if file.exists():
        stored = load_file(file)
        lengths = stored["lengths_N"].tolist()
        return list(torch.split(stored["tokens_TD"], lengths)), stored["grid_N3"]
    tokens, grid_N3 = encode_files(encoder, paths, batch_tokens)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    save_file({"tokens_TD": torch.cat(tokens).contiguous(),
               "lengths_N": torch.tensor([len(t) for t in tokens]), "grid_N3": grid_N3},
              tmp, metadata={"format": CACHE_FORMAT, "model": str(encoder.source),
                             "files": json.dumps([str(p) for p in paths])})
    tmp.replace(file)  # atomic: a killed run leaves no half-written cache entry
    return tokens, grid_N3
