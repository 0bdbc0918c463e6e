"""``comp demo [--out DIR] [--seed N] [--quick]``: the SigLIP recipe, its stages and flags read
from the package's recipe file (comp.recipes, through comp.demo.recipe), continued from
toy-pretrained originals (comp.demo.pretrain) on toyworld, evaluated before and after
(comp.demo.pipeline), with a summary of the paper's claims and a verdict for each
(comp.demo.summary): OUT/results.json and OUT/report.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from comp.demo.common import captured, timed

MARKER = ".comp-demo"
OWNED = ("comp_1b_siglip", "logs", "figures", "report.md", "results.json")  # what a rerun replaces


def stage_progress_callback():
    from transformers import TrainerCallback
    from tqdm.auto import tqdm

    class StageProgress(TrainerCallback):
        """A bar per training step on the terminal: optimizer steps, lm_loss, ETA."""

        def __init__(self, name: str, stream):
            self.name, self.stream, self.bar = name, stream, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=f"[comp demo] {self.name}", unit="step",
                            file=self.stream, disable=None, leave=False, initial=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "lm_loss" in logs:
                self.bar.set_postfix(lm_loss=f"{logs['lm_loss']:.3f}", refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return StageProgress


def prepare_out(out: Path) -> None:
    """``out`` must be new, empty, or an earlier demo's (whose outputs, not assets, are replaced)."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise FileExistsError(f"{out} exists and is not a comp demo directory; pass a new --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    for name in OWNED:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def build_parser() -> argparse.ArgumentParser:
    from comp.cliargs import ArgumentParser
    from comp.demo.pipeline import QUICK, TOY_CHOICES, Plan

    p = ArgumentParser(
        prog="comp demo",
        description="The SigLIP recipe end to end on toy-pretrained SigLIP and Qwen2 (built and cached "
                    "when missing) and toyworld: trains the recipe's four steps, exports the CoMP-VFM, "
                    "evaluates before and after and writes OUT/results.json and OUT/report.md with a "
                    "summary of which claims the run supports.")
    p.add_argument("--out", type=Path, default=Path("comp_demo"), help="output directory (default ./comp_demo)")
    p.add_argument("--seed", type=int, default=0, help="seeds the toy originals, toyworld and training")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps per recipe step, Stage III x {Plan.stage3_steps_scale} "
                        f"(default {Plan.steps}; {QUICK['steps']} with --quick)")
    p.add_switch("--quick", default=False,
                 help="smoke-sized run: quick toys, few steps, two probe attributes, few images")
    p.add_argument("--toy", choices=TOY_CHOICES, default="default",
                   help="the toy originals: default, or reading (a toy SigLIP that reads digits and words "
                        "in large type, and probes set in it; its colour and Stage III are weaker, see "
                        "docs/results/demo-claims.md; not with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the tiny models' ops are too small to "
                        "share, and on a busy machine a second thread costs up to 10x)")
    p.add_switch("--verbose", default=False, help="print the training logs instead of filing them in OUT/logs")
    return p


def main(argv: list[str] | None = None) -> int:
    from comp.demo.pipeline import Plan, toy_plan

    args = build_parser().parse_args(argv)
    try:
        plan = Plan(**toy_plan(args.toy, args.quick))
    except ValueError as err:
        print(f"comp demo: {err}", file=sys.stderr)
        return 2
    if args.steps is not None:
        plan.steps = args.steps
    if plan.steps < 1 or args.threads < 1:
        print(f"comp demo: --steps and --threads must be >= 1, got {plan.steps}, {args.threads}",
              file=sys.stderr)
        return 2
    try:
        prepare_out(args.out)
    except FileExistsError as err:
        print(f"comp demo: {err}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        run(args, plan)
    finally:
        torch.set_num_threads(threads)
    return 0


def run(args: argparse.Namespace, plan) -> Path:
    """Assets, the pipeline, the summary; -> the report."""
    from comp.demo.pipeline import build_assets, run_pipeline
    from comp.demo.summary import RULE, summary_rows

    out = args.out

    stream = sys.stdout  # not a phase's log: the evaluation reports from a thread while a phase runs

    def say(message: str) -> None:
        print(f"[comp demo] {message}", file=stream, flush=True)

    StageProgress = stage_progress_callback()
    with timed(plan, "assets"), captured(out / "logs" / "assets.log", args.verbose):
        assets = build_assets(args.seed, plan)
    say(f"assets: toy SigLIP {assets.vision}, toy Qwen2 {assets.llm}, toyworld, word prior "
        f"({plan.timings['assets']:.0f} s)")
    results = run_pipeline(assets, out, plan, args.seed, verbose=args.verbose, say=say,
                           callbacks_for=lambda name: [StageProgress(name, sys.stderr)])
    results["timings"] = plan.timings
    results["summary"] = summary_rows(results)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    from comp.demo.report import write_report  # matplotlib only now

    report = write_report(out, results, rule=RULE)
    for row in results["summary"]:
        say(f"{row['claim']}, {row['metric']}: {row['before']:.3f} -> {row['after']:.3f} (spread {row['spread']:.3f}): "
            f"{'supported' if row['supported'] else 'NOT supported'}")
    say(f"done in {sum(plan.timings.values()):.0f} s; report: {report}")
    return report
