"""``comp demo [--out DIR] [--seed N]``: the SigLIP recipe end to end on tiny random models and
toyworld data, with a report (``report.md`` + PNG figures) of what moved.

Phases: assets (tiny SigLIP and Qwen2 checkpoints, toyworld, the word prior) -> the four
training steps of ``scripts/comp/comp_1b_siglip.sh`` in its smoke mode, in-process through
``comp.train.run.train`` (``STEPS`` holds that script's flags with the smoke scaling applied;
tests/test_demo.py checks that the two agree) -> ``export_vfm`` -> evaluation -> report.

Evaluation, all on frozen models:
- a linear probe (comp.eval.probe) on mean-pooled encoder tokens of toyworld attributes, the
  original SigLIP against the exported CoMP-VFM, at the training budget (<= 64 merged tokens
  per image), at native resolution, and on ``val_hires`` (the val scenes rendered at twice the
  size: more tokens than any training image had);
- retrieval through the alignment prototypes (comp.eval.wordspace): images through encoder +
  merger (pooled F_v), captions through the LLM's text pass (masked mean, the alignment
  loss's F_t), both scored against the L2-normalised word embeddings; captions are ranked
  for each image by the alignment loss's own quantity, sum_k p_t(k) log p_v(k), and by the
  cosine of F_v and F_t.

Shape legend: I images, J captions, K prototypes (vocabulary rows), D LLM width, M merged
visual tokens, L caption tokens, N probe images.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Retrieval through the prototypes has one implementation, in comp.eval.wordspace; these
# names stay importable from here for the demo's callers.
from comp.eval.wordspace import (  # noqa: F401
    image_features,
    mean_pairwise_cos,
    recall_at,
    retrieval,
    text_features,
    top_words,
    word_distributions,
)

RUN = "comp_1b_siglip"
MARKER = ".comp-demo"
OWNED = (RUN, "logs", "figures", "report.md", "results.json")  # what a rerun replaces
ALL_PARTS = "mm_vision_tower,mm_mlp_adapter,mm_language_model,mm_lm_head"

# scripts/comp/common.sh, COMP_SMOKE=1: COMMON_FLAGS (--max_steps is the demo's) + TEMPLATE_FLAGS.
SMOKE_FLAGS = ("--use_cpu", "True", "--bf16", "False", "--tf32", "False", "--dataloader_num_workers", "0",
               "--save_steps", "1000", "--report_to", "none", "--logging_steps", "1",
               "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03", "--weight_decay", "0.",
               "--gradient_checkpointing", "True", "--group_by_modality_length", "True",
               "--dataloader_drop_last", "True",
               "--resume_from_checkpoint", "auto")


@dataclass(frozen=True)
class Step:
    name: str
    data: str  # toyworld stage YAML
    flags: tuple[str, ...]  # scripts/comp/comp_1b_siglip.sh's, smoke-scaled (batch 2, 64 tokens, ...)


STEPS = (
    Step("stage1", "stage1.yaml", (
        "--mm_tunable_parts", "mm_mlp_adapter", "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--max_num_vistoken", "64", "--model_max_length", "1024",
        "--use_rope", "0", "--force_resize", "48", "--use_alignment_loss", "1")),
    Step("stage2a", "stage2.yaml", (
        "--mm_tunable_parts", ALL_PARTS, "--learning_rate", "2e-5", "--mm_vision_tower_lr", "1e-4",
        "--mm_projector_lr", "5e-3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--max_num_vistoken", "64", "--model_max_length", "1024",
        "--use_rope", "1", "--force_resize", "128", "--use_alignment_loss", "1")),
    Step("stage2b", "stage2.yaml", (
        "--mm_tunable_parts", ALL_PARTS, "--learning_rate", "2e-5", "--mm_vision_tower_lr", "1e-4",
        "--mm_projector_lr", "5e-3", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        "--max_num_vistoken", "64", "--model_max_length", "1024",
        "--use_rope", "1", "--use_alignment_loss", "1")),
    Step("stage3", "stage3.yaml", (
        "--mm_tunable_parts", ALL_PARTS, "--learning_rate", "1e-5", "--mm_vision_tower_lr", "2e-5",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
        "--max_num_vistoken", "64", "--model_max_length", "1024",
        "--use_rope", "1", "--use_alignment_loss", "0")),
)
TRAIN_TOKENS = 64  # the smoke budget of every step: merged tokens per image
NATIVE_TOKENS = 1280  # the processor's default budget: every toyworld image (<= 896 px) stays native


@dataclass(frozen=True)
class Assets:
    llm: Path
    vision: Path
    toyworld: Path
    word_dist: Path


@dataclass
class Plan:
    """What the demo runs: the full default, or ``--quick`` (smoke-sized, for tests)."""
    steps: int = 1000
    attributes: tuple[str, ...] = ("colour", "shape")
    probe_per_class: int | None = None  # images per class and split (None: all)
    retrieval_images: int | None = None  # None: all
    probe_steps: int = 1000  # full-batch AdamW steps of the linear probe
    timings: dict[str, float] = field(default_factory=dict)


QUICK = {"steps": 3, "attributes": ("colour",), "probe_per_class": 6, "retrieval_images": 24,
         "probe_steps": 200}


# ----------------------------------------------------------------------------- phases


def build_assets(root: Path, seed: int) -> Assets:
    """Tiny checkpoints, toyworld and the word prior, as the script's smoke mode builds them;
    reused when ``root`` already holds a complete set for this seed."""
    from comp.data.prior import word_prior
    from comp.data.toyworld import write_toyworld
    from comp.models.tiny import write_tiny

    assets = Assets(root / "qwen2", root / "siglip", root / "toyworld", root / "word_dist.pt")
    ready = root / "ready.json"
    if ready.exists() and json.loads(ready.read_text()).get("seed") == seed:
        return assets
    shutil.rmtree(root, ignore_errors=True)
    write_tiny(assets.llm, "qwen2", seed=seed)
    write_tiny(assets.vision, "siglip", seed=seed)
    write_toyworld(assets.toyworld, seed=seed, size="small")
    counts, _ = word_prior(str(assets.toyworld / "stage2.yaml"), str(assets.llm))
    torch.save(counts, assets.word_dist)
    ready.write_text(json.dumps({"seed": seed}))
    return assets


def step_argv(step: Step, assets: Assets, run_dir: Path, previous: str | None, *, max_steps: int,
              seed: int) -> list[str]:
    """``comp train`` arguments of one step, as the script's ``run_step`` assembles them."""
    if previous is None:
        model = ["--model_name_or_path", str(assets.llm), "--custom_visual_model", str(assets.vision)]
    else:
        model = ["--model_name_or_path", str(run_dir / previous)]
    return ["--data_path", str(assets.toyworld / step.data), "--output_dir", str(run_dir / step.name),
            *SMOKE_FLAGS, "--max_steps", str(max_steps), "--seed", str(seed),
            "--word_dist_path", str(assets.word_dist), *model, *step.flags]


@contextlib.contextmanager
def captured(log_file: Path, verbose: bool) -> Iterator[None]:
    """Send a phase's prints, progress bars, warnings and log records to ``log_file``."""
    if verbose:
        yield
        return
    import transformers

    log_file.parent.mkdir(parents=True, exist_ok=True)
    hf_level = transformers.logging.get_verbosity()
    ours = logging.getLogger("comp")
    level, propagate = ours.level, ours.propagate
    with open(log_file, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        handler = logging.StreamHandler(f)
        transformers.logging.set_verbosity_error()  # its handler holds the real stderr
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False
        try:
            yield
        finally:
            ours.removeHandler(handler)
            ours.setLevel(level)
            ours.propagate = propagate
            transformers.logging.set_verbosity(hf_level)


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


def train_steps(assets: Assets, run_dir: Path, plan: Plan, seed: int, logs: Path, verbose: bool,
                say) -> dict[str, list[dict]]:
    """The four steps, chained; -> per step, the logged training steps (trainer.state.log_history)."""
    from comp.train.args import parse_args
    from comp.train.run import train

    StageProgress = stage_progress_callback()
    histories: dict[str, list[dict]] = {}
    previous = None
    terminal = sys.stderr  # the phases' own output goes to OUT/logs; the bars stay on the terminal
    for step in STEPS:
        start = time.perf_counter()
        argv = step_argv(step, assets, run_dir, previous, max_steps=plan.steps, seed=seed)
        with captured(logs / f"{step.name}.log", verbose):
            trainer = train(*parse_args(argv), callbacks=[StageProgress(step.name, terminal)])
        histories[step.name] = [h for h in trainer.state.log_history if "lm_loss" in h]
        plan.timings[step.name] = time.perf_counter() - start
        last = histories[step.name][-1]
        align = f", align_loss {last['align_loss']:.3f}" if "align_loss" in last else ""
        say(f"{step.name}: {plan.steps} steps, last lm_loss {last['lm_loss']:.3f}{align} "
            f"({plan.timings[step.name]:.0f} s)")
        previous = step.name
    return histories


def initial_model(assets: Assets, seed: int):
    """The CoMP-MM that Stage I starts from (original SigLIP, random merger, the LLM)."""
    import transformers

    from comp.train.args import parse_args
    from comp.train.run import build_model

    argv = step_argv(STEPS[0], assets, Path("unused"), None, max_steps=1, seed=seed)
    model_args, data_args, _ = parse_args(argv)
    transformers.set_seed(seed)  # as comp.train.run.train does before building
    model, _ = build_model(model_args, data_args)
    return model


# ----------------------------------------------------------------------------- retrieval

def retrieval_results(assets: Assets, run_dir: Path, plan: Plan, seed: int) -> dict[str, dict]:
    """Retrieval of the MLLM before Stage I and after each step, one image protocol for all
    (the training budget, native aspect)."""
    from comp.data.processor import CompProcessor
    from comp.models.mllm import CompForConditionalGeneration

    entries = json.loads((assets.toyworld / "retrieval" / "captions.json").read_text())
    entries = entries[: plan.retrieval_images]
    processor = CompProcessor.from_components(assets.llm, assets.vision, max_num_vistoken=TRAIN_TOKENS)
    root = assets.toyworld / "retrieval"
    models = {"before Stage I": lambda: initial_model(assets, seed)}
    models |= {f"after {s.name}": (lambda s=s: CompForConditionalGeneration.from_pretrained(run_dir / s.name))
               for s in STEPS}
    return {name: retrieval(load(), processor, assets.word_dist, entries, root) for name, load in models.items()}


# ----------------------------------------------------------------------------- probes


def per_class_subset(paths: list[Path], labels: list[int], limit: int | None) -> tuple[list[Path], list[int]]:
    """The first ``limit`` images of each class (all when None), order kept."""
    if limit is None:
        return paths, labels
    seen: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels):
        seen[y] = seen.get(y, 0) + 1
        if seen[y] <= limit:
            keep.append(i)
    return [paths[i] for i in keep], [labels[i] for i in keep]


def probe_results(encoders: dict[str, Path], toyworld: Path, plan: Plan, seed: int) -> list[dict]:
    """Linear-probe (and k-NN) top-1 for each encoder, attribute and resolution setting.

    Settings: ``train-res`` (<= TRAIN_TOKENS merged tokens per image, as in training, val
    split), ``native`` (val at its own size) and ``native 2x`` (the probe trained at native
    resolution applied to val_hires: sizes no training step and no probe saw)."""
    from comp.eval.features import encode_files, load_encoder, mean_pool
    from comp.eval.probe import (
        TrainSettings,
        knn_predict,
        linear_probe,
        read_image_folder,
        top1,
    )

    rows = []
    for attribute in plan.attributes:
        root = toyworld / "probe" / attribute
        train_p, train_y, classes = read_image_folder(root / "train")
        splits = {"train": per_class_subset(train_p, train_y, plan.probe_per_class)}
        for split in ("val", "val_hires"):
            paths, labels, _ = read_image_folder(root / split, classes)
            splits[split] = per_class_subset(paths, labels, plan.probe_per_class)
        for name, directory in encoders.items():
            for budget, evals in ((TRAIN_TOKENS, {"train-res": "val"}),
                                  (NATIVE_TOKENS, {"native": "val", "native 2x": "val_hires"})):
                encoder = load_encoder(directory, max_num_vistoken=budget)
                feats = {}
                for split in ("train", *evals.values()):
                    tokens, grid_N3 = encode_files(encoder, splits[split][0])
                    feats[split] = (mean_pool(tokens), float(grid_N3.prod(-1).float().mean()))
                train_ND, train_y = feats["train"][0], torch.tensor(splits["train"][1])
                # full batch: one AdamW step per epoch
                settings = TrainSettings(epochs=plan.probe_steps, lr=0.1, wd=0.0, batch_size=len(train_y),
                                         seed=seed)
                for setting, split in evals.items():
                    val_ND, val_y = feats[split][0], torch.tensor(splits[split][1])
                    rows.append({
                        "attribute": attribute, "encoder": name, "setting": setting, "split": split,
                        "patches_per_image": feats[split][1], "n_train": len(train_y), "n_val": len(val_y),
                        "chance": 1 / len(classes),
                        "linear": top1(linear_probe(train_ND, train_y, val_ND, len(classes), settings), val_y),
                        "knn": top1(knn_predict(train_ND, train_y, val_ND, len(classes)), val_y)})
    return rows


def relative_change(before: Path, after: Path) -> float:
    """||after - before|| / ||before|| over the encoder weights both directories hold."""
    from comp.models.vision.model import CompVisionModel

    a = CompVisionModel.from_pretrained(before, w_merger=0).state_dict()
    b = CompVisionModel.from_pretrained(after, w_merger=0).state_dict()
    shared = [k for k in a if k in b and a[k].shape == b[k].shape]
    moved = sum(float((b[k].float() - a[k].float()).pow(2).sum()) for k in shared)
    norm = sum(float(a[k].float().pow(2).sum()) for k in shared)
    return (moved / norm) ** 0.5


# ----------------------------------------------------------------------------- command


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


@contextlib.contextmanager
def timed(plan: Plan, name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    plan.timings[name] = time.perf_counter() - start


def build_parser() -> argparse.ArgumentParser:
    from comp.cliargs import ArgumentParser

    p = ArgumentParser(
        prog="comp demo",
        description="The SigLIP recipe end to end on tiny random models and toyworld data: builds "
                    "the assets, trains the four steps, exports the CoMP-VFM and writes "
                    "OUT/report.md with PNG figures (loss curves, probes, retrieval, resolutions).")
    p.add_argument("--out", type=Path, default=Path("comp_demo"), help="output directory (default ./comp_demo)")
    p.add_argument("--seed", type=int, default=0, help="seeds the tiny checkpoints, toyworld and training")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps per training step (default {Plan.steps}; {QUICK['steps']} with --quick)")
    p.add_switch("--quick", default=False,
                   help="smoke-sized run: few steps, one probe attribute, few probe and retrieval images")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the tiny models' ops are too small to "
                        "share, and on a busy machine a second thread costs up to 10x)")
    p.add_switch("--verbose", default=False, help="print the training logs instead of filing them in OUT/logs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = Plan(**QUICK) if args.quick else Plan()
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


def run(args: argparse.Namespace, plan: Plan) -> Path:
    """The phases, each with a progress line; -> the report."""
    from comp.train.export import export_vfm
    from comp.demo.report import write_report

    out = args.out

    def say(message: str) -> None:
        print(f"[comp demo] {message}", flush=True)

    logs, run_dir = out / "logs", out / RUN
    with timed(plan, "assets"), captured(logs / "assets.log", args.verbose):
        assets = build_assets(out / "assets", args.seed)
    say(f"assets: tiny SigLIP + Qwen2, toyworld, word prior in {out / 'assets'} ({plan.timings['assets']:.0f} s)")
    histories = train_steps(assets, run_dir, plan, args.seed, logs, args.verbose, say)
    vfm = run_dir / "comp-vfm"
    with timed(plan, "export"), captured(logs / "export.log", args.verbose):
        export_vfm(run_dir / STEPS[-1].name, vfm)
    say(f"export: CoMP-VFM in {vfm}")
    with timed(plan, "probe"), captured(logs / "eval.log", args.verbose):
        probes = probe_results({"SigLIP (original)": assets.vision, "CoMP-VFM": vfm}, assets.toyworld,
                               plan, args.seed)
        encoder_change = relative_change(assets.vision, vfm)
    say(f"probe: {len(probes)} linear probes ({plan.timings['probe']:.0f} s)")
    with timed(plan, "retrieval"), captured(logs / "eval.log", args.verbose):
        retrievals = retrieval_results(assets, run_dir, plan, args.seed)
    say(f"retrieval: {len(retrievals)} models ({plan.timings['retrieval']:.0f} s)")
    results = {"seed": args.seed, "steps": plan.steps, "train_tokens": TRAIN_TOKENS,
               "probe_steps": plan.probe_steps, "timings": plan.timings, "histories": histories,
               "encoder_change": encoder_change,
               "probes": probes, "retrieval": retrievals}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    report = write_report(out, results)
    say(f"done in {sum(plan.timings.values()):.0f} s; report: {report}")
    return report
