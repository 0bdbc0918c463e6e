"""What using both cores saves in the cold ``comp demo``, part by part, against the serial
baseline measured in the same process, with the load average beside every timing (other
processes on the machine slow both sides, not only one).

Parts (``--settings quick`` for seconds, ``full`` for the demo's own sizes):
- assets: the toy originals built (comp.demo.pretrain, a fresh cache each time) and then the
  demo's data (toyworld + the word prior, as comp.demo.pipeline.build_assets makes them):
  serial (``jobs=1``: SigLIP, LM, data in turn) against parallel (``jobs=2``: the SigLIP in a
  child process while this one trains the LM and writes the data, ``alongside``). The two
  builds' weights are compared byte for byte: the parallel build must not change them.
- probes: the probe cells (comp.demo.claims.probe_cell) of the toy SigLIP, digit and
  word, in turn against two child processes (comp.demo.parallel.run_parallel).
- child calls: short calls two at a time, each in a fresh child (``ChildCall``, what the
  demo's pool did before) against a ``ChildPool`` whose two workers run them in turn (one
  import of torch and transformers per worker).
- checkpointing: ``--steps`` steps of the recipe's Stage III (the demo's flags, started from
  the toy originals, one thread) with the recipe's gradient checkpointing against without it
  (what the demo runs); the two runs' weights are compared byte for byte.
- attentive: the attentive probe (comp.eval.heads.attentive_probe, the demo's epochs and
  batch) on token sets of the demo's sizes (64-704 tokens of width 64, 16 classes), its
  query pooled by ``nn.MultiheadAttention`` (every token projected: what it did before)
  against ``AttentiveProbe.pool``; the share of equal predictions is printed.
``--demo`` also times whole ``comp demo --quick`` runs (``--full``: and the default demo),
each a fresh process, against a process that only imports the demo command.

    python benchmarks/bench_demo.py [--settings quick|full] [--parts children,assets,probes,checkpointing,attentive]
                                    [--steps N] [--demo [--full]] [--keep DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


BASELINES = ("serial", "a child per call", "gradient checkpointing", "multihead attention")  # a part's row that its other rows are compared with


def load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def timed(fn):
    """(seconds, result, load average before -> after)."""
    before = load()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result, f"{before} -> {load()}"


def weights_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*.safetensors")):
        h.update(path.relative_to(directory).as_posix().encode() + path.read_bytes())
    return h.hexdigest()[:16]


def demo_plan(settings_name: str):
    """The demo's plan for ``--settings`` quick (its --quick) or full (its default)."""
    from comp.demo.pipeline import Plan, toy_plan

    return Plan(**toy_plan("default", quick=settings_name == "quick"))


def bench_assets(root: Path, settings_name: str, seed: int = 0) -> tuple[list, Path, Path]:
    from comp.demo import pretrain
    from comp.demo.pipeline import toy_settings, write_data

    plan = demo_plan(settings_name)
    settings, size = toy_settings(plan.toys), plan.toyworld
    def quiet(*_):
        pass

    rows, digests, toys = [], {}, None
    for mode, jobs in (("serial", 1), ("parallel", 2)):
        cache, data = root / mode / "cache", root / mode / "data"

        def build(jobs=jobs, cache=cache, data=data):
            if jobs == 1:
                built = pretrain.pretrained_toys(seed, settings, cache_dir=cache, log=quiet, jobs=1)
                write_data(data, seed, size, built.qwen2)
                return built
            return pretrain.pretrained_toys(seed, settings, cache_dir=cache, log=quiet, jobs=2,
                                            alongside=lambda d, data=data: write_data(data, seed, size, d / "qwen2"))

        seconds, toys, loads = timed(build)
        digests[mode] = weights_digest(toys.siglip.parent)
        rows.append((f"assets ({settings_name} toys + {size} toyworld), {mode}", seconds, loads,
                     toys.quality["seconds"]))
    same = digests["serial"] == digests["parallel"]
    print(f"weights serial vs parallel: {'identical' if same else 'DIFFERENT'} ({digests})")
    return rows, toys.siglip, root / "parallel" / "data" / "toyworld"


def bench_probes(siglip: Path, toyworld: Path, per_class: int | None) -> list:
    from comp.demo.claims import probe_cell
    from comp.demo.parallel import run_parallel

    size = json.loads((siglip / "config.json").read_text())["vision_config"]["image_size"]
    calls = [(str(siglip), str(toyworld), attribute, size) for attribute in ("digit", "word")]
    kwargs = {"per_class": per_class, "attentive": True}
    seconds, serial, loads = timed(lambda: [probe_cell(*c, **kwargs) for c in calls])
    rows = [("reading probes (digit, word), serial", seconds, loads, None)]
    seconds, parallel, loads = timed(lambda: run_parallel("comp.demo.claims:probe_cell", calls, jobs=2,
                                                          kwargs=kwargs))
    rows.append(("reading probes (digit, word), parallel", seconds, loads, None))
    same = serial == parallel
    print(f"reading probe rows serial vs parallel: {'identical' if same else 'DIFFERENT'}")
    for row in (r for part in parallel for r in part):
        print(f"  {row['attribute']:5s} {row['setting']:14s} linear {row['linear']['mean']:.3f} "
              f"attentive {row['attentive']['mean']:.3f} (chance {row['chance']:.3f}, {row['n_val']} val)")
    return rows


def bench_child_calls(calls: int = 8) -> list:
    from comp.demo.parallel import ChildCall, run_parallel

    function, args = "comp.demo.claims:mean_pairwise_bow_cos", (["red star", "red ring"],)

    def fresh_children(work: Path) -> list:
        results = []
        for first in range(0, calls, 2):
            children = [ChildCall(work / f"call-{i}", function, *args, threads=1) for i in (first, first + 1)]
            results += [child.result() for child in children]
        return results

    with tempfile.TemporaryDirectory(prefix="bench_children_") as work:
        seconds, fresh, loads = timed(lambda: fresh_children(Path(work)))
    rows = [(f"{calls} short child calls, 2 at a time, a child per call", seconds, loads, None)]
    seconds, pooled, loads = timed(lambda: run_parallel(function, [args] * calls, jobs=2))
    rows.append((f"{calls} short child calls, 2 at a time, pool workers", seconds, loads, None))
    print(f"child call results fresh vs pooled: {'identical' if fresh == pooled else 'DIFFERENT'}")
    return rows


def bench_checkpointing(root: Path, settings_name: str, steps: int, seed: int = 0) -> list:
    from comp.demo.pipeline import build_assets, step_argvs
    from comp.train.args import parse_args
    from comp.train.run import train

    os.environ.setdefault("COMP_CACHE", str(root / "checkpointing-cache"))  # toys already built: reused
    plan = demo_plan(settings_name)
    assets = build_assets(seed, plan, log=lambda *_: None)
    argv = step_argvs(assets, root / "checkpointing", plan, seed)["stage3"]
    start = argv.index("--model_name_or_path")
    argv[start:start + 2] = ["--model_name_or_path", str(assets.llm), "--custom_visual_model", str(assets.vision)]
    argv[argv.index("--max_steps") + 1] = str(steps)
    rows, digests = [], {}
    for mode, flag in (("gradient checkpointing", "True"), ("no checkpointing", "False")):
        run = list(argv)
        run[run.index("--gradient_checkpointing") + 1] = flag
        out = root / "checkpointing" / flag
        run[run.index("--output_dir") + 1] = str(out)
        seconds, _, loads = timed(lambda run=run: train(*parse_args(run)))
        digests[mode] = weights_digest(out)
        rows.append((f"Stage III from the originals, {steps} steps, {mode}", seconds, loads, None))
    same = len(set(digests.values())) == 1
    print(f"weights with vs without checkpointing: {'identical' if same else 'DIFFERENT'} ({digests})")
    return rows


def bench_attentive(images: int = 256, classes: int = 16, epochs: int = 20, seed: int = 0) -> list:
    from unittest import mock

    import torch
    from comp.eval import heads

    class ModulePool(heads.AttentiveProbe):
        def pool(self, x_BLD, valid_BL):
            q_B1D = self.query_1D.expand(len(x_BLD), 1, -1)
            return self.attn(q_B1D, x_BLD, x_BLD, key_padding_mask=~valid_BL, need_weights=False)[0][:, 0]

    gen = torch.Generator().manual_seed(seed)
    lengths = (64 * torch.randint(1, 12, (2 * images,), generator=gen)).tolist()
    tokens = [torch.randn(n, 64, generator=gen) for n in lengths]
    labels = torch.randint(classes, (images,), generator=gen)
    settings = heads.TrainSettings(epochs=epochs, lr=1e-3, wd=0.0, batch_size=32, seed=seed)

    def run():
        return heads.attentive_probe(tokens[:images], labels, tokens[images:], classes, settings)

    rows, preds = [], {}
    for mode in ("multihead attention", "one-query pooling"):
        with mock.patch.object(heads, "AttentiveProbe", ModulePool if mode == "multihead attention"
                               else heads.AttentiveProbe):
            seconds, preds[mode], loads = timed(run)
        rows.append((f"attentive probe, {images} images, {epochs} epochs, {mode}", seconds, loads, None))
    same = float((preds["multihead attention"] == preds["one-query pooling"]).float().mean())
    print(f"attentive probe predictions equal in {same:.1%} of {images} images")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", choices=("quick", "full"), default="quick")
    parser.add_argument("--per_class", type=int, default=None,
                        help="probe images per class and split (default: all of the toyworld size)")
    parser.add_argument("--parts", default="children,assets,probes",
                        help="comma-separated parts to time: children, assets, probes (probes need assets), "
                             "checkpointing, attentive")
    parser.add_argument("--steps", type=int, default=100, help="Stage III steps of the checkpointing part")
    parser.add_argument("--demo", action="store_true", help="also time whole `comp demo --quick` processes")
    parser.add_argument("--full", action="store_true", help="with --demo: also the default demo (~10 min)")
    parser.add_argument("--keep", type=Path, default=None, help="write outputs here instead of a temp dir")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # as comp demo's default --threads
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        parts = set(args.parts.split(","))
        rows = bench_child_calls() if "children" in parts else []
        if parts & {"assets", "probes"}:
            more, siglip, toyworld = bench_assets(root, args.settings)
            rows += more
            if "probes" in parts:
                rows += bench_probes(siglip, toyworld, args.per_class)
        if "checkpointing" in parts:
            rows += bench_checkpointing(root, args.settings, args.steps)
        if "attentive" in parts:
            rows += bench_attentive()
        if args.demo:
            rows += bench_demo(root, args.full)
    print(f"{os.cpu_count()} cores; torch threads 1 per process; load average (1/5/15 min) before -> after")
    print(f"{'part':58s} {'seconds':>8s} {'vs base':>9s}  load")
    serial = {}
    for name, seconds, loads, detail in rows:
        part, _, mode = name.rpartition(", ")
        if mode in BASELINES:
            serial[part] = seconds
        ratio = f"{seconds / serial[part]:.2f}x" if part in serial else "-"
        print(f"{name:58s} {seconds:8.1f} {ratio:>9s}  {loads}" + (f"  {detail}" if detail else ""))


def measure(argv: list[str], log: Path) -> float:
    """Wall seconds of one child process; its output goes to ``log``."""
    with open(log, "w") as out:
        start = time.perf_counter()
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        tail = log.read_text().splitlines()[-20:]
        raise SystemExit(f"{' '.join(argv)} exited with {done.returncode}; last lines of {log}:\n" + "\n".join(tail))
    return time.perf_counter() - start


def bench_demo(root: Path, full: bool) -> list:
    """Whole demos in fresh processes (cold: their own COMP_CACHE), against an import-only one."""
    rows = []
    seconds, _, loads = timed(lambda: measure([sys.executable, "-c", "import comp.demo.run"], root / "import.log"))
    rows.append(("import comp.demo.run", seconds, loads, None))
    for name, extra in {"comp demo --quick": ["--quick"], **({"comp demo": []} if full else {})}.items():
        out = root / name.replace(" ", "_").replace("-", "")
        env_cache = root / f"{out.name}-cache"
        argv = [sys.executable, "-m", "comp", "demo", *extra, "--out", str(out)]
        os.environ["COMP_CACHE"] = str(env_cache)
        seconds, _, loads = timed(lambda argv=argv, log=root / f"{out.name}.log": measure(argv, log))
        phases = json.loads((out / "results.json").read_text())["timings"]
        rows.append((f"{name} (cold)", seconds, loads, {k: round(v) for k, v in phases.items()}))
    return rows


if __name__ == "__main__":
    main()
