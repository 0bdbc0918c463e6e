"""The demo's science pipeline, shared by ``comp demo`` and every ``comp study`` cell:
assets -> the recipe's four steps (the package's recipe file, comp.demo.recipe) -> CoMP-VFM
export -> evaluation before and after.

Assets: the toy-pretrained SigLIP and Qwen2 (comp.demo.pretrain, cached per seed), toyworld and
the word prior over the word-level vocabulary (cached per seed beside them).

Demo settings on top of the recipe's smoke-mode flags, the same for every variant and seed (the
"before" models are not trained): ``--force_resize`` rescaled from the smoke scaling (Stage I
= the VFM's pre-training size, 384 -> S) to the toy SigLIP's size S; a merged-token budget
that keeps every toyworld image native; no gradient checkpointing (a memory saving the toy
does not need: it recomputes every forward and made the steps 1.6x slower, with bitwise the
same weights after 100 Stage III steps); and these learning rates and steps, chosen on seed 0
(single runs; ``health`` in the results, the merged visual tokens' image-specific share after
each step, shows when the merger has stopped carrying its images):
- Stages I-II at the recipe's rates scaled to the demo's batch by Adam's square-root rule
  (``batch_lr_scaling``): x sqrt(demo batch / the recipe's global batch on ``RECIPE_GPUS``
  GPUs), 2 / 256 in Stage I and 4 / 256 in Stage II (merger 8.8e-5, then 6.25e-4; VFM
  1.25e-5; LLM 2.5e-6); then capped at ``lr_cap``. At the recipe's own rates (64-128x the
  samples per step they were set for) the alignment loss, whose toy targets are nearly the
  same few function words for every caption, drives every image to one feature and Stage
  III does not recover (docs/results/demo-claims.md). At the recipe's rates x10 (LLM 2e-4,
  VFM 1e-3), Stage II leaves the merged tokens one shared vector.
- Stage III at ``stage3_lr_scale`` x the recipe's rates (a 1B LLM's fine-tuning rates: 1e-5
  LLM, 2e-5 VFM), the merger at ``stage3_projector_lr`` (the recipe gives it the LLM's rate),
  for ``stage3_steps_scale`` x the steps on the medium toyworld: at the recipe's Stage III the
  MLLM does not use its images.
The measurements behind these choices: docs/results/measurements.md.

Evaluation (``run_pipeline``):
- encoder probes (comp.demo.claims, one call per encoder and attribute in the child workers, both cores):
  linear (mean-pooled) and attentive (all tokens) heads on frozen encoder tokens of the
  original toy SigLIP and the CoMP-VFM, at the VFM's fixed size ("fixed": every image S x S),
  at native size and at 2x native (val_hires), over ``probe_seeds`` probe seeds; for digits
  and words also large glyphs at the fixed size ("large, fixed": does the encoder read at
  all); and the dense probe: a linear segmentation head on every patch token, mIoU on
  toyworld's seg split at the same three settings;
- word space: zero-shot colour/shape/digit accuracy through the prototype rows of the class
  words and image-caption retrieval through the prototypes, for the CoMP-MM built from the
  originals (before Stage I) and after Stage II-b; the image features' mean pairwise cosine
  before Stage I and after every step (``health``); how much the captions differ
  (comp.demo.claims.caption_diversity);
- the MLLM after Stage III: exact match by question type and resolution, and image use
  (answer NLL with the right vs another record's image).

Shape legend: N images, D width.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from comp.data.image import PROCESSOR_MAX_NUM_VISTOKEN
from comp import recipes
from comp.demo import recipe
from comp.demo.common import captured, per_class_subset, timed

ZERO_SHOT_ATTRIBUTES = ("colour", "shape", "digit")
FINAL_STEP = "stage3"  # the recipe's instruction-tuning step
# The processor's default budget: every toyworld image (<= 896 px) stays native.
NATIVE_TOKENS = PROCESSOR_MAX_NUM_VISTOKEN
RECIPE_GPUS = 8  # the reference trains every stage on 8 GPUs (per-device batch x accumulation x 8)


@dataclass
class Plan:
    """What one run trains and measures: the full default, or ``quick`` (for tests)."""
    steps: int = 150  # optimizer steps per recipe step
    toys: str = "full"  # comp.demo.pretrain settings: full | reading | quick
    toyworld: str = "medium"  # 3000 pool scenes: Stage III's 1800 steps x 2 records stay < 1.3 epochs
    train_tokens: int = 256  # merged tokens per training image: 448 px toyworld images stay native
    lr_cap: float = 1e-3  # learning rates and Stage III's length: see the module docstring
    batch_lr_scaling: bool = True  # Stages I-II's rates x sqrt(demo batch / recipe batch)
    stage3_lr_scale: float = 10.0
    stage3_projector_lr: float = 1e-3
    stage3_steps_scale: int = 12
    attributes: tuple[str, ...] = ("colour", "shape", "digit", "word")
    probe_per_class: int | None = 16  # images per class and split (None: all)
    probe_seeds: int = 3
    probe_epochs: int = 300  # full-batch AdamW steps of the linear probe
    attentive_epochs: int = 20  # epochs of the attentive probe (mini-batches of 32)
    # the attentive head only where a mean over tokens dilutes the label (a few tokens hold it)
    attentive_attributes: tuple[str, ...] = ("digit", "word")
    dense_train: int | None = 150  # segmentation probe: the first images of seg/train (None: all)
    dense_val: int | None = 60  # ... of seg/val and seg/val_hires
    dense_epochs: int = 10  # mini-batches of 16 images; more epochs do not raise the original's mIoU
    zero_shot_per_class: int | None = None
    retrieval_images: int | None = None
    qa_limit: int | None = None  # held-out questions (None: all)
    qa_native_2x: bool = True  # Stage III's QA at 2x native too (beside fixed and native)
    jobs: int | None = None  # processes for independent work (None: comp.demo.parallel.default_jobs)
    # measure the original encoder and the model before Stage I too (the demo's "before"; comp
    # study compares variants after training and leaves it out)
    before: bool = True
    timings: dict[str, float] = field(default_factory=dict)

    def settings(self) -> dict:
        """What decides the results (not how many processes computed them)."""
        return {k: v for k, v in asdict(self).items() if k not in ("timings", "jobs")}


QUICK = dict(steps=2, toys="quick", toyworld="small", train_tokens=64, attributes=("colour", "digit", "word"),
             probe_per_class=4,
             probe_seeds=3, probe_epochs=30, attentive_epochs=3, dense_train=8, dense_val=4, dense_epochs=2,
             zero_shot_per_class=3, retrieval_images=12, qa_limit=12)


TOY_CHOICES = ("default", "reading")  # the commands' --toy: FULL or READING toy originals


def toy_plan(toy: str, quick: bool) -> dict:
    """The Plan fields for a command's ``--toy`` and ``--quick``; ValueError where they do not
    combine (the reading toy has no smoke size)."""
    if toy not in TOY_CHOICES:
        raise ValueError(f"--toy {toy}: choose from {', '.join(TOY_CHOICES)}")
    if quick:
        if toy != "default":
            raise ValueError(f"--toy {toy} has no quick size; drop --quick or --toy")
        return dict(QUICK)
    return {"toys": "full" if toy == "default" else toy}


@dataclass(frozen=True)
class Assets:
    llm: Path
    vision: Path
    toyworld: Path
    word_dist: Path
    image_size: int  # the toy SigLIP's fixed square input
    quality: dict


def toy_settings(name: str):
    from comp.demo import pretrain

    return {"full": pretrain.FULL, "reading": pretrain.READING, "quick": pretrain.QUICK}[name]


def build_assets(seed: int, plan: Plan, log=print) -> Assets:
    """The toy originals (built when not cached), toyworld and the word prior for ``seed``,
    cached beside the originals (keyed by the toyworld size). A cold build writes toyworld
    while the toy SigLIP trains (comp.demo.pretrain.build_toys' ``alongside``)."""
    from comp.demo.pretrain import pretrained_toys

    data = f"demo-data-{plan.toyworld}"
    settings = toy_settings(plan.toys)
    toys = pretrained_toys(seed, settings, log=log, jobs=plan.jobs,
                           alongside=lambda toys: write_data(toys / data, seed, plan.toyworld, toys / "qwen2",
                                                             settings.typeset))
    root = toys.siglip.parent / data
    size = json.loads((toys.siglip / "config.json").read_text())["vision_config"]["image_size"]
    return Assets(toys.qwen2, toys.siglip, root / "toyworld", root / "word_dist.pt", int(size), toys.quality)


def write_data(root: Path, seed: int, size: str, tokenizer: Path, typeset: str = "small") -> None:
    """toyworld (its reading probes in ``typeset``) and its word prior (counted with ``tokenizer``)
    into ``root``, unless there already."""
    from comp.data.prior import word_prior
    from comp.data.toyworld import write_toyworld
    from comp.files import atomic_output

    if (root / "ready").exists():
        return
    with atomic_output(root, directory=True) as tmp:
        write_toyworld(tmp / "toyworld", seed=seed, size=size, typeset=typeset)
        counts, skipped = word_prior(str(tmp / "toyworld" / "stage2.yaml"), str(tokenizer))
        if skipped:
            raise ValueError(f"{tmp / 'toyworld' / 'stage2.yaml'}: {skipped} malformed records in "
                             "freshly written toyworld data; this is a bug in comp.data.toyworld")
        torch.save(counts, tmp / "word_dist.pt")
        (tmp / "ready").touch()


# ----------------------------------------------------------------------------- training


def resize_factor(steps: list[recipe.RecipeStep], image_size: int) -> float:
    """Stage I's --force_resize is the VFM's pre-training size (384 for SigLIP-So400M); the
    toy SigLIP's is ``image_size``: every --force_resize scales by their ratio."""
    first = recipe.flag_value(steps[0].flags, "--force_resize")
    if first is None:
        raise ValueError(f"{recipes.recipe_path(recipe.RUN)}: Stage I has no force_resize; the demo reads "
                         "the VFM's pre-training size from it")
    return image_size / int(first)


def batch_lr_factor(step: recipe.RecipeStep) -> float:
    """sqrt(the demo's batch / the recipe's global batch) for ``step`` (Adam's square-root
    scaling rule): the demo's rates for the samples per step it trains on."""
    reference = {s.name: dict(s.flags) for s in recipes.load_recipe(recipe.RUN).stages}[step.name]

    def batch(flags: dict, gpus: int) -> int:
        return int(flags["per_device_train_batch_size"]) * int(flags.get("gradient_accumulation_steps", 1)) * gpus

    ours = {k.removeprefix("--"): v for k, v in recipe.flag_pairs(list(step.flags))}
    return math.sqrt(batch(ours, 1) / batch(reference, RECIPE_GPUS))


def step_overrides(step: recipe.RecipeStep, assets: Assets, plan: Plan, factor: float,
                   variant: dict[str, str | None]) -> dict[str, str | None]:
    """The demo's settings (and a study variant's flags, which win) for one step."""
    out: dict[str, str | None] = {"--max_num_vistoken": str(plan.train_tokens), "--gradient_checkpointing": "False"}
    resize = recipe.flag_value(step.flags, "--force_resize")
    if resize is not None:
        unit = 28  # patch 14 x merge 2
        out["--force_resize"] = str(max(unit, round(int(resize) * factor / unit) * unit))
    final = step.name == FINAL_STEP
    scale = plan.stage3_lr_scale if final else batch_lr_factor(step) if plan.batch_lr_scaling else 1.0
    for flag in recipe.LR_FLAGS:
        value = recipe.flag_value(step.flags, flag)
        if value is not None:
            out[flag] = f"{min(float(value) * scale, plan.lr_cap):g}"
    if final:
        out["--mm_projector_lr"] = f"{plan.stage3_projector_lr:g}"
    return out | variant


def step_count(step: recipe.RecipeStep, plan: Plan) -> int:
    return plan.steps * (plan.stage3_steps_scale if step.name == FINAL_STEP else 1)


def step_argvs(assets: Assets, run_dir: Path, plan: Plan, seed: int,
               variant: dict[str, str | None] | None = None, word_dist: str | None = None) -> dict[str, list[str]]:
    """Step name -> its ``comp train`` argv (the recipe's flags, the demo's assets and settings)."""
    steps = recipe.recipe_steps()
    factor = resize_factor(steps, assets.image_size)
    return {s.name: recipe.demo_argv(s, llm=assets.llm, vision=assets.vision, toyworld=assets.toyworld,
                                     word_dist=word_dist or assets.word_dist, run_dir=run_dir,
                                     max_steps=step_count(s, plan), seed=seed,
                                     overrides=step_overrides(s, assets, plan, factor, variant or {}))
            for s in steps}


def train_steps(argvs: dict[str, list[str]], plan: Plan, logs: Path, verbose: bool, say,
                callbacks_for=None, step_done=None) -> dict[str, list[dict]]:
    """The steps, chained; -> per step, the logged training steps (trainer.state.log_history).
    A step whose output is complete already is kept (resumable). ``step_done(name)`` runs as
    each step's checkpoint is there."""
    from comp.train.args import parse_args
    from comp.train.run import train

    histories: dict[str, list[dict]] = {}
    for name, argv in argvs.items():
        out = Path(argv[argv.index("--output_dir") + 1])
        done = out / "log_history.json"
        start = time.perf_counter()
        if done.exists():
            histories[name] = json.loads(done.read_text())
            if step_done is not None:
                step_done(name)
            continue
        with captured(logs / f"{name}.log", verbose):
            trainer = train(*parse_args(argv), callbacks=callbacks_for(name) if callbacks_for else None)
        histories[name] = [h for h in trainer.state.log_history if "lm_loss" in h]
        done.write_text(json.dumps(histories[name]) + "\n")
        plan.timings[name] = time.perf_counter() - start
        last = histories[name][-1]
        align = f", align_loss {last['align_loss']:.3f}" if "align_loss" in last else ""
        say(f"{name}: {trainer.state.global_step} steps, last lm_loss {last['lm_loss']:.3f}{align} "
            f"({plan.timings[name]:.0f} s)")
        if step_done is not None:
            step_done(name)
    return histories


def initial_model(argv: list[str], seed: int):
    """The CoMP-MM Stage I starts from (original SigLIP, new merger, the LLM)."""
    import transformers

    from comp.train.args import parse_args
    from comp.train.run import build_model

    model_args, data_args, _ = parse_args(argv)
    transformers.set_seed(seed)  # as comp.train.run.train does before building
    model, _ = build_model(model_args, data_args)
    return model.eval()


# ----------------------------------------------------------------------------- probes


def encoder_calls(name: str, directory: Path, assets: Assets, plan: Plan) -> list[tuple[str, str, tuple, dict]]:
    """The frozen-encoder measurements of one encoder, one child's work each, slowest first:
    (label, function, args, kwargs) of the dense probe's two halves (comp.demo.claims.dense_cell) and a
    probe cell per attribute (comp.demo.claims.probe_cell; the attentive head for
    ``plan.attentive_attributes`` only, the same for every encoder)."""
    probe = {"per_class": plan.probe_per_class, "seeds": plan.probe_seeds, "linear_epochs": plan.probe_epochs,
             "attentive_epochs": plan.attentive_epochs, "max_num_vistoken": NATIVE_TOKENS}
    dense = {"seeds": plan.probe_seeds, "epochs": plan.dense_epochs, "n_train": plan.dense_train,
             "n_val": plan.dense_val, "max_num_vistoken": NATIVE_TOKENS}
    calls = [(f"probe: {name}, dense {'fixed' if fixed else 'native'}", "comp.demo.claims:dense_cell",
              (directory, assets.toyworld / "seg", assets.image_size, fixed), dense) for fixed in (False, True)]
    attributes = sorted(plan.attributes, key=lambda a: a not in plan.attentive_attributes)
    for attribute in attributes:
        calls.append((f"probe: {name}, {attribute}", "comp.demo.claims:probe_cell",
                      (directory, assets.toyworld, attribute, assets.image_size),
                      {**probe, "attentive": attribute in plan.attentive_attributes}))
    return calls


def cached_call(cache: Path, function: str, args: tuple, kwargs: dict):
    """``function(*args, **kwargs)``'s JSON result, read from ``cache`` (a folder) when an
    earlier call with the same function, arguments and source of its module wrote it there.
    The original encoder's probes are the same in every ``comp study`` variant of a seed:
    computed once."""
    import hashlib
    import importlib

    from comp.demo.parallel import resolve
    from comp.files import atomic_output

    source = Path(importlib.import_module(function.split(":")[0]).__file__).read_bytes()
    key = json.dumps([function, args, kwargs, hashlib.sha256(source).hexdigest()], sort_keys=True, default=str)
    path = Path(cache) / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
    if path.exists():
        return json.loads(path.read_text())
    result = resolve(function)(*args, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(result) + "\n")
    return result


def probe_rows(results: dict[str, list[dict]], plan: Plan) -> tuple[list[dict], list[dict]]:
    """(probe rows, dense rows) from ``encoder_calls``' results by label, each row naming its
    encoder; probe rows in the plan's attribute order."""
    from comp.demo.claims import DENSE_GROUPS

    probes, dense = [], []
    for label, rows in results.items():
        encoder, what = label.removeprefix("probe: ").split(", ")
        (dense if what.startswith("dense") else probes).extend({"encoder": encoder, **row} for row in rows)
    order = {a: i for i, a in enumerate(plan.attributes)}
    probes.sort(key=lambda r: order[r["attribute"]])  # stable: encoders stay in call order
    encoders = list(dict.fromkeys(r["encoder"] for r in dense))
    settings = [s for _, evals in DENSE_GROUPS for s in evals]
    dense.sort(key=lambda r: (encoders.index(r["encoder"]), settings.index(r["setting"])))
    return probes, dense


# ----------------------------------------------------------------------------- word space


def zero_shot_results(model, processor, assets: Assets, plan: Plan) -> dict:
    from comp.eval.probe import read_image_folder
    from comp.eval.wordspace import zero_shot

    out = {}
    for attribute in ZERO_SHOT_ATTRIBUTES:
        paths, labels, classes = read_image_folder(assets.toyworld / "probe" / attribute / "val")
        paths, labels = per_class_subset(paths, labels, plan.zero_shot_per_class)
        result = zero_shot(model, processor, paths, labels, classes)
        out[attribute] = {k: result[k] for k in ("top1", "chance", "n", "multi_token")}
    return out


def load_model(name: str, run_dir: Path, first_argv: list[str], seed: int):
    """The CoMP-MM before Stage I (``name`` "before": original SigLIP, new merger, the LLM) or
    after step ``name``."""
    from comp.models.mllm import CompForConditionalGeneration

    if name == "before":
        return initial_model(first_argv, seed)
    return CompForConditionalGeneration.from_pretrained(run_dir / name).eval()


def word_space_results(name: str, run_dir: Path, first_argv: list[str], seed: int, assets: Assets,
                       plan: Plan) -> dict:
    """Zero-shot and retrieval of one model (``load_model``), one image protocol for all (the
    training budget, native aspect)."""
    from comp.data.processor import CompProcessor
    from comp.eval.wordspace import retrieval

    entries = json.loads((assets.toyworld / "retrieval" / "captions.json").read_text())[: plan.retrieval_images]
    processor = CompProcessor.from_components(assets.llm, assets.vision, max_num_vistoken=plan.train_tokens)
    model = load_model(name, run_dir, first_argv, seed)
    return {"zero_shot": zero_shot_results(model, processor, assets, plan),
            "retrieval": retrieval(model, processor, assets.word_dist, entries, assets.toyworld / "retrieval")}


def health_results(names: Sequence[str], run_dir: Path, first_argv: list[str], seed: int, assets: Assets,
                   plan: Plan, images: int = 16, cos_images: int = 100) -> dict:
    """Per model of ``names`` (``load_model``): the merged visual tokens on the first held-out
    QA images (training budget), their norm against the word embeddings and their
    image-specific share; and ``image_cos``, the mean pairwise cosine of F_v over the first
    retrieval images (1: every image offers the alignment loss the same word distribution)."""
    from comp.data.processor import CompProcessor
    from comp.eval.qa import load_questions
    from comp.eval.wordspace import image_features, mean_pairwise_cos, merged_token_health

    paths = [q["image"] for q in load_questions(assets.toyworld / "qa_eval")[:images]]
    entries = json.loads((assets.toyworld / "retrieval" / "captions.json").read_text())[:cos_images]
    retrieval_paths = [assets.toyworld / "retrieval" / e["image"] for e in entries]
    out = {}
    for name in names:
        model = load_model(name, run_dir, first_argv, seed)
        processor = (CompProcessor.from_components(assets.llm, assets.vision, max_num_vistoken=plan.train_tokens)
                     if name == "before" else
                     CompProcessor.from_pretrained(run_dir / name, max_num_vistoken=plan.train_tokens))
        out[name] = {**merged_token_health(model, processor.image_processor, paths),
                     "image_cos": mean_pairwise_cos(image_features(model, processor.image_processor, retrieval_paths)),
                     "cos_images": len(retrieval_paths)}
    return out


def caption_results(assets: Assets, plan: Plan) -> dict:
    """How much the retrieval captions differ (comp.demo.claims.caption_diversity) and, in
    ``targets``, what the alignment loss makes of them (comp.demo.claims.alignment_targets;
    content words: every probe class)."""
    from comp.data.toyworld import PROBES
    from comp.demo.claims import alignment_targets, caption_diversity

    entries = json.loads((assets.toyworld / "retrieval" / "captions.json").read_text())[: plan.retrieval_images]
    captions = [e["caption"] for e in entries]
    classes = [c for names in PROBES.values() for c in names]
    return {**caption_diversity(assets.llm, captions),
            "targets": alignment_targets(assets.llm, captions, assets.word_dist, content_words=classes)}


def qa_results(run_dir: Path, assets: Assets, plan: Plan, seed: int, variant: str) -> dict:
    """comp.eval.qa.evaluate_qa after Stage III at one resolution ``variant`` (one child each)."""
    from comp.eval.qa import evaluate_qa
    from comp.models.mllm import CompForConditionalGeneration

    model = CompForConditionalGeneration.from_pretrained(run_dir / "stage3").eval()
    return evaluate_qa(model, run_dir / "stage3", assets.toyworld / "qa_eval", fixed_size=assets.image_size,
                       native_tokens=NATIVE_TOKENS, limit=plan.qa_limit, seed=seed, variants=[variant])[variant]


# ----------------------------------------------------------------------------- one run


def export_once(run_dir: Path, vfm: Path, plan: Plan, logs: Path, verbose: bool, say) -> None:
    """The CoMP-VFM from Stage III's checkpoint (kept when exported already)."""
    from comp.train.export import export_vfm

    with timed(plan, "export"), captured(logs / "export.log", verbose):
        if not (vfm / "config.json").exists():
            export_vfm(run_dir / "stage3", vfm)
    say(f"export: CoMP-VFM in {vfm}")


def train_and_evaluate_beside(before: list, during: dict[str, list], after: list, jobs: int,
                              argvs: dict[str, list[str]], vfm: Path, plan: Plan, logs: Path, verbose: bool, say,
                              callbacks_for):
    """The recipe's steps with the ``before`` calls in child processes beside them (the
    training runs one thread: ``jobs`` - 1 children), each of ``during[step]`` queued as that
    step ends, then the ``after`` calls on ``jobs``; -> (histories, results by label, seconds
    by label)."""
    from comp.demo.parallel import ChildPool

    seconds: dict[str, float] = {}

    def done(future) -> None:
        seconds[future.label] = round(future.seconds, 1)
        if future.exception() is None:
            say(f"{future.label} ({future.seconds:.0f} s)")

    with ChildPool(max(1, jobs - 1), on_done=done) as pool:
        futures = [pool.submit(function, args, kwargs, label) for label, function, args, kwargs in before]

        def step_done(name: str) -> None:
            futures.extend(pool.submit(function, args, kwargs, label)
                           for label, function, args, kwargs in during.get(name, ()))
            if name == list(argvs)[-2]:  # the evaluation's workers import while the last step trains
                pool.warm(jobs)

        histories = train_steps(argvs, plan, logs, verbose, say, callbacks_for, step_done)
        export_once(vfm.parent, vfm, plan, logs, verbose, say)
        with timed(plan, "evaluation"):
            pool.jobs = jobs
            futures += [pool.submit(function, args, kwargs, label) for label, function, args, kwargs in after]
            results = {future.label: future.result() for future in futures}
    return histories, results, seconds


def run_pipeline(assets: Assets, out: Path, plan: Plan, seed: int, *, variant: dict | None = None,
                 word_dist: str | None = None, verbose: bool = False, say=None,
                 callbacks_for=None) -> dict:
    """Train the recipe into ``out/comp_1b_siglip``, export the CoMP-VFM, evaluate; -> results.

    With ``plan.jobs`` > 1 (None: the cores, at most 2) the evaluation runs in child processes
    (``train_and_evaluate_beside``): what needs only the originals on the core the training
    leaves free (it runs one thread), then what needs only Stage II-b's checkpoint, the rest on
    every core once the CoMP-VFM is exported; with 1, here after the training."""
    from comp.demo.parallel import default_jobs, resolve
    from comp.eval.qa import resolution_names

    if say is None:
        stream = sys.stderr  # bound now: a phase's log captures sys.stderr while the pool reports

        def say(message: str) -> None:
            print(f"[comp demo] {message}", file=stream, flush=True)
    logs, run_dir = out / "logs", out / recipe.RUN
    argvs = step_argvs(assets, run_dir, plan, seed, variant, word_dist)
    first = argvs[next(iter(argvs))]
    context = (run_dir, first, seed, assets, plan)
    cache = assets.vision.parent / "probe-cache"  # beside the original, whose results they are
    before = []
    if plan.before:
        before = [(label, f"{__name__}:cached_call", (cache, function, args, kwargs), {})
                  for label, function, args, kwargs in encoder_calls("original", assets.vision, assets, plan)]
        before += [("word space: before Stage I", f"{__name__}:word_space_results", ("before", *context), {}),
                   ("health: before Stage I", f"{__name__}:health_results", (["before"], *context), {}),
                   ("word space: how much the captions differ", f"{__name__}:caption_results", (assets, plan), {})]
    vfm = run_dir / "comp-vfm"
    qa_variants = resolution_names(assets.image_size)[:None if plan.qa_native_2x else 2]
    # what needs only Stage II-b's checkpoint runs during Stage III, on the core the training leaves
    *stages_1_2, final = argvs
    aligned = stages_1_2[-1]  # Stage II-b: the last step trained with the alignment loss
    during = {aligned: [("word space: after Stage II-b", f"{__name__}:word_space_results", (aligned, *context), {}),
                        ("health: after Stages I-II", f"{__name__}:health_results", (stages_1_2, *context), {})]}
    qa_calls = [(f"qa: exact match and image use after Stage III, {variant}", f"{__name__}:qa_results",
                 (run_dir, assets, plan, seed, variant), {}) for variant in reversed(qa_variants)]
    # the longest first (QA on the largest images, then the probes), so the cores finish together
    after = [qa_calls[0], *encoder_calls("CoMP-VFM", vfm, assets, plan), *qa_calls[1:],
             ("health: after Stage III", f"{__name__}:health_results", ([final], *context), {})]
    jobs = default_jobs() if plan.jobs is None else plan.jobs
    if jobs > 1:
        histories, results, seconds = train_and_evaluate_beside(before, during, after, jobs, argvs, vfm, plan, logs,
                                                               verbose, say, callbacks_for)
    else:  # one process (a comp study worker): children would only add their start-up
        histories = train_steps(argvs, plan, logs, verbose, say, callbacks_for)
        export_once(run_dir, vfm, plan, logs, verbose, say)
        results, seconds = {}, {}
        with timed(plan, "evaluation"), captured(logs / "eval.log", verbose):
            for label, function, args, kwargs in before + [c for calls in during.values() for c in calls] + after:
                start = time.perf_counter()
                results[label] = resolve(function)(*args, **kwargs)
                seconds[label] = round(time.perf_counter() - start, 1)
    say(f"evaluation: {len(results)} parts done {plan.timings['evaluation']:.0f} s after the training")
    probes, dense = probe_rows({k: v for k, v in results.items() if k.startswith("probe: ")}, plan)
    health = (results.get("health: before Stage I", {}) | results["health: after Stages I-II"]
              | results["health: after Stage III"])
    say("merged visual tokens (norm / word-embedding norm, image-specific share, image cos): " + ", ".join(
        f"{k} {h['norm_ratio']:.0f}x {h['image_specific']:.2f} {h['image_cos']:.2f}" for k, h in health.items()))
    return {"seed": seed, "plan": plan.settings(), "image_size": assets.image_size,
            "toy_quality": assets.quality, "argv": argvs, "histories": histories, "health": health,
            "probes": probes, "dense": dense,
            "word_space": {"before": results.get("word space: before Stage I"),
                           "after": results["word space: after Stage II-b"]},
            "captions": results.get("word space: how much the captions differ"),
            "qa": {v: results[f"qa: exact match and image use after Stage III, {v}"] for v in qa_variants},
            "eval_seconds": seconds}
