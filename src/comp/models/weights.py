"""Reading and writing safetensors weights of Hugging Face checkpoint directories.

One place for the file conventions (single file or sharded with an index), so every model
class loads real checkpoints the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def load_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of ``directory``'s ``model.safetensors`` (or its shards), on the CPU."""
    directory = Path(directory)
    if (directory / SINGLE_FILE).exists():
        return load_file(directory / SINGLE_FILE)
    if (directory / INDEX_FILE).exists():
        index = json.loads((directory / INDEX_FILE).read_text())
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(index["weight_map"].values())):
            state.update(load_file(directory / shard))
        return state
    raise FileNotFoundError(
        f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}; expected a Hugging Face checkpoint "
        "directory with safetensors weights (convert .bin checkpoints with transformers first)")
