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
import reprlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from comp.errors import UserError


STRATEGIES = ("all", "first", "end", "random")
_STRATEGY_RE = re.compile(r"^(all)$|^(first|end|random):(\d+(?:\.\d+)?)(%?)$")


# A mixture lists a few datasets: a document whose aliases expand to more nodes than this is
# refused before it is built (a few anchors nested 9 deep otherwise expand to 21 GB).
MAX_YAML_NODES = 100_000


class MixtureError(UserError):
    """A mixture file or entry the pipeline cannot use; the message names the file and entry
    (a UserError: the ``comp`` commands print it as one line)."""

    def __init__(self, message: str):
        super().__init__(message)


def _expanded_size(node, sizes: dict) -> int:
    """Nodes of ``node`` with every alias expanded (each shared node counted once per use)."""
    if id(node) not in sizes:
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
        sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def safe_load_yaml(text: str, path: Path):
    """``yaml.safe_load`` that refuses alias bombs (more than MAX_YAML_NODES expanded nodes)
    and nesting deeper than Python's recursion limit, as MixtureErrors naming ``path``."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise MixtureError(f"{path}: its aliases expand to more than {MAX_YAML_NODES} YAML nodes; "
                               "a mixture lists a few datasets: write it without nested aliases")
        return loader.construct_document(node)
    except RecursionError:
        raise MixtureError(f"{path}: nested too deeply to be a mixture") from None
    finally:
        loader.dispose()


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
        doc = safe_load_yaml(path.read_text(), path)
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
            raise MixtureError(f"{where}: expected a mapping with 'json_path', got {reprlib.repr(entry)}")
        unknown = set(entry) - {"json_path", "sampling_strategy", "image_folder"}
        if unknown:
            raise MixtureError(f"{where}: unknown keys {sorted(unknown)} "
                               "(allowed: json_path, sampling_strategy, image_folder)")
        try:
            strategy = parse_strategy(entry.get("sampling_strategy", "all"))
        except ValueError as e:
            raise MixtureError(f"{where}: {e}") from None
        folder = entry.get("image_folder")
        for key in ("json_path", "image_folder"):
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise MixtureError(f"{where}: {key} must be a path, got a {type(entry[key]).__name__} "
                                   f"({reprlib.repr(entry[key])}); write it without brackets")
        specs.append(DatasetSpec(
            json_path=_resolve(str(entry["json_path"]), base),
            strategy=strategy,
            image_folder=_resolve(str(folder), base) if folder else global_images,
            source=f"{where} ({entry['json_path']})",
        ))
    return specs
