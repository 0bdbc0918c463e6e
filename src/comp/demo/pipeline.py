"""The demo's science pipeline, shared by ``comp demo`` and every ``comp study`` cell:
assets -> the recipe's four steps (the package's recipe file, comp.demo.recipe) -> CoMP-VFM
export -> evaluation before and after.

Assets: the toy-pretrained SigLIP and Qwen2 (comp.demo.pretrain, cached per seed), toyworld and
the word prior over the word-level vocabulary (cached per seed beside them).

Demo settings on top of the recipe's smoke-mode flags, the same for every variant and seed (the
"before" models are not trained): ``--force_resize`` rescaled from the smoke scaling (Stage I
= the VFM's pre-training size, 384 -> S) to the toy SigLIP's size S; a merged-token budget
that keeps every toyworld image native; and these learning rates and steps, chosen on seed 0
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

Evaluation (``evaluate``):
- probes: linear (mean-pooled) and attentive (all tokens) heads on frozen encoder tokens of
  the original toy SigLIP and the CoMP-VFM, at the VFM's fixed size ("fixed": every image
  S x S), at native size and at 2x native (val_hires), over ``probe_seeds`` probe seeds;
- word space: zero-shot colour/shape/digit accuracy through the prototype rows of the class
  words and image-caption retrieval through the prototypes, for the CoMP-MM built from the
  originals (before Stage I) and after Stage II-b;
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
from comp.demo.common import captured, mean_std, per_class_subset, timed

ZERO_SHOT_ATTRIBUTES = ("colour", "shape", "digit")
FINAL_STEP = "stage3"  # the recipe's instruction-tuning step
# The processor's default budget: every toyworld image (<= 896 px) stays native.
NATIVE_TOKENS = PROCESSOR_MAX_NUM_VISTOKEN
RECIPE_GPUS = 8  # the reference trains every stage on 8 GPUs (per-device batch x accumulation x 8)


@dataclass
class Plan:
    """What one run trains and measures: the full default, or ``quick`` (for tests)."""
    steps: int = 150  # optimizer steps per recipe step
    toys: str = "full"  # comp.demo.pretrain settings: full | quick
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
    zero_shot_per_class: int | None = None
    retrieval_images: int | None = None
    qa_limit: int | None = None  # held-out questions (None: all)
    timings: dict[str, float] = field(default_factory=dict)

    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "timings"}


QUICK = dict(steps=2, toys="quick", toyworld="small", train_tokens=64, attributes=("colour", "digit"), probe_per_class=4,
             probe_seeds=3, probe_epochs=30, attentive_epochs=3, zero_shot_per_class=3, retrieval_images=12, qa_limit=12)


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

    return {"full": pretrain.FULL, "quick": pretrain.QUICK}[name]


def build_assets(seed: int, plan: Plan, log=print) -> Assets:
    """The toy originals (built when not cached), toyworld and the word prior for ``seed``,
    cached beside the originals (keyed by the toyworld size)."""
    from comp.data.prior import word_prior
    from comp.data.toyworld import write_toyworld
    from comp.demo.pretrain import pretrained_toys
    from comp.files import atomic_output

    toys = pretrained_toys(seed, toy_settings(plan.toys), log=log)
    root = toys.siglip.parent / f"demo-data-{plan.toyworld}"
    if not (root / "ready").exists():
        with atomic_output(root, directory=True) as tmp:
            write_toyworld(tmp / "toyworld", seed=seed, size=plan.toyworld)
            counts, skipped = word_prior(str(tmp / "toyworld" / "stage2.yaml"), str(toys.qwen2))
            if skipped:
                raise ValueError(f"{tmp / 'toyworld' / 'stage2.yaml'}: {skipped} malformed records in "
                                 "freshly written toyworld data; this is a bug in comp.data.toyworld")
            torch.save(counts, tmp / "word_dist.pt")
            (tmp / "ready").touch()
    size = json.loads((toys.siglip / "config.json").read_text())["vision_config"]["image_size"]
    return Assets(toys.qwen2, toys.siglip, root / "toyworld", root / "word_dist.pt", int(size), toys.quality)


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
    out: dict[str, str | None] = {"--max_num_vistoken": str(plan.train_tokens)}
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
                callbacks_for=None) -> dict[str, list[dict]]:
    """The steps, chained; -> per step, the logged training steps (trainer.state.log_history).
    A step whose output is complete already is kept (resumable)."""
    from comp.train.args import parse_args
    from comp.train.run import train

    histories: dict[str, list[dict]] = {}
    for name, argv in argvs.items():
        out = Path(argv[argv.index("--output_dir") + 1])
        done = out / "log_history.json"
        start = time.perf_counter()
        if done.exists():
            histories[name] = json.loads(done.read_text())
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


# ----------------------------------------------------------------------------- statistics


def seed_stats(values: list[float]) -> dict:
    """What results.json keeps of a per-seed measurement: mean, std and the values."""
    mean, std = mean_std(values)
    return {"mean": mean, "std": std, "values": values}


# ----------------------------------------------------------------------------- probes


def probe_splits(toyworld: Path, attribute: str, per_class: int | None):
    from comp.eval.probe import read_image_folder

    root = toyworld / "probe" / attribute
    train_p, train_y, classes = read_image_folder(root / "train")
    splits = {"train": per_class_subset(train_p, train_y, per_class)}
    for split in ("val", "val_hires"):
        paths, labels, _ = read_image_folder(root / split, classes)
        splits[split] = per_class_subset(paths, labels, per_class)
    return splits, classes


def probe_results(encoders: dict[str, Path], assets: Assets, plan: Plan) -> list[dict]:
    """Linear and attentive top-1 (mean and std over probe seeds) per encoder, attribute and
    resolution: "fixed" (S x S, train and val), "native" and "native 2x" (the native-trained
    probe applied to val_hires). Each encoder's tokens are computed once per resolution and
    shared by every probe seed and head; the attentive head runs for
    ``plan.attentive_attributes`` only (None elsewhere), the same for every encoder."""
    from comp.eval.features import encode_files, load_encoder, mean_pool
    from comp.eval.heads import TrainSettings, attentive_probe, linear_probe, top1

    rows = []
    for attribute in plan.attributes:
        splits, classes = probe_splits(assets.toyworld, attribute, plan.probe_per_class)
        for name, directory in encoders.items():
            for resolution, evals in ((assets.image_size, {"fixed": "val"}),
                                      (None, {"native": "val", "native 2x": "val_hires"})):
                encoder = load_encoder(directory, resolution=resolution, max_num_vistoken=NATIVE_TOKENS,
                                       device="cpu")
                tokens = {s: encode_files(encoder, splits[s][0]) for s in ("train", *evals.values())}
                train_y = torch.tensor(splits["train"][1])
                # one probe per seed, applied to every split of this resolution
                val_tokens = [t for split in evals.values() for t in tokens[split][0]]
                bounds = torch.tensor([0, *[len(splits[split][1]) for split in evals.values()]]).cumsum(0)
                attentive = attribute in plan.attentive_attributes
                preds: dict[str, list[torch.Tensor]] = {"linear": [], **({"attentive": []} if attentive else {})}
                for probe_seed in range(plan.probe_seeds):
                    full = TrainSettings(epochs=plan.probe_epochs, lr=1e-2, wd=0.0, batch_size=len(train_y),
                                         seed=probe_seed)
                    preds["linear"].append(linear_probe(mean_pool(tokens["train"][0]), train_y,
                                                        mean_pool(val_tokens), len(classes), full))
                    if not attentive:
                        continue
                    mini = TrainSettings(epochs=plan.attentive_epochs, lr=1e-3, wd=0.0, batch_size=32,
                                         seed=probe_seed)
                    preds["attentive"].append(attentive_probe(tokens["train"][0], train_y, val_tokens,
                                                              len(classes), mini))
                for k, (setting, split) in enumerate(evals.items()):
                    val_y = torch.tensor(splits[split][1])
                    part = slice(int(bounds[k]), int(bounds[k + 1]))
                    rows.append({"attribute": attribute, "encoder": name, "setting": setting,
                                 "patches_per_image": float(tokens[split][1].prod(-1).float().mean()),
                                 "n_train": len(train_y), "n_val": len(val_y), "chance": 1 / len(classes),
                                 "attentive": None,
                                 **{head: seed_stats([top1(p[part], val_y) for p in ps])
                                    for head, ps in preds.items()}})
    return rows


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


def word_space_results(initial, run_dir: Path, assets: Assets, plan: Plan) -> dict:
    """Zero-shot and retrieval before Stage I and after Stage II-b, one image protocol (the
    training budget, native aspect)."""
    from comp.data.processor import CompProcessor
    from comp.eval.wordspace import retrieval
    from comp.models.mllm import CompForConditionalGeneration

    entries = json.loads((assets.toyworld / "retrieval" / "captions.json").read_text())[: plan.retrieval_images]
    processor = CompProcessor.from_components(assets.llm, assets.vision, max_num_vistoken=plan.train_tokens)
    results = {}
    for name, load in (("before", initial),
                       ("after", lambda: CompForConditionalGeneration.from_pretrained(run_dir / "stage2b"))):
        model = load()
        results[name] = {"zero_shot": zero_shot_results(model, processor, assets, plan),
                         "retrieval": retrieval(model, processor, assets.word_dist, entries,
                                                assets.toyworld / "retrieval")}
    return results


def health_results(run_dir: Path, steps: Sequence[str], assets: Assets, plan: Plan, images: int = 16) -> dict:
    """Each step's merged visual tokens on the first held-out QA images (training budget):
    their norm against the word embeddings and their image-specific share."""
    from comp.data.processor import CompProcessor
    from comp.eval.qa import load_questions
    from comp.eval.wordspace import merged_token_health
    from comp.models.mllm import CompForConditionalGeneration

    paths = [q["image"] for q in load_questions(assets.toyworld / "qa_eval")[:images]]
    out = {}
    for name in steps:
        model = CompForConditionalGeneration.from_pretrained(run_dir / name).eval()
        processor = CompProcessor.from_pretrained(run_dir / name, max_num_vistoken=plan.train_tokens)
        out[name] = merged_token_health(model, processor.image_processor, paths)
    return out


def qa_results(run_dir: Path, assets: Assets, plan: Plan, seed: int) -> dict:
    from comp.eval.qa import evaluate_qa
    from comp.models.mllm import CompForConditionalGeneration

    model = CompForConditionalGeneration.from_pretrained(run_dir / "stage3").eval()
    return evaluate_qa(model, run_dir / "stage3", assets.toyworld / "qa_eval", fixed_size=assets.image_size,
                       native_tokens=NATIVE_TOKENS, limit=plan.qa_limit, seed=seed)


# ----------------------------------------------------------------------------- one run


def run_pipeline(assets: Assets, out: Path, plan: Plan, seed: int, *, variant: dict | None = None,
                 word_dist: str | None = None, verbose: bool = False, say=None,
                 callbacks_for=None) -> dict:
    """Train the recipe into ``out/comp_1b_siglip``, export the CoMP-VFM, evaluate; -> results."""
    from comp.train.export import export_vfm

    say = say or (lambda message: print(f"[comp demo] {message}", file=sys.stderr, flush=True))
    logs, run_dir = out / "logs", out / recipe.RUN
    argvs = step_argvs(assets, run_dir, plan, seed, variant, word_dist)
    histories = train_steps(argvs, plan, logs, verbose, say, callbacks_for)
    with timed(plan, "health"), captured(logs / "eval.log", verbose):
        health = health_results(run_dir, list(argvs), assets, plan)
    say("merged visual tokens (norm / word-embedding norm, image-specific share): " + ", ".join(
        f"{k} {h['norm_ratio']:.0f}x {h['image_specific']:.2f}" for k, h in health.items()))
    vfm = run_dir / "comp-vfm"
    with timed(plan, "export"), captured(logs / "export.log", verbose):
        if not (vfm / "config.json").exists():
            export_vfm(run_dir / "stage3", vfm)
    say(f"export: CoMP-VFM in {vfm}")
    with timed(plan, "probe"), captured(logs / "eval.log", verbose):
        probes = probe_results({"original": assets.vision, "CoMP-VFM": vfm}, assets, plan)
    say(f"probe: {len(probes)} probe rows ({plan.timings['probe']:.0f} s)")
    with timed(plan, "word space"), captured(logs / "eval.log", verbose):
        first = argvs[next(iter(argvs))]
        words = word_space_results(lambda: initial_model(first, seed), run_dir, assets, plan)
    say(f"word space: zero-shot and retrieval before / after Stage II-b ({plan.timings['word space']:.0f} s)")
    with timed(plan, "qa"), captured(logs / "eval.log", verbose):
        qa = qa_results(run_dir, assets, plan, seed)
    say(f"qa: exact match and image use after Stage III ({plan.timings['qa']:.0f} s)")
    return {"seed": seed, "plan": plan.settings(), "image_size": assets.image_size,
            "toy_quality": assets.quality, "argv": argvs, "histories": histories,
            "health": health, "probes": probes, "word_space": words, "qa": qa}
