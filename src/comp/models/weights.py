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
from safetensors.torch import load_file
from safetensors.torch import save_file as _save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors file(s) of a checkpoint directory, shards in order."""
    directory = Path(directory)
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    if (directory / INDEX_FILE).exists():
        index = json.loads((directory / INDEX_FILE).read_text())
        return [directory / shard for shard in sorted(set(index["weight_map"].values()))]
    raise FileNotFoundError(
        f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; expected a Hugging Face checkpoint "
        "directory with safetensors weights (convert .bin checkpoints with transformers first)")


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of ``directory``'s weights (single file or shards), on the CPU."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
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
