"""Data mixtures: the reference's YAML ``datasets: [{json_path, sampling_strategy}]``.

Path resolution (documented once, used everywhere):
- ``json_path`` and a per-dataset ``image_folder``: absolute paths are kept; relative ones are
  joined to ``data_root`` when given, otherwise to the directory of the YAML file.
- Image paths inside records are joined to the *image root*: the dataset's ``image_folder``,
  else the global ``--image_folder``, else the directory of the JSON file. A path that
  resolves outside the image root (``..``, or an absolute path elsewhere) is a bad sample.

Sampling strategies: ``all``, ``first:N``, ``end:N``, ``random:N``; ``N`` may be a percentage
(``first:10%``), rounded up as the reference does. ``random`` draws from a generator seeded by
(seed, dataset position) only, so every rank selects the same subset whatever the global RNG
state; the selected indices are returned in file order (the sampler shuffles later).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

STRATEGIES = ("all", "first", "end", "random")
_STRATEGY_RE = re.compile(r"^(all)$|^(first|end|random):(\d+(?:\.\d+)?)(%?)$")


class MixtureError(ValueError):
    """A mixture file or entry the pipeline cannot use; the message names the file and entry."""


@dataclass(frozen=True)
class Strategy:
    kind: str  # one of STRATEGIES
    amount: float | None = None  # a count, or a percentage when `percent`
    percent: bool = False

    def count(self, n_records: int) -> int:
        """How many of ``n_records`` this strategy keeps (capped at n_records)."""
        if self.kind == "all":
            return n_records
        if self.percent:
            return min(n_records, math.ceil(self.amount * n_records / 100))
        return min(n_records, int(self.amount))


@dataclass(frozen=True)
class DatasetSpec:
    json_path: Path
    strategy: Strategy
    image_folder: Path | None  # None: fall back to the global image folder or the JSON's dir
    source: str  # "mixture.yaml, entry 2" for messages

    @property
    def image_root(self) -> Path:
        return self.image_folder if self.image_folder is not None else self.json_path.parent


def parse_strategy(text: str) -> Strategy:
    m = _STRATEGY_RE.match(str(text).strip())
    if not m:
        raise ValueError(f"sampling_strategy {text!r} is not one of all, first:N, end:N, random:N "
                         "(N a count or a percentage such as 10%)")
    if m.group(1):
        return Strategy("all")
    amount, percent = float(m.group(3)), bool(m.group(4))
    if percent and amount > 100:
        raise ValueError(f"sampling_strategy {text!r}: a percentage must be at most 100%")
    if not percent and amount != int(amount):
        raise ValueError(f"sampling_strategy {text!r}: a count must be a whole number")
    return Strategy(m.group(2), amount, percent)


def select_indices(strategy: Strategy, n_records: int, *, seed: int, position: int = 0) -> np.ndarray:
    """Record indices kept by ``strategy``; identical on every process for the same arguments."""
    k = strategy.count(n_records)
    if strategy.kind in ("all", "first"):
        return np.arange(k, dtype=np.int64)
    if strategy.kind == "end":
        return np.arange(n_records - k, n_records, dtype=np.int64)
    rng = np.random.default_rng([seed, position])
    return np.sort(rng.choice(n_records, size=k, replace=False)).astype(np.int64)


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def load_mixture(path: str | Path, *, data_root: str | Path | None = None,
                 image_folder: str | Path | None = None) -> list[DatasetSpec]:
    """Parse a mixture YAML, or wrap a single ``.json``/``.jsonl`` file as ``all`` of it.

    ``image_folder`` is the global fallback (the reference's ``--image_folder``)."""
    path = Path(path)
    base = Path(data_root) if data_root is not None else path.parent
    global_images = Path(image_folder) if image_folder is not None else None
    if path.suffix.lower() in (".json", ".jsonl"):
        return [DatasetSpec(path, Strategy("all"), global_images, str(path))]
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MixtureError(f"{path}: mixture file not found") from None
    except yaml.YAMLError as e:
        raise MixtureError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), list) or not doc["datasets"]:
        raise MixtureError(f"{path}: expected a mapping with a non-empty list 'datasets:' of "
                           "{json_path, sampling_strategy} entries")
    specs = []
    for i, entry in enumerate(doc["datasets"]):
        where = f"{path}, datasets entry {i}"
        if not isinstance(entry, dict) or "json_path" not in entry:
            raise MixtureError(f"{where}: expected a mapping with 'json_path', got {entry!r}")
        unknown = set(entry) - {"json_path", "sampling_strategy", "image_folder"}
        if unknown:
            raise MixtureError(f"{where}: unknown keys {sorted(unknown)} "
                               "(allowed: json_path, sampling_strategy, image_folder)")
        try:
            strategy = parse_strategy(entry.get("sampling_strategy", "all"))
        except ValueError as e:
            raise MixtureError(f"{where}: {e}") from None
        folder = entry.get("image_folder")
        specs.append(DatasetSpec(
            json_path=_resolve(str(entry["json_path"]), base),
            strategy=strategy,
            image_folder=_resolve(str(folder), base) if folder else global_images,
            source=f"{where} ({entry['json_path']})",
        ))
    return specs
