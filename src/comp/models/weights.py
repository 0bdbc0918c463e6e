"""Reading safetensors weights of Hugging Face checkpoint directories.

One place for the file conventions (single file or shards listed in an index), so every
model class finds real checkpoints' weights the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

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
