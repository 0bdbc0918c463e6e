"""The modeling files ``comp export-vfm --standalone`` ships next to a CoMP-VFM, so that plain
transformers loads it: ``AutoModel.from_pretrained(dir, trust_remote_code=True)``, no ``comp``.

The shipped set is what transformers' remote-code loader itself will copy: the two entry
modules of ``AUTO_MAP`` and everything they reach through ``from .x import y`` lines
(computed with transformers' own ``get_relative_import_files``, so it cannot drift from what
the loader needs). model.py's docstring says why loading.py, reached otherwise, stays behind.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from comp.models.weights import normal_permissions

PACKAGE_DIR = Path(__file__).resolve().parent
AUTO_MAP = {"AutoConfig": "configuration.CompVisionConfig", "AutoModel": "model.CompVisionModel"}


def shipped_files() -> list[Path]:
    """The package's modules a standalone CoMP-VFM needs, sorted by name."""
    from transformers.dynamic_module_utils import get_relative_import_files

    entries = {PACKAGE_DIR / f"{ref.split('.')[0]}.py" for ref in AUTO_MAP.values()}
    needed = set(entries)
    for entry in entries:
        needed.update(Path(f) for f in get_relative_import_files(entry))
    return sorted(needed)


def add_modeling_code(out: str | Path) -> list[Path]:
    """Copy the shipped modules into the saved CoMP-VFM ``out`` and name them in its
    config.json (``auto_map``); returns the files written."""
    out = Path(out)
    cfg_file = out / "config.json"
    config = json.loads(cfg_file.read_text())
    if config.get("model_type") != "comp_vision":
        raise ValueError(f"{cfg_file}: not a CoMP-VFM (model_type {config.get('model_type')!r})")
    written = [Path(shutil.copyfile(src, out / src.name)) for src in shipped_files()]
    config["auto_map"] = dict(AUTO_MAP)
    cfg_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    normal_permissions(*written)
    return written
