"""Dataloader samples/s on toyworld Stage II data with 2 workers vs 0, and where a sample's time goes.

The training data path as ``comp train`` builds it: ``MixtureDataset`` over the Stage II
mixture (dense captions + OCR transcripts) with the real ``CompProcessor`` of a tiny SigLIP +
tiny Qwen2 pair, ``DataCollator``, torch ``DataLoader``. Both loaders read the same samples,
passes interleaved, best of ``--rounds`` (the CPUs here are shared; the best pass is the least
disturbed). Wall time includes starting the workers; "steady" leaves out the first batch;
CPU time (all processes) shows what the workers cost on top of the work itself.

A separate single-process pass times each phase of a sample as ``MixtureDataset`` runs it
(record read + parse, image decode with ``load_image``, the image processor, tokens + labels
and the alignment text, collate) and checks that the phases compose to exactly
``dataset[i]``, so the split accounts for the real work and nothing else.

Processor settings default to Stage II-b's (max 3000 visual tokens, model_max_length 8000, no
force_resize): toyworld images (56..448 px a side) keep their native size.

    python benchmarks/bench_dataloader.py            # writes toyworld (small) to a temp dir, < 1 min
    python benchmarks/bench_dataloader.py --quick
    python benchmarks/bench_dataloader.py --toyworld DIR --size medium --rounds 5 --batch-size 16
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from comp.data.collator import DataCollator
from comp.data.conversation import encode_conversation
from comp.data.dataset import MixtureDataset, Skipped, locate_image, open_image
from comp.data.processor import CompProcessor
from comp.data.toyworld import write_toyworld
from comp.models.tiny import write_tiny

PHASES = ("read + parse", "image decode", "processor", "tokens + labels", "collate")


class PhaseClock:
    """Wall and CPU seconds per named phase, summed over calls. On a shared machine CPU time
    is the steadier measure (the phases are single-threaded); wall time is the plain one."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        start, cpu = time.perf_counter(), time.process_time()
        yield
        self.seconds[phase] += time.perf_counter() - start
        self.cpu[phase] += time.process_time() - cpu


def sample_in_phases(ds: MixtureDataset, i: int, clock: PhaseClock) -> dict:
    """``ds[i]`` step by step, as ``MixtureDataset.__getitem__`` / ``_encode`` run it."""
    source, r = ds.locate(i)
    with clock("read + parse"):
        record = source.record(r)
        paths = [locate_image(source.spec.image_root, p) for p in record.images]
    with clock("image decode"):
        images = [open_image(p, ds.load_image) for p in paths]
    sample: dict = {"pixel_values": None, "image_grid_thw": None, "has_image": bool(images)}
    counts: list[int] = []
    if images:
        with clock("processor"):
            vision = ds.image_processor(images, return_tensors="pt")
        grid_N3 = vision["image_grid_thw"]
        counts = (grid_N3.prod(-1) // ds.image_processor.merge_size ** 2).tolist()
        sample["pixel_values"], sample["image_grid_thw"] = vision["pixel_values"], grid_N3
    with clock("tokens + labels"):
        sample["input_ids"], sample["labels"] = encode_conversation(
            ds.tokenizer, record.messages, counts, max_length=ds.model_max_length)
        sample["align_ids"] = ds.alignment_text_ids(record, i)
    return sample


def check_same(composed: dict, reference: dict, i: int) -> None:
    for key, value in reference.items():
        other = composed[key]
        same = (other is None if value is None else
                torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value)
        if not same:
            raise SystemExit(f"sample {i}: the phase-by-phase {key} differs from dataset[{i}]")


def phase_split(ds: MixtureDataset, collator: DataCollator, indices: list[int],
                batch_size: int) -> tuple[PhaseClock, float, int]:
    """(the phase clock, wall seconds of the same samples through ``dataset[i]`` + collate,
    samples) over one single-process pass; every composed sample is checked against ``ds[i]``."""
    clock = PhaseClock()
    samples, direct = [], 0.0
    for i in indices:
        composed = sample_in_phases(ds, i, clock)
        start = time.perf_counter()
        reference = ds[i]
        direct += time.perf_counter() - start
        if isinstance(reference, Skipped):
            raise SystemExit(f"toyworld sample {i} was skipped ({reference}); the data is broken")
        check_same(composed, reference, i)
        samples.append(reference)
    for start in range(0, len(samples), batch_size):
        with clock("collate"):
            collator(samples[start:start + batch_size])
    direct += clock.seconds["collate"]
    return clock, direct, len(samples)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished (reaped) children, i.e. the workers."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def loader_pass(ds: MixtureDataset, collator: DataCollator, indices: list[int], batch_size: int,
                workers: int) -> tuple[float, float, float, int]:
    """(wall seconds of the whole pass, wall seconds after the first batch, CPU seconds of all
    processes, samples delivered). The workers exit (and are reaped) when the pass ends."""
    start, cpu = time.perf_counter(), cpu_seconds()
    loader = DataLoader(ds, batch_size=batch_size, sampler=indices, num_workers=workers,
                        collate_fn=collator)
    first, delivered = None, 0
    for batch in loader:
        delivered += batch.num_samples + len(batch.skipped)
        if first is None:
            first = time.perf_counter()
    del loader, batch
    end = time.perf_counter()
    return end - start, end - first, cpu_seconds() - cpu, delivered


def prepare(root: Path, size: str) -> tuple[Path, Path, Path]:
    """Tiny Qwen2 + SigLIP checkpoints and toyworld under ``root`` (reused when present)."""
    qwen2, siglip, world = root / "qwen2", root / "siglip", root / "toyworld"
    if not (qwen2 / "config.json").exists():
        write_tiny(qwen2, "qwen2")
    if not (siglip / "config.json").exists():
        write_tiny(siglip, "siglip")
    if not (world / "stage2.yaml").exists():
        start = time.perf_counter()
        write_toyworld(world, seed=0, size=size)
        print(f"wrote toyworld ({size}) in {time.perf_counter() - start:.1f} s -> {world}")
    return qwen2, siglip, world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 round over at most 128 samples")
    parser.add_argument("--toyworld", type=Path, help="folder holding (or to receive) the assets; "
                        "default: a temporary folder")
    parser.add_argument("--size", choices=("small", "medium"), default="small")
    parser.add_argument("--samples", type=int, help="samples per pass (default: all of Stage II)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="reference Stage II per-device batch")
    parser.add_argument("--max-num-vistoken", type=int, default=3000)
    parser.add_argument("--force-resize", type=int, help="Stage II-a: 1024")
    parser.add_argument("--model-max-length", type=int, default=8000)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per loader process, the baseline included

    with tempfile.TemporaryDirectory(prefix="bench_dataloader_") as tmp:
        qwen2, siglip, world = prepare(args.toyworld or Path(tmp), args.size)
        processor = CompProcessor.from_components(
            qwen2, siglip, max_num_vistoken=args.max_num_vistoken, force_resize=args.force_resize)
        ds = MixtureDataset.from_yaml(world / "stage2.yaml", processor.tokenizer, processor.image_processor,
                                      model_max_length=args.model_max_length, seed=0)
        collator = DataCollator(pad_token_id=processor.tokenizer.pad_token_id)
        limit = 128 if args.quick and args.samples is None else args.samples
        indices = list(range(len(ds)))[:limit]
        rounds = 1 if args.quick else args.rounds
        cores = len(os.sched_getaffinity(0))
        print(f"toyworld {args.size} Stage II: {len(indices)} of {len(ds)} samples, batch {args.batch_size}, "
              f"max {args.max_num_vistoken} visual tokens, force_resize {args.force_resize}, "
              f"{cores} CPU cores visible")

        clock, direct, n = phase_split(ds, collator, indices, args.batch_size)
        wall, cpu = sum(clock.seconds.values()), sum(clock.cpu.values())
        print(f"\nper-sample phases (one process, {n} samples, each composed sample == dataset[i]):")
        print(f"{'phase':18s} {'wall ms':>8s} {'share':>7s} {'CPU ms':>8s} {'share':>7s}")
        for phase in PHASES:
            w, c = clock.seconds.get(phase, 0.0), clock.cpu.get(phase, 0.0)
            print(f"{phase:18s} {1e3 * w / n:8.3f} {w / wall:7.1%} {1e3 * c / n:8.3f} {c / cpu:7.1%}")
        print(f"{'sum':18s} {1e3 * wall / n:8.3f} {'':7s} {1e3 * cpu / n:8.3f}")
        print(f"phases sum / (dataset[i] + collate), wall: {wall / direct:.2f}")
        shares = [sum(clock_s.get(p, 0.0) for p in ("image decode", "processor")) / total
                  for clock_s, total in ((clock.seconds, wall), (clock.cpu, cpu))]
        print(f"image decode + preprocessing share of the per-sample time: {shares[0]:.1%} wall, "
              f"{shares[1]:.1%} CPU")

        best = {w: [float("inf")] * 3 + [0] for w in (0, args.workers)}
        for _ in range(rounds):
            for w in best:
                result = loader_pass(ds, collator, indices, args.batch_size, w)
                best[w] = [min(a, b) for a, b in zip(best[w][:3], result[:3])] + [result[3]]
        batches = -(-len(indices) // args.batch_size)
        print(f"\nDataLoader, best of {rounds} (steady: after the first of {batches} batches; CPU: all "
              "processes, workers included)")
        print(f"{'':24s} {'samples/s':>10s} {'steady':>9s} {'CPU ms/sample':>14s}")
        for w, (wall, steady, cpu, delivered) in best.items():
            after_first = delivered - min(args.batch_size, delivered)
            print(f"{f'{w} workers':24s} {delivered / wall:10.1f} "
                  f"{after_first / steady if steady else float('nan'):9.1f} {1e3 * cpu / delivered:14.3f}")
        (wall0, steady0, cpu0, _), (wall_w, steady_w, cpu_w, _) = best[0], best[args.workers]
        print(f"{f'ratio {args.workers} vs 0 workers':24s} {wall0 / wall_w:9.2f}x {steady0 / steady_w:8.2f}x "
              f"{cpu_w / cpu0:13.2f}x")


if __name__ == "__main__":
    main()
