"""Image storage: extracted files (the baseline) vs uncompressed tar shards vs Hub parquet shards.

N records (default 1,000,000) of small JPEGs (a pool of 200 distinct seeded images, 64-160 px a
side, a few kB each) are stored three ways:
- files (baseline): ``images/00000/000000123.jpg``, 1000 per folder, read with ``open().read()``;
- tar: uncompressed shards of ``--shard-records`` (10,000) members, read through
  ``comp.data.storage`` (``read_member`` -> ``TarReader``: one ``pread`` per image);
- parquet: shards of the same size as the Hub writes them (columns id, image
  ``struct<bytes, path>``, conversations, data_source; 100 rows per row group, snappy), read
  through ``read_member`` -> ``ParquetReader`` (a read decodes the row group's image column).
Measured per storage, in this process, the baseline first:
- index: constructing every shard's reader cold (tar: the member index is built and cached
  under ``$COMP_CACHE``, here the workdir) and again from the cached index; for files, the
  nearest equivalent, an ``os.stat`` of every file;
- random read latency over ``--reads`` (2000) random records, mean and p95: bytes only, and
  bytes + PIL decode (``Image.open(...).convert("RGB")``); the data was just written, so all
  of it is in the page cache (warm-cache latency: what remains is the storage's own work);
- RSS: VmRSS of a fresh ``python`` (same imports for all three) after opening every reader
  (files: none to open), and the increase opening them caused;
- DataLoader samples/s: torch ``DataLoader``, ``--workers`` (2) workers, batch 32, over a
  Dataset that reads + decodes + converts to RGB a random permutation of ``--loader-records``
  (5000) records; wall time includes starting the workers; passes interleaved across the
  storages, best of ``--rounds`` (2), as the CPUs may be shared.
Ratios are storage / files (latency, index time, RSS: >1 is worse; samples/s: >1 is better).

Then ``comp data prepare``'s throughput on those parquet shards, served as a Hub dataset from
an offline cache (records/s, image MB/s, shards layout: every image checked and re-packed
into tar shards), against its baseline: pyarrow reading the same shards' rows alone.

    python benchmarks/bench_storage.py --records 20000          # ~1 min here, 250 MB of scratch
    python benchmarks/bench_storage.py --workdir /scratch/bs --keep   # 1M records, ~13 GB
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from comp.data.storage import ImageLocation, ParquetReader, TarReader, read_member

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TURNS_TYPE = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
PER_FOLDER = 1000
ROW_GROUP = 100


def image_pool(n: int = 200, seed: int = 0) -> list[bytes]:
    """Seeded photo-like JPEGs: smooth colour fields plus grain, 64-160 px a side."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(n):
        w, h = (int(v) for v in rng.integers(64, 161, size=2))
        coarse = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(pixels + rng.normal(0, 6, size=pixels.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=85)
        pool.append(buf.getvalue())
    return pool


def name(i: int) -> str:
    return f"{i:09d}.jpg"


def write_files(root: Path, n: int, pool: list[bytes]) -> list[str]:
    paths = []
    for i in range(n):
        folder = root / "images" / f"{i // PER_FOLDER:05d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / name(i)
        path.write_bytes(pool[i % len(pool)])
        paths.append(str(path))
    return paths


def write_tars(root: Path, n: int, pool: list[bytes], per_shard: int) -> list[ImageLocation]:
    (root / "shards").mkdir(parents=True, exist_ok=True)
    locations = []
    for s in range(0, n, per_shard):
        shard = root / "shards" / f"images-{s // per_shard:05d}.tar"
        with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(s, min(n, s + per_shard)):
                data = pool[i % len(pool)]
                info = tarfile.TarInfo(name(i))
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))
                locations.append(ImageLocation(shard, name(i)))
    return locations


def write_parquet(root: Path, n: int, pool: list[bytes], per_shard: int) -> list[ImageLocation]:
    (root / "data").mkdir(parents=True, exist_ok=True)
    shards = -(-n // per_shard)
    locations = []
    for k, s in enumerate(range(0, n, per_shard)):
        shard = root / "data" / f"train-{k:05d}-of-{shards:05d}.parquet"
        rows = range(s, min(n, s + per_shard))
        turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A photo."}]
        table = pa.table({
            "id": pa.array([f"{i:09d}" for i in rows], pa.string()),
            "image": pa.array([{"bytes": pool[i % len(pool)], "path": name(i)} for i in rows], IMAGE_TYPE),
            "conversations": pa.array([turns] * len(rows), TURNS_TYPE),
            "data_source": pa.array(["bench"] * len(rows), pa.string()),
        })
        pq.write_table(table, shard, row_group_size=ROW_GROUP)
        locations.extend(ImageLocation(shard, str(r)) for r in range(len(rows)))
    return locations


def read_bytes(item) -> bytes:
    if isinstance(item, str):
        with open(item, "rb") as f:
            return f.read()
    return read_member(item)


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


class ImageDataset(Dataset):
    def __init__(self, items: list, order: np.ndarray):
        self.items, self.order = items, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k: int):
        return decode(read_bytes(self.items[self.order[k]])).size


def count_batch(batch: list) -> int:
    return len(batch)


def latency(items: list, picks: np.ndarray, fn) -> tuple[float, float]:
    times = np.empty(len(picks))
    for k, i in enumerate(picks):
        start = time.perf_counter()
        fn(items[i])
        times[k] = time.perf_counter() - start
    return float(times.mean()), float(np.percentile(times, 95))


RSS_CHILD = r"""
import json, sys
import numpy, pyarrow.parquet, PIL.Image
from pathlib import Path
from comp.data.storage import archive_reader
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
before = rss_mb()
readers = [archive_reader(p) for p in json.loads(sys.argv[1])]
print(json.dumps({"before": before, "after": rss_mb()}))
"""


def rss_after_open(shards: list[Path], env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, json.dumps([str(s) for s in shards])],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def loader_rate(items: list, order: np.ndarray, workers: int) -> float:
    loader = DataLoader(ImageDataset(items, order), batch_size=32, num_workers=workers,
                        collate_fn=count_batch)
    start = time.perf_counter()
    seen = sum(loader)
    wall = time.perf_counter() - start
    assert seen == len(order)
    return seen / wall


def prepare_throughput(workdir: Path, parquet_shards: list[Path]) -> dict[str, float]:
    """Seconds of ``prepare_source`` over the shards as a Hub dataset (offline cache), and of
    a plain pyarrow pass over the same rows (the baseline)."""
    from huggingface_hub import constants

    from comp.data.prepare import prepare_source
    from comp.data.sources import Part, SourceSpec

    commit = "0" * 40
    snapshot = workdir / "hf-cache" / "datasets--bench--parquet" / "snapshots" / commit
    (snapshot / "data").mkdir(parents=True, exist_ok=True)
    (snapshot.parent.parent / "refs").mkdir(exist_ok=True)
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    for shard in parquet_shards:
        link = snapshot / "data" / shard.name
        if not link.exists():
            link.symlink_to(shard)
    constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = True, str(workdir / "hf-cache")
    start = time.perf_counter()
    rows = 0
    for shard in parquet_shards:
        pf = pq.ParquetFile(shard)
        for g in range(pf.metadata.num_row_groups):
            rows += len(pf.read_row_group(g).to_pylist())
    baseline = time.perf_counter() - start
    spec = SourceSpec("data/bench.json", "bench/parquet", "main", "bench", None,
                      (Part("parquet", files=("data/train-*.parquet",)),))
    start = time.perf_counter()
    row = prepare_source(spec, workdir / "prepared", "shards")
    seconds = time.perf_counter() - start
    return {"records": row["written"], "rows": rows, "image_mb": row["image_bytes"] / 1e6,
            "seconds": seconds, "baseline_seconds": baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--shard-records", type=int, default=10_000, help="images per tar / parquet shard")
    parser.add_argument("--reads", type=int, default=2000, help="random reads for the latencies")
    parser.add_argument("--loader-records", type=int, default=5000, help="records the DataLoader reads")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="DataLoader passes per storage (best kept)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, deleted)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir")
    args = parser.parse_args()
    torch.set_num_threads(1)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_storage_"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["COMP_CACHE"] = str(workdir / "comp-cache")  # the tar indexes go here
    shutil.rmtree(workdir / "comp-cache", ignore_errors=True)
    try:
        n = args.records
        pool = image_pool()
        sizes = np.array([len(b) for b in pool])
        print(f"{n} records, {len(pool)} distinct JPEGs (mean {sizes.mean() / 1e3:.1f} kB, "
              f"{sizes.min() / 1e3:.1f}-{sizes.max() / 1e3:.1f} kB), {args.shard_records} "
              f"per shard, workdir {workdir}")
        items, shards, write_s = {}, {}, {}
        for kind, write in (("files", lambda: write_files(workdir / "files", n, pool)),
                            ("tar", lambda: write_tars(workdir / "tar", n, pool, args.shard_records)),
                            ("parquet", lambda: write_parquet(workdir / "parquet", n, pool, args.shard_records))):
            start = time.perf_counter()
            items[kind] = write()
            write_s[kind] = time.perf_counter() - start
            shards[kind] = [] if kind == "files" else sorted({loc.path for loc in items[kind]})
        print("written in " + ", ".join(f"{k} {v:.1f} s" for k, v in write_s.items()))

        rng = np.random.default_rng(0)
        picks = rng.choice(n, size=min(args.reads, n), replace=False)
        order = rng.permutation(n)[:args.loader_records]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        results: dict[str, dict[str, float]] = {}
        for kind in ("files", "tar", "parquet"):
            r = results[kind] = {}
            for label in ("index, cold (s)", "index, cached (s)"):
                start = time.perf_counter()
                if kind == "files":
                    for p in items[kind]:
                        os.stat(p)
                else:
                    for s in shards[kind]:
                        (TarReader if kind == "tar" else ParquetReader)(s)
                r[label] = time.perf_counter() - start
            r["read bytes, mean (ms)"], r["read bytes, p95 (ms)"] = (
                1e3 * v for v in latency(items[kind], picks, read_bytes))
            r["read+decode, mean (ms)"], r["read+decode, p95 (ms)"] = (
                1e3 * v for v in latency(items[kind], picks, lambda it: decode(read_bytes(it))))
            rss = rss_after_open(shards[kind], env)
            r["RSS after open (MB)"] = rss["after"]
            r["RSS increase (MB)"] = rss["after"] - rss["before"]
        label = f"DataLoader {args.workers}w (samples/s)"
        for _ in range(args.rounds):  # interleaved, best of: the CPUs here are shared
            for kind in ("files", "tar", "parquet"):
                rate = loader_rate(items[kind], order, args.workers)
                results[kind][label] = max(results[kind].get(label, 0.0), rate)

        print(f"\nrandom reads: {len(picks)} records; DataLoader: {len(order)} records, "
              f"{args.workers} workers, batch 32, best of {args.rounds}; ratio = storage / files")
        print(f"{'measure':28s} {'files':>10s} {'tar':>10s} {'parquet':>10s} {'tar/files':>10s} {'pq/files':>10s}")
        for label in results["files"]:
            base = results["files"][label]
            vals = [results[k][label] for k in ("files", "tar", "parquet")]
            ratios = [f"{v / base:9.2f}x" if base > 1e-9 else f"{'-':>10s}" for v in vals[1:]]
            print(f"{label:28s} " + " ".join(f"{v:10.3f}" for v in vals) + " " + " ".join(ratios))

        p = prepare_throughput(workdir, shards["parquet"])
        print(f"\ncomp data prepare (parquet -> tar shards, one process): {p['records']} records in "
              f"{p['seconds']:.1f} s = {p['records'] / p['seconds']:.0f} records/s, "
              f"{p['image_mb'] / p['seconds']:.1f} image MB/s; pyarrow reading the same rows alone "
              f"{p['rows'] / p['baseline_seconds']:.0f} rows/s (prepare / baseline time: "
              f"{p['seconds'] / p['baseline_seconds']:.1f}x)")
    finally:
        if args.keep:
            print(f"kept {workdir}")
        elif args.workdir:  # a folder the user named: remove only what was written there
            for sub in ("files", "tar", "parquet", "comp-cache", "hf-cache", "prepared"):
                shutil.rmtree(workdir / sub, ignore_errors=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
