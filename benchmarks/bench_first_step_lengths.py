"""Time to the sampler's lengths before step 1: every rank for itself vs once, shared and cached.

Writes N LLaVA records (default 1,000,000; ``--records``) over a pool of real PNG files of
mixed sizes, then starts ``--ranks`` processes (default 8, one machine) that each build the
mixture dataset as ``comp train`` does and wait at a barrier; the clock runs from the barrier
until the last rank holds every length:

- baseline (the pass before this change): every rank computes ``modality_lengths`` itself,
  one record after another, opening each image header;
- first run: ``shared_lengths`` in a gloo process group: rank 0 computes with worker
  processes (``--workers``, default the CPUs) and writes the cache, the others receive the
  array by broadcast;
- cached: the same call again; rank 0 reads the cache.

All three must give the same array (checked). Prints the seconds and the ratios to the
baseline. On a 2-core machine use ``--records 200000`` (the baseline's 8 ranks share 2 cores).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import tempfile
import time
from pathlib import Path



def write_data(root: Path, records: int, images: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    for k in range(images):
        Image.new("RGB", (rng.randint(56, 1400), rng.randint(56, 1400)), (k % 255, 80, 160)).save(
            root / "images" / f"{k:05d}.png")
    path = root / "data.jsonl"
    with open(path, "w") as f:
        for i in range(records):
            answer = "word " * rng.randint(5, 200)
            if i % 10 == 9:  # some text-only records, as in the Stage II/III mixtures
                record = {"id": i, "conversations": [{"from": "human", "value": "Explain."},
                                                     {"from": "gpt", "value": answer}]}
            else:
                record = {"id": i, "image": f"{rng.randrange(images):05d}.png",
                          "conversations": [{"from": "human", "value": "<image>\nDescribe it."},
                                            {"from": "gpt", "value": answer}]}
            f.write(json.dumps(record) + "\n")
    return path


def build_dataset(data: Path, tokenizer_dir: Path):
    from transformers import AutoTokenizer

    from comp.data.dataset import MixtureDataset
    from comp.data.image import CompImageProcessor
    from comp.data.mixture import load_mixture

    return MixtureDataset(load_mixture(data, image_folder=data.parent / "images"),
                          AutoTokenizer.from_pretrained(tokenizer_dir),
                          CompImageProcessor(max_num_vistoken=3000), model_max_length=8000)


def rank_main(rank: int, ranks: int, mode: str, data: Path, tokenizer_dir: Path, cache: Path,
              workers: int | None, port: int, barrier, results) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dataset = build_dataset(data, tokenizer_dir)
    if mode == "baseline":
        barrier.wait()
        start = time.perf_counter()
        lengths = dataset.modality_lengths
    else:
        import torch.distributed as dist

        from comp.data.lengths import shared_lengths

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
        dist.barrier()
        start = time.perf_counter()
        lengths = shared_lengths(dataset, cache, workers)
        dist.destroy_process_group()
    results[rank] = (time.perf_counter() - start, int(lengths.sum()), len(lengths))


def measure(mode: str, args, data: Path, tokenizer_dir: Path, cache: Path, port: int) -> tuple[float, tuple]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(args.ranks), ctx.Manager().dict()
    procs = [ctx.Process(target=rank_main, args=(r, args.ranks, mode, data, tokenizer_dir, cache,
                                                   args.workers, port, barrier, results))
             for r in range(args.ranks)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs) or len(results) != args.ranks:
        raise SystemExit(f"{mode}: a rank failed")
    signatures = {v[1:] for v in results.values()}
    if len(signatures) != 1:
        raise SystemExit(f"{mode}: ranks disagree on the lengths: {signatures}")
    return max(v[0] for v in results.values()), signatures.pop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--images", type=int, default=2000, help="distinct image files the records point to")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="rank 0's worker processes (default: CPUs)")
    args = parser.parse_args()

    from comp.models.tiny import write_tiny
    from comp.data.index import RecordIndex

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        data = write_data(root / "data", args.records, args.images)
        tokenizer_dir = write_tiny(root / "qwen2", "qwen2", seed=0)
        print(f"{args.records:,} records over {args.images:,} PNG files written in {time.perf_counter() - t:.1f} s; "
              f"{args.ranks} ranks, {os.cpu_count()} CPUs, rank 0 workers: {args.workers or os.cpu_count()}")
        t = time.perf_counter()
        RecordIndex(data)
        print(f"(record index, built by every mode alike and not timed: {time.perf_counter() - t:.1f} s per rank)")
        base, sig_b = measure("baseline", args, data, tokenizer_dir, root / "cache", 29400 + os.getpid() % 500)
        first, sig_f = measure("shared", args, data, tokenizer_dir, root / "cache", 29900 + os.getpid() % 500)
        cached, sig_c = measure("shared", args, data, tokenizer_dir, root / "cache", 30400 + os.getpid() % 500)
        if not sig_b == sig_f == sig_c:
            raise SystemExit(f"lengths differ: {sig_b} {sig_f} {sig_c}")
        print(f"{'every rank for itself (baseline)':<36}{base:>9.1f} s")
        print(f"{'shared, first run':<36}{first:>9.1f} s   baseline / this = {base / first:.1f}x")
        print(f"{'shared, cached':<36}{cached:>9.1f} s   baseline / this = {base / cached:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
