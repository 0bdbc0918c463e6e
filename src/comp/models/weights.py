"""Reading safetensors weights of Hugging Face checkpoint directories.

One place for the file conventions (single file or shards listed in an index), so every
model class finds real checkpoints' weights the same way.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save_file as _save_file

from comp.errors import UserError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors file(s) of a checkpoint directory, shards in order."""
    directory = Path(directory)
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    if (directory / INDEX_FILE).exists():
        return [_shard_path(directory, shard) for shard in sorted(set(_weight_map(directory).values()))]
    raise FileNotFoundError(
        f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; expected a Hugging Face checkpoint "
        "directory with safetensors weights (convert .bin checkpoints with transformers first)")


def _weight_map(directory: Path) -> dict[str, str]:
    path = directory / INDEX_FILE
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
        return weight_map
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"the shard index cannot be read ({type(err).__name__}: {err})", path,
                        "re-save the checkpoint (save_pretrained)") from None


def _shard_path(directory: Path, shard: str) -> Path:
    """A shard named by the index, refused when it leaves the checkpoint directory."""
    root = directory.resolve()
    path = (directory / shard).resolve()
    if root not in path.parents:
        raise UserError(f"the shard index names {shard!r}, outside the checkpoint directory",
                        directory / INDEX_FILE, "index only files inside the directory")
    return directory / shard


def check_weight_files(directory: str | Path) -> list[Path]:
    """``weight_files``, each opened for its header: a truncated or corrupt file (or a shard
    index pointing outside the directory) raises UserError naming it, before any tensor is read."""
    files = weight_files(directory)
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as err:  # SafetensorError, OSError, ...
            raise UserError(f"the weight file is truncated or corrupt ({type(err).__name__}: {err})",
                            path, "re-save or re-download the checkpoint") from None
    return files


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of ``directory``'s weights (single file or shards), on the CPU."""
    state: dict[str, torch.Tensor] = {}
    for path in check_weight_files(directory):
        state.update(load_file(path))
    return state


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' ``save_file`` with the permissions of any file we write (0666 minus the
    umask; safetensors itself creates 0600 files, unreadable for the rest of a team)."""
    _save_file(tensors, path, metadata=metadata)
    normal_permissions(path)


def normal_permissions(*paths: str | Path) -> None:
    """Give files the mode a plain ``open(path, "w")`` would (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)


@contextlib.contextmanager
def no_progress_bars():
    """transformers' "Loading weights" / "Writing model shards" bars off, then as before: a bar
    per load is noise for checkpoints that load in seconds."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_hf_model(model, out: str | Path) -> None:
    """``model.save_pretrained(out)`` of a transformers model, without its bar and with
    normal permissions on the weight files."""
    with no_progress_bars():
        model.save_pretrained(out)
    normal_permissions(*Path(out).glob("*.safetensors"))
