"""Samples -> a typed training batch; optional packing of several samples into one row.

``Batch.inputs`` holds what the model's forward takes: ``input_ids [B, L]`` (pad id),
``labels [B, L]`` (-100 on padding), ``attention_mask [B, L]``, ``pixel_values [T, D]`` and
``image_grid_thw [N, 3]`` of all images in token order (None without images),
``image_sample_index [N]``, ``record_ids`` (for error messages), the alignment text
``align_input_ids`` / ``align_attention_mask [S, L_t]`` and, packed, ``cu_seqlens``.
The rest of ``Batch`` is bookkeeping the trainer reads and the model never sees:
``has_image_S`` and ``skipped`` (the ``Skipped`` markers of bad samples, removed from the
batch and handed on so the main process can count them, see ``SkipStats.update``). Right
padding by default (``padding_side``).

Packing (``pack_length=N``): samples go, in order, into the first row with room for them
(first fit, rows of at most N tokens; a sample longer than N gets a row of its own). Then
``cu_seqlens`` is a list with one int32 tensor ``[S_row + 1]`` per row (sample boundaries,
the varlen-attention convention that ``packed_mrope_position_ids`` takes). Every sample
starts with ``<|im_start|>`` (label -100), so no loss term crosses a sample boundary.
Legend: B rows, L row length, S samples, T image patches, D values per patch, N images.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from comp.data.dataset import Skipped
from comp.tokens import IGNORE_INDEX


def _to(value, device, non_blocking: bool):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [v.to(device, non_blocking=non_blocking) for v in value]
    return value


@dataclass
class Batch:
    """A collated batch: the model's forward arguments (``inputs``) apart from bookkeeping.

    Not a Mapping on purpose: transformers' Trainer rebuilds Mappings key by key (dropping
    any other attribute) but hands other objects through, and accelerate moves them with
    ``.to``. Reading a key (``batch["input_ids"]``, ``"labels" in batch``) reads the model
    inputs, as the Trainer's own bookkeeping does (FLOPs, tokens seen)."""
    inputs: dict[str, Any]
    has_image_S: torch.Tensor
    skipped: list[Skipped] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return len(self.has_image_S)

    @property
    def record_ids(self) -> list:
        return self.inputs["record_ids"]

    def __len__(self) -> int:  # the Trainer refuses a batch of length 0; this one never is
        return len(self.inputs)

    def __getitem__(self, key: str):
        return self.inputs[key]

    def __contains__(self, key: object) -> bool:
        return key in self.inputs

    def keys(self):
        return self.inputs.keys()

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return replace(self, inputs={k: _to(v, device, non_blocking) for k, v in self.inputs.items()},
                       has_image_S=self.has_image_S.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """For DataLoader(pin_memory=True): pinned host copies of the model inputs."""
        return replace(self, inputs={k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                                     for k, v in self.inputs.items()})


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sample indices per row: each sample in order into the first row it fits."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        row = next((r for r, free in enumerate(room) if free >= n), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= n
    return rows


def _num_images(sample: dict) -> int:
    return 0 if sample["image_grid_thw"] is None else len(sample["image_grid_thw"])


def pad_rows(rows: list, pad_id: int, ids_key: str, mask_key: str, side: str = "right",
             min_width: int = 0) -> dict:
    """Pad 1-D id rows (tensors or lists) into ``[S, L]`` ids and mask, on the right or left
    (at least ``min_width`` wide)."""
    width = max(max((len(r) for r in rows), default=0), min_width)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[k, span] = torch.as_tensor(r, dtype=torch.long)
        mask[k, span] = 1
    return {ids_key: ids, mask_key: mask}


@dataclass
class DataCollator:
    pad_token_id: int
    pack_length: int | None = None
    padding_side: str = "right"

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.pack_length and self.padding_side == "left":
            raise ValueError("packed rows are right-padded (cu_seqlens start at 0); use padding_side='right'")

    def __call__(self, items: list) -> Batch:
        skipped = [x for x in items if isinstance(x, Skipped)]
        samples = [x for x in items if not isinstance(x, Skipped)]
        lengths = [len(s["input_ids"]) for s in samples]
        rows = first_fit(lengths, self.pack_length) if self.pack_length else [[i] for i in range(len(samples))]
        order = [i for row in rows for i in row]  # samples in token order
        width = max((sum(lengths[i] for i in row) for row in rows), default=0)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        token_sample = torch.full((len(rows), width), -1, dtype=torch.long)
        cu_seqlens = []
        for b, row in enumerate(rows):
            at = width - sum(lengths[i] for i in row) if self.padding_side == "left" else 0
            bounds = [at]
            for k, i in enumerate(row):
                n = lengths[i]
                input_ids[b, at:at + n] = samples[i]["input_ids"]
                labels[b, at:at + n] = samples[i]["labels"]
                token_sample[b, at:at + n] = k
                at += n
                bounds.append(at)
            cu_seqlens.append(torch.tensor(bounds, dtype=torch.int32))
        with_images = [samples[i] for i in order if samples[i]["pixel_values"] is not None]
        inputs = {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": (token_sample >= 0).long(),
            "pixel_values": torch.cat([s["pixel_values"] for s in with_images]) if with_images else None,
            "image_grid_thw": torch.cat([s["image_grid_thw"] for s in with_images]) if with_images else None,
            "image_sample_index": torch.repeat_interleave(
                torch.arange(len(order)),
                torch.tensor([_num_images(samples[i]) for i in order], dtype=torch.long)),
            "record_ids": [samples[i].get("record") for i in order],
        }
        if all("align_ids" in samples[i] for i in order):
            # One column at least: a batch whose answers are all empty ("") still runs the
            # alignment text pass (every rank makes the same calls); its rows are masked out.
            inputs.update(pad_rows([samples[i]["align_ids"] for i in order], self.pad_token_id,
                                   "align_input_ids", "align_attention_mask", min_width=1))
        batch = Batch(inputs, skipped=skipped,
                      has_image_S=torch.tensor([samples[i]["has_image"] for i in order], dtype=torch.bool))
        if self.pack_length:
            inputs["cu_seqlens"] = cu_seqlens
        return batch
