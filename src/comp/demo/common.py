"""What several demo modules use: statistics over seeds, the per-class subset of an image
folder, and a phase's log capture and timing. A leaf of comp.demo (it imports no other demo
module), so run -> pipeline -> common and report / summary -> common import one way."""
from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (std 0 for one seed)."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def seed_stats(values: Sequence[float]) -> dict:
    """What results.json keeps of a per-seed measurement: mean, std and the values."""
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "values": list(values)}


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` items."""
    return math.sqrt(max(p * (1 - p), 0.0) / max(1, n))


def per_class_subset(paths: list[Path], labels: list[int], limit: int | None) -> tuple[list[Path], list[int]]:
    """The first ``limit`` images of each class (all when None), order kept."""
    if limit is None:
        return paths, labels
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels):
        seen[y] = seen.get(y, 0) + 1
        if seen[y] <= limit:
            keep.append(i)
    return [paths[i] for i in keep], [labels[i] for i in keep]


@contextlib.contextmanager
def captured(log_file: Path, verbose: bool) -> Iterator[None]:
    """Send a phase's prints, progress bars, warnings and log records to ``log_file``."""
    if verbose:
        yield
        return
    import transformers

    log_file.parent.mkdir(parents=True, exist_ok=True)
    hf_level = transformers.logging.get_verbosity()
    ours = logging.getLogger("comp")
    level, propagate = ours.level, ours.propagate
    with open(log_file, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        handler = logging.StreamHandler(f)
        transformers.logging.set_verbosity_error()  # its handler holds the real stderr
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
        try:
            yield
        finally:
            ours.removeHandler(handler)
            ours.setLevel(level)
            ours.propagate = propagate
            transformers.logging.set_verbosity(hf_level)


@contextlib.contextmanager
def timed(plan, name: str) -> Iterator[None]:
    """Add the phase's wall time to ``plan.timings[name]``."""
    start = time.perf_counter()
    yield
    plan.timings[name] = time.perf_counter() - start
