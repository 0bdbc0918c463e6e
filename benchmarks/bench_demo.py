"""Wall time and peak RSS of ``comp demo --quick`` (with ``--full`` also the default demo),
each in a fresh process, against a baseline process that only imports the demo command
(``python -c "import comp.demo.run"``: Python, torch, transformers and comp): the ratios
say what the demo costs beyond starting up. The demo's own phase timings (results.json)
follow, to show where the time goes.

Peak RSS is each child's own ``ru_maxrss`` from ``os.wait4`` (the child and the processes it
waited for); ``getrusage(RUSAGE_CHILDREN)`` would keep the maximum over every child so far.

    python benchmarks/bench_demo.py [--full] [--threads 1] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(argv: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process; its output goes to ``log``."""
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-20:]
        raise SystemExit(f"{' '.join(argv)} exited with {proc.returncode}; last lines of {log}:\n"
                         + "\n".join(tail))
    return wall, usage.ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="also run the default (full) demo, ~10 minutes")
    parser.add_argument("--threads", type=int, default=1, help="the demo's --threads (default 1)")
    parser.add_argument("--keep", type=Path, default=None, help="write the demo outputs here instead of a temp dir")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        # best of 3: the import is short, so one disturbed run would skew every ratio
        baseline = min(measure([sys.executable, "-c", "import comp.demo.run"], root / "import.log")
                       for _ in range(3))
        runs = {"comp demo --quick": ["--quick"]} | ({"comp demo": []} if args.full else {})
        rows, timings = [("import comp.demo.run (baseline)", *baseline)], {}
        for name, extra in runs.items():
            out = root / name.replace(" ", "_").replace("-", "")
            argv = [sys.executable, "-m", "comp", "demo", *extra, "--out", str(out), "--threads", str(args.threads)]
            rows.append((name, *measure(argv, root / f"{out.name}.log")))
            timings[name] = json.loads((out / "results.json").read_text())["timings"]

    print(f"comp demo, each a fresh process (--threads {args.threads}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}); ratios against the baseline")
    print(f"{'':34s} {'wall s':>8s} {'peak RSS MiB':>13s} {'wall x':>7s} {'RSS x':>6s}")
    for name, wall, rss in rows:
        print(f"{name:34s} {wall:8.1f} {rss:13.0f} {wall / baseline[0]:6.1f}x {rss / baseline[1]:5.2f}x")
    walls = {name: wall for name, wall, _ in rows}
    for name, phases in timings.items():
        other = walls[name] - sum(phases.values())
        print(f"{name} phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
              + f", other (start-up, report) {other:.1f}")


if __name__ == "__main__":
    main()
