"""The reference's ``group_by_modality_length`` sampler (LLaVA's length-grouped sampler).

Lengths are signed: positive for samples with images, negative for text-only ones. Each
modality is shuffled, cut into megabatches of ``world_size * batch_size`` samples, each
megabatch sorted by length (longest first) and dealt to ``world_size`` per-rank batches of
similar total length. The megabatches of both modalities are then shuffled together; the
two incomplete tails form one last megabatch. So a batch never mixes modalities (except in
that tail) and holds samples of similar length.

Ranks and accumulation steps: an optimizer step consumes ``world_size * grad_accum_steps``
per-device batches, dealt round-robin to ranks by the distributed loader (batch k goes to
rank k mod world_size, micro-step k div world_size). As the reference, the sampler therefore
groups with batch = the per-device batch and world = ranks x accumulation steps: every
micro-batch of every rank gets one length-balanced chunk of the step's megabatch. (Grouping
with batch = per-device x accumulation and world = ranks gives the same per-step sample sets
but puts a chunk's pieces on different ranks, so the ranks' token counts drift apart;
benchmarks/bench_sampler_balance.py measures both, docs/results/measurements.md.)

Unlike the reference, which shuffles the modalities with the global RNG, every random draw
here comes from a generator seeded by (seed, epoch): every rank computes the same order, and
an epoch is reproducible. The sampler yields the global order; the distributed data loader
(accelerate, as in the HF Trainer) gives each rank its share of every megabatch.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


def split_to_even_chunks(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Deal indices (longest first) to the chunk with the smallest total, each chunk holding
    ``len(indices) / num_chunks`` of them."""
    if len(indices) % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0] * num_chunks
    for i in indices:
        open_chunks = [c for c in range(num_chunks) if len(chunks[c]) < per_chunk]
        c = min(open_chunks, key=totals.__getitem__)
        chunks[c].append(i)
        totals[c] += lengths[i]
    return chunks


def length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                           rng: np.random.Generator) -> list[int]:
    """Shuffle, cut into megabatches, sort each by length and split it evenly across ranks."""
    perm = rng.permutation(len(lengths)).tolist()
    size = world_size * batch_size
    out: list[int] = []
    for start in range(0, len(perm), size):
        mega = sorted(perm[start:start + size], key=lambda i: lengths[i], reverse=True)
        for chunk in split_to_even_chunks(mega, lengths, world_size):
            out += chunk
    return out


def modality_length_grouped_indices(lengths: Sequence[int], batch_size: int, world_size: int,
                                    rng: np.random.Generator) -> list[int]:
    lengths = [int(n) for n in lengths]
    if any(n == 0 for n in lengths):
        raise ValueError("lengths must be non-zero (positive: with image, negative: text only)")
    mm = [i for i, n in enumerate(lengths) if n > 0]
    lang = [i for i, n in enumerate(lengths) if n < 0]
    if not mm or not lang:
        return length_grouped_indices([abs(n) for n in lengths], batch_size, world_size, rng)
    size = world_size * batch_size
    megabatches: list[list[int]] = []
    tails: list[int] = []
    for group in (mm, lang):
        order = [group[i] for i in length_grouped_indices([abs(lengths[i]) for i in group],
                                                          batch_size, world_size, rng)]
        chunks = [order[i:i + size] for i in range(0, len(order), size)]
        megabatches += chunks[:-1]
        tails += chunks[-1]
    megabatches = [megabatches[k] for k in rng.permutation(len(megabatches))]
    if tails:
        megabatches.append(sorted(tails))
    return [i for mega in megabatches for i in mega]


class ModalityLengthGroupedSampler(Sampler[int]):
    """Deterministic for (seed, epoch); call ``set_epoch`` each epoch."""

    def __init__(self, modality_lengths: Sequence[int], batch_size: int, *, world_size: int = 1,
                 grad_accum_steps: int = 1, seed: int = 0, group_by_modality: bool = True):
        """``batch_size``: per device; ``world_size``: processes; each micro-batch of an
        optimizer step (``world_size * grad_accum_steps`` of them) gets one balanced chunk."""
        self.modality_lengths = list(modality_lengths)
        self.batch_size, self.world_size = batch_size, world_size * grad_accum_steps
        self.seed, self.epoch = seed, 0
        self.group_by_modality = group_by_modality

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.modality_lengths)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.group_by_modality:
            order = modality_length_grouped_indices(self.modality_lengths, self.batch_size,
                                                    self.world_size, rng)
        else:
            order = length_grouped_indices([abs(n) for n in self.modality_lengths],
                                           self.batch_size, self.world_size, rng)
        return iter(order)
