"""``comp study``: the paper's ablations against the full recipe on the demo's toy setup, over
seeds, with mean and spread.

Variants (each a change to every recipe step's flags, all else as ``comp demo``):
- full: the recipe as its file has it;
- C-RoPE off: ``--use_rope 0`` (absolute position interpolation only);
- alignment loss off: ``--use_alignment_loss 0``;
- word prior off: ``--word_dist_path uniform``;
- native resolution off: ``--force_resize S`` (every image S x S, the toy SigLIP's size).

Each (variant, seed) cell runs the pipeline (comp.demo.pipeline) into OUT/<variant>/seed<N>/
and writes cell.json; a cell whose cell.json exists is read back, not recomputed (resumable).
``--jobs N`` computes N cells at once in spawned worker processes, each evaluating in its own
process; every cell measures only what the study's table reads (CELL_PLAN). 3 seeds x 5 variants with
2 jobs on 2 cores: the toys of two seeds ~3-4 min, then 200-390 s a cell two at a time (the third
seed's toys beside the first cells), 39-50 min in all by machine (docs/results/study/study.md).
OUT/study.json holds every cell's metrics, OUT/study.md one table (variant x metric, mean ±
std over seeds, difference to the full recipe) and bar plots (OUT/figures).
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

# What a cell measures: what cell_metrics reads (the CoMP-VFM after training, its reading and
# dense probes, QA at native size), not the demo's before / after of the original nor its QA at
# 2x native (a fifth of a cell's evaluation; the dense probe asks the 2x question of every variant).
CELL_PLAN = dict(before=False, attributes=("digit", "word"), qa_native_2x=False)
VARIANTS = ("full", "C-RoPE off", "alignment loss off", "word prior off", "native resolution off")
DEFAULT_SEEDS = 3


def variant_flags(variant: str, image_size: int) -> tuple[dict[str, str | None], str | None]:
    """(flag overrides for every step, word prior override) of ``variant``."""
    flags = {"full": {}, "C-RoPE off": {"--use_rope": "0"},
             "alignment loss off": {"--use_alignment_loss": "0"}, "word prior off": {},
             "native resolution off": {"--force_resize": str(image_size)}}
    if variant not in flags:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return flags[variant], "uniform" if variant == "word prior off" else None


def slug(variant: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", variant.lower()).strip("-")


def cell_metrics(results: dict) -> dict[str, float]:
    """The study's metrics of one cell (a flat dict: metric -> value)."""
    out = {}
    for p in results["probes"]:
        if p["attribute"] in ("digit", "word") and p["encoder"] == "CoMP-VFM":
            out[f"{p['attribute']} attentive {p['setting']}"] = p["attentive"]["mean"]
    zs = results["word_space"]["after"]["zero_shot"]
    for d in results["dense"]:
        if d["encoder"] == "CoMP-VFM":
            out[f"mIoU {d['setting']}"] = d["miou"]["mean"]
    out["image cos after II-b"] = results["health"]["stage2b"]["image_cos"]
    out["zero-shot (mean)"] = sum(z["top1"] for z in zs.values()) / len(zs)
    out["retrieval R@1"] = results["word_space"]["after"]["retrieval"]["prototypes"]["R@1"]
    out["QA native"] = results["qa"]["native"]["accuracy"]
    out["image use (nats)"] = results["qa"]["native"]["image_use"]["difference"]
    return out


def run_cell(root: Path, variant: str, seed: int, plan, assets, say=print) -> dict:
    """One (variant, seed) cell: read back when computed already, else trained and evaluated."""
    from comp.demo.pipeline import run_pipeline

    cell_dir = root / slug(variant) / f"seed{seed}"
    done = cell_dir / "cell.json"
    if done.exists():
        say(f"{variant} seed {seed}: read back from {done}")
        return json.loads(done.read_text())
    shutil.rmtree(cell_dir, ignore_errors=True)  # a cell interrupted half-way starts again
    flags, word_dist = variant_flags(variant, assets.image_size)
    start = time.perf_counter()
    results = run_pipeline(assets, cell_dir, plan, seed, variant=flags, word_dist=word_dist,
                           say=lambda m: say(f"{variant} seed {seed}: {m}"))
    cell = {"variant": variant, "seed": seed, "metrics": cell_metrics(results),
            "seconds": time.perf_counter() - start, "results": results}
    done.write_text(json.dumps(cell, indent=1) + "\n")
    shutil.rmtree(cell_dir / "comp_1b_siglip", ignore_errors=True)  # checkpoints: disk, not results
    return cell


def cell_table(cells: list[dict]) -> dict[str, dict[str, list[float]]]:
    """variant -> metric -> its per-seed values (the input of the study table and bars)."""
    table: dict[str, dict[str, list[float]]] = {}
    for c in cells:
        for metric, value in c["metrics"].items():
            table.setdefault(c["variant"], {}).setdefault(metric, []).append(value)
    return table


IMAGE_USE = "image use (nats)"  # not an accuracy: its own bars


def write_study(out: Path, cells: list[dict], seeds: list[int]) -> Path:
    """OUT/study.md: the table (variant x metric, mean ± std over seeds, difference to the full
    recipe) and bar plots under OUT/figures."""
    from comp.demo.report import study_bars, study_table_markdown

    table = cell_table(cells)
    metrics = list(dict.fromkeys(m for row in table.values() for m in row))
    reference = "full" if "full" in table else None
    accuracy = [m for m in metrics if m != IMAGE_USE]
    study_bars(table, out / "figures" / "study.png", metrics=accuracy, ylabel="accuracy, mIoU or cosine",
               title=f"ablations, mean ± 1 std over seeds {seeds}")
    lines = ["# comp study: ablations against the full recipe", "",
             f"Seeds {seeds}; mean ± std over seeds. The CoMP-VFM's attentive probes; word space after "
             "Stage II-b; QA and image use (answer NLL wrong image - right image) after Stage III.", "",
             study_table_markdown(table, metrics=metrics, reference=reference), "",
             "![ablations](figures/study.png)", ""]
    if IMAGE_USE in metrics:
        study_bars(table, out / "figures" / "study_image_use.png", metrics=[IMAGE_USE],
                   ylabel="answer NLL, wrong - right image (nats / token)", title="image use")
        lines += ["![image use](figures/study_image_use.png)", ""]
    path = out / "study.md"
    path.write_text("\n".join(lines))
    return path


def build_parser():
    from comp.cliargs import ArgumentParser
    from comp.demo.pipeline import TOY_CHOICES

    p = ArgumentParser(prog="comp study",
                       description="The paper's ablations (C-RoPE, alignment loss, word prior, native "
                                   "resolution) against the full recipe on the demo's toy setup, over seeds; "
                                   "resumable per (variant, seed) cell.")
    p.add_argument("--out", type=Path, default=Path("comp_study"), help="output directory (default ./comp_study)")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"seeds 0..N-1 (default {DEFAULT_SEEDS})")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per recipe step")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells (and seeds' toy originals) computed at once, one process and one thread "
                        "each (default 1; the default study took 39-50 min with 2 on 2 cores)")
    p.add_switch("--quick", default=False, help="smoke-sized cells (tests)")
    p.add_argument("--toy", choices=TOY_CHOICES, default="default",
                   help="the toy originals, as comp demo's --toy (not with --quick)")
    return p


def _say(message: str) -> None:
    # the real stdout: the pipeline reports from a thread while a phase's log captures sys.stdout
    print(f"[comp study] {message}", file=sys.__stdout__, flush=True)


def _assets_job(seed: int, plan_args: dict):
    """The toy originals and toyworld of ``seed`` (a worker process, one thread)."""
    import torch

    from comp.demo.pipeline import Plan, build_assets

    torch.set_num_threads(1)
    return build_assets(seed, Plan(**plan_args), log=_say)


def _cell_job(root: Path, variant: str, seed: int, plan_args: dict, assets) -> dict:
    import torch

    from comp.demo.pipeline import Plan

    torch.set_num_threads(1)
    return run_cell(root, variant, seed, Plan(**plan_args), assets, _say)


def run_cells(root: Path, variants: list[str], seeds: list[int], plan_args: dict, jobs: int) -> list[dict]:
    """Every (seed, variant) cell, seed-major; ``jobs`` > 1 runs them in that many spawned
    worker processes. Each seed's assets are built once, and its cells are queued as soon as
    they are: a worker never waits for the other seeds' toys (with 3 seeds on 2 workers, the
    third seed's toys build beside the first seed's cells)."""
    if jobs <= 1:
        out = []
        for seed in seeds:
            assets = _assets_job(seed, plan_args)
            out += [_cell_job(root, variant, seed, plan_args, assets) for variant in variants]
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        building = {pool.submit(_assets_job, seed, plan_args): seed for seed in seeds}
        cells = {}
        for built in as_completed(building):
            seed = building[built]
            for variant in variants:
                cells[seed, variant] = pool.submit(_cell_job, root, variant, seed, plan_args, built.result())
        return [cells[seed, variant].result() for seed in seeds for variant in variants]


def main(argv: list[str] | None = None) -> int:
    import torch

    from comp.demo.pipeline import toy_plan

    args = build_parser().parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or args.seeds < 1:
        print(f"comp study: unknown variants {unknown} (choose from {VARIANTS}) or --seeds < 1", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"comp study: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    try:
        plan_args = {**toy_plan(args.toy, args.quick), **CELL_PLAN}
    except ValueError as err:
        print(f"comp study: {err}", file=sys.stderr)
        return 2
    if args.steps is not None:
        plan_args["steps"] = args.steps
    if args.jobs > 1:
        plan_args["jobs"] = 1  # the cores are taken by the cells already

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    cells = run_cells(args.out, variants, seeds, plan_args, args.jobs)
    (args.out / "study.json").write_text(json.dumps(
        {"seeds": seeds, "variants": variants, "table": cell_table(cells),
         "cells": [{k: c[k] for k in ("variant", "seed", "metrics", "seconds")} for c in cells]}, indent=1) + "\n")
    path = write_study(args.out, cells, seeds)
    _say(f"done: {len(cells)} cells; table: {path}")
    return 0
