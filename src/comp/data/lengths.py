"""Signed sample lengths for the length-grouped sampler, computed once per data and settings.

The sampler (comp.data.sampler) needs every sample's length on every rank before step 1.
Counting a sample's visual tokens reads its images' headers, one file read per image, which
for a million-record mixture takes minutes per rank (benchmarks/bench_first_step_lengths.py),
repeated by every rank at once. Instead:

- one rank computes the lengths, with worker processes, and the other ranks receive them;
- they are cached on disk, keyed by the data files' identity (path, size, modification
  time), the records the mixture selects and every setting that changes a count, so a
  restart, a resume or the next run on the same data reads them back;
- records that ship their image size (``"width"``/``"height"`` for one image, or
  ``"image_sizes": [[width, height], ...]``) are counted without opening the image.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from comp.files import atomic_output

logger = logging.getLogger(__name__)

# Bump when the estimate changes, so caches written by older code are not read.
LENGTHS_VERSION = 1
# Below this many samples worker processes cost more than they save.
MIN_SAMPLES_PER_WORKER = 2000


def cache_root() -> Path:
    """Where CoMP caches what it computes: ``$COMP_CACHE``, else ``$XDG_CACHE_HOME/comp`` or
    ``~/.cache/comp``."""
    if os.environ.get("COMP_CACHE"):
        return Path(os.environ["COMP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "comp"


def default_cache_dir() -> Path:
    """``cache_root()/lengths``."""
    return cache_root() / "lengths"


def lengths_key(dataset) -> str:
    """Hash of everything the lengths depend on: each data file's path, size and mtime, the
    records selected from it and its image root, and the counting settings."""
    sources = []
    for source in dataset.sources:
        stat = os.stat(source.spec.json_path)
        selected = np.ascontiguousarray(source.selected, dtype=np.int64)
        sources.append([str(Path(source.spec.json_path).resolve()), stat.st_size, stat.st_mtime_ns,
                        str(source.spec.image_root), hashlib.sha256(selected.tobytes()).hexdigest()])
    settings = {"version": LENGTHS_VERSION, "sources": sources,
                "processor": dataset.image_processor.to_dict(),
                "visual_tokens_per_image": dataset.visual_tokens_per_image}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


_WORKER_DATASET = None


def _init_worker(dataset) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = dataset


def _estimate_span(span: tuple[int, int]) -> np.ndarray:
    return _WORKER_DATASET.estimate_lengths(*span)


def compute_lengths(dataset, workers: int | None = None) -> np.ndarray:
    """Signed lengths of all samples, spread over ``workers`` processes (default: the CPUs)."""
    n = len(dataset)
    workers = min(workers or os.cpu_count() or 1, max(1, n // MIN_SAMPLES_PER_WORKER))
    if workers <= 1:
        return dataset.estimate_lengths(0, n)
    bounds = np.linspace(0, n, workers * 8 + 1, dtype=np.int64)
    spans = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    # fork: the workers inherit the dataset (record indices, processor) instead of pickling it
    with ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_init_worker,
                             initargs=(dataset,)) as pool:
        return np.concatenate(list(pool.map(_estimate_span, spans)))


def cached_lengths(dataset, cache_dir: str | Path | None = None, workers: int | None = None) -> np.ndarray:
    """The lengths from ``cache_dir`` (default: default_cache_dir()) when a run with the same
    data and settings stored them, else computed and stored. ``cache_dir="none"`` never caches."""
    if isinstance(cache_dir, str) and cache_dir.lower() == "none":
        return compute_lengths(dataset, workers)
    path = Path(cache_dir or default_cache_dir()) / f"{lengths_key(dataset)}.npy"
    if path.exists():
        lengths = np.load(path)
        if lengths.shape == (len(dataset),):
            logger.info("sample lengths read from %s", path)
            return lengths
    lengths = compute_lengths(dataset, workers)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            np.save(f, lengths)
        logger.info("sample lengths of %d samples cached in %s", len(lengths), path)
    except (OSError, ValueError) as e:  # a read-only or full cache costs the next run time, not this one
        logger.warning("could not cache sample lengths in %s: %s", path.parent, e)
    return lengths


def shared_lengths(dataset, cache_dir: str | Path | None = None, workers: int | None = None) -> np.ndarray:
    """The lengths on every rank, computed (or read from the cache) by rank 0 alone and
    broadcast, so N ranks neither repeat the pass nor need a shared filesystem."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return cached_lengths(dataset, cache_dir, workers)
    box = [cached_lengths(dataset, cache_dir, workers) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
