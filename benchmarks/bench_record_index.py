"""Peak memory of the record index vs parsing the whole file, each in a fresh subprocess.

Writes N LLaVA-style records (default 200k; ``--records 1000000`` for the 1M figure, ``--quick``
for 50k) as JSONL and as a JSON array, then measures in separate processes:
- ``RecordIndex`` over the JSONL and over the JSON array (offsets only; records parsed on demand),
- the baseline: ``json.load`` of the JSON array, and ``json.loads`` of every JSONL line.
Peak RSS (ru_maxrss) is printed absolute and above the process's RSS after imports, with
the RSS still held once the structure is built (what every dataloader worker inherits);
the ratios compare the peak increments and the held memory.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
which, path = sys.argv[1], sys.argv[2]
if which.startswith("index"):
    from comp.data.index import RecordIndex
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
base = rss_mb()
t = time.perf_counter()
if which.startswith("index"):
    obj = RecordIndex(path)
    n = len(obj)
    assert obj.load(n - 1)["id"] == f"rec-{n - 1}"
elif which == "json.load":
    with open(path) as f:
        obj = json.load(f)
    n = len(obj)
else:
    with open(path) as f:
        obj = [json.loads(line) for line in f]
    n = len(obj)
dt = time.perf_counter() - t
import gc; gc.collect()
held = rss_mb() - base
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"records": n, "base_mb": base, "peak_mb": peak, "seconds": dt, "held_mb": held}))
"""

WORDS = "the a red green blue circle square star left right top bottom small large image shows".split()


def write_data(directory: Path, n: int) -> tuple[Path, Path]:
    rng = random.Random(0)
    jsonl, array = directory / "data.jsonl", directory / "data.json"
    with open(jsonl, "w") as fl, open(array, "w") as fa:
        fa.write("[\n")
        for i in range(n):
            record = {"id": f"rec-{i}", "image": f"images/{i % 1000:04d}/{i}.jpg", "conversations": [
                {"from": "human", "value": "<image>\n" + " ".join(rng.choices(WORDS, k=8)) + "?"},
                {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(20, 60))) + "."}]}
            line = json.dumps(record)
            fl.write(line + "\n")
            fa.write(line + (",\n" if i < n - 1 else "\n"))
        fa.write("]\n")
    return jsonl, array


def measure(which: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(path)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--quick", action="store_true", help="50k records")
    args = p.parse_args(argv)
    n = 50_000 if args.quick else args.records
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        jsonl, array = write_data(Path(tmp), n)
        print(f"{n} records: JSONL {jsonl.stat().st_size / 2**20:.0f} MB, JSON array "
              f"{array.stat().st_size / 2**20:.0f} MB (written in {time.perf_counter() - t:.1f} s)")
        results = {
            "RecordIndex(JSONL)": measure("index-jsonl", jsonl),
            "RecordIndex(JSON array)": measure("index-json", array),
            "json.load(JSON array)": measure("json.load", array),
            "json.loads per JSONL line": measure("jsonl-loads", jsonl),
        }
    for name, r in results.items():
        assert r["records"] == n, (name, r)
        print(f"{name:>26}: peak RSS {r['peak_mb']:7.1f} MB, +{r['peak_mb'] - r['base_mb']:7.1f} MB over "
              f"imports, held afterwards +{r['held_mb']:7.1f} MB, {r['seconds']:6.2f} s")
    inc = {k: r["peak_mb"] - r["base_mb"] for k, r in results.items()}
    print(f"ratio json.load / RecordIndex(JSONL), increments: "
          f"{inc['json.load(JSON array)'] / inc['RecordIndex(JSONL)']:.1f}x; "
          f"json.load / RecordIndex(JSON array): {inc['json.load(JSON array)'] / inc['RecordIndex(JSON array)']:.1f}x; "
          f"absolute peaks: {results['json.load(JSON array)']['peak_mb'] / results['RecordIndex(JSONL)']['peak_mb']:.1f}x")
    held = {k: max(r["held_mb"], 0.1) for k, r in results.items()}
    print(f"ratio of memory held after building, json.load / RecordIndex(JSONL): "
          f"{held['json.load(JSON array)'] / held['RecordIndex(JSONL)']:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
