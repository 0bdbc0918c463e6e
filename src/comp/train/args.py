"""Command-line arguments of ``comp train``: the flag names of the reference scripts.

Model and data flags are CoMP's own dataclasses; everything else is transformers'
``TrainingArguments`` (learning_rate, per_device_train_batch_size, deepspeed, bf16, ...), so
the seed scripts' command lines run unchanged.

A default that a configuration or the data pipeline also holds is read from there (CompConfig,
CompVisionConfig, the image processor, the dataset), so it is written once. A flag with a
fixed set of values is typed ``Literal[...]`` with the set defined where the setting lives:
HfArgumentParser turns it into argparse ``choices`` and ``flag_problems`` checks it too.
"""
from __future__ import annotations

import dataclasses
import math
import textwrap
import typing
from dataclasses import dataclass, field, fields
from typing import Literal

from transformers import HfArgumentParser, TrainingArguments

from comp.data.dataset import ALIGN_MAX_LENGTH
from comp.data.image import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_NUM_VISTOKEN, PROCESSOR_MIN_NUM_VISTOKEN
from comp.data.prompts import DEFAULT_PROMPT_FORMAT, PROMPT_FORMAT_HELP, PromptFormat
from comp.models.configuration import DEFAULT_VOCAB_ROWS, PRIOR_MODES, CompConfig, PriorMode, VocabRows
from comp.models.vision.configuration import POS_INTERP_MODES, CompVisionConfig, PosInterpMode, PosOrder

LmLossNormalization = Literal["step", "micro_batch"]
LM_LOSS_NORMALIZATIONS: tuple[str, ...] = typing.get_args(LmLossNormalization)
TUNABLE_PARTS = ("mm_vision_tower", "mm_mlp_adapter", "mm_language_model", "mm_lm_head")


def parse_tunable_parts(text: str) -> list[str]:
    """``--mm_tunable_parts`` as a list: comma-separated, blanks ignored (validated in flag_problems)."""
    return [p.strip() for p in text.split(",") if p.strip()]


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "a Qwen2/Qwen2.5 LLM (a new CoMP-MM is built around it) "
                                              "or a CoMP-MM (the previous step): directory or Hub id"})
    custom_visual_model: str | None = field(default=None, metadata={
        "help": "encoder (original SigLIP/DINOv2/AIMv2 or a CoMP-VFM): directory or Hub id; only used "
                "when model_name_or_path is an LLM"})
    mm_tunable_parts: str = field(default="mm_mlp_adapter", metadata={
        "help": f"comma-separated subset of {','.join(TUNABLE_PARTS)}"})
    use_rope: bool = field(default=CompVisionConfig.use_rope, metadata={
        "help": "C-RoPE: 2D RoPE in every encoder layer"})
    pos_interp_mode: PosInterpMode = field(default=CompVisionConfig.pos_interp_mode, metadata={
        "help": f"resizing of the absolute table: {' | '.join(POS_INTERP_MODES)}"})
    use_alignment_loss: bool = field(default=CompConfig.use_alignment_loss, metadata={
        "help": "add the alignment loss"})
    loss_weight: float = field(default=CompConfig.loss_weight, metadata={"help": "weight of the alignment loss"})
    embed_temp: float = field(default=CompConfig.embed_temp, metadata={
        "help": "temperature of the image-word similarities"})
    word_temp: float = field(default=CompConfig.word_temp, metadata={"help": "temperature of the word targets"})
    word_eps: float = field(default=CompConfig.word_eps, metadata={
        "help": "entropic regularisation of the Sinkhorn targets"})
    sinkhorn_iters: int = field(default=CompConfig.sinkhorn_iters, metadata={"help": "Sinkhorn-Knopp iterations"})
    prior_mode: PriorMode = field(default=CompConfig.prior_mode, metadata={
        "help": " | ".join(PRIOR_MODES) + ": how the word targets use the prior"})
    word_dist_path: str | None = field(default=None, metadata={
        "help": "word-frequency counts over the vocabulary (`comp data prior`), needed with the "
                "alignment loss; 'uniform' asks for a uniform prior (the ablation). When absent, a "
                "continued CoMP-MM reuses the prior its config records"})
    word_dist_pad: bool | None = field(default=None, metadata={
        "help": "a counts file shorter than the prototype rows: missing rows count 1. Default: "
                "padded when at most 1%% of the rows are missing (the reference's 151,657-entry "
                "file on Qwen2.5's 151,665 tokens), refused otherwise"})
    pos_order: PosOrder | None = field(default=None, metadata={
        "help": "merge | raster: order in which the encoder adds its position table; default: the "
                "checkpoint's (raster for an encoder detected as trained by the reference code)"})
    lm_loss_chunk_size: int = field(default=CompConfig.lm_loss_chunk_size, metadata={
        "help": "tokens per chunk of the LM loss"})
    vocab_rows: VocabRows = field(default=DEFAULT_VOCAB_ROWS, metadata={
        "help": "tokenizer: word embeddings resized to the tokenizer's length, as the reference "
                "(Qwen2.5: 151,665 rows); llm: keep the LLM's padded table (151,936 rows)"})
    new_merger: bool = field(default=False, metadata={
        "help": "start a new merger even when --custom_visual_model holds one of the LLM's width "
                "(by default it is loaded, as the reference loads it)"})


@dataclass
class DataArguments:
    data_path: str = field(metadata={"help": "a mixture YAML (datasets: [{json_path, sampling_strategy}]) "
                                     "or one LLaVA JSON/JSONL file"})
    image_folder: str | None = field(default=None, metadata={"help": "root of relative image paths"})
    data_root: str | None = field(default=None, metadata={
        "help": "root of relative json_path entries (default: the YAML's directory)"})
    max_num_vistoken: int = field(default=DEFAULT_MAX_NUM_VISTOKEN, metadata={"help": "max visual tokens per image after the 2x2 merge"})
    min_num_vistoken: int = field(default=PROCESSOR_MIN_NUM_VISTOKEN, metadata={
        "help": "min visual tokens per image after the merge"})
    force_resize: int | None = field(default=None, metadata={"help": "resize to N x N before smart_resize"})
    model_max_length: int = field(default=4096, metadata={"help": "longest token sequence of a sample"})
    align_max_length: int = field(default=ALIGN_MAX_LENGTH, metadata={
        "help": "longest alignment text (the answers the alignment loss reads), as the reference's "
                f"{ALIGN_MAX_LENGTH}; 0: --model_max_length"})
    max_skip_fraction: float = field(default=0.01, metadata={"help": "stop when more samples are skipped"})
    pack_length: int | None = field(default=None, metadata={"help": "pack samples into rows of N tokens"})
    length_cache_dir: str | None = field(default=None, metadata={
        "help": "where the length-grouped sampler's sample lengths are cached (default "
                "$COMP_CACHE/lengths or ~/.cache/comp/lengths; 'none': never cache)"})
    length_workers: int | None = field(default=None, metadata={
        "help": "processes that compute the sample lengths on rank 0 (default: the CPUs)"})
    prompt_format: PromptFormat = field(default=DEFAULT_PROMPT_FORMAT, metadata={"help": PROMPT_FORMAT_HELP})


@dataclass
class CompTrainingArguments(TrainingArguments):
    mm_vision_tower_lr: float | None = field(default=None, metadata={"help": "lr of the encoder (not the merger)"})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "lr of the merger"})
    group_by_modality_length: bool = field(default=False, metadata={
        "help": "batch multimodal and text-only samples separately, grouped by length (LLaVA)"})
    reference_optimizer_groups: bool = field(default=False, metadata={
        "help": "the reference's parameter groups: with --mm_vision_tower_lr and no "
                "--mm_projector_lr the merger is in no group and is never updated (its Stage III)"})
    lm_loss_normalization: LmLossNormalization = field(default="step", metadata={
        "help": "step: token mean over the whole optimizer step (independent of the split); "
                "micro_batch: mean of per-micro-batch token means, as the reference"})
    warmup_ratio: float | None = field(default=None, metadata={
        "help": "warmup as a fraction of all steps (the reference's flag; transformers 5 spells "
                "it --warmup_steps with a value below 1)"})
    remove_unused_columns: bool = False
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start this run in an output_dir that holds checkpoints of another run (other "
                "flags, data or seed), deleting those checkpoints; without it such a start is refused"})

    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "'auto' (or True): continue from the newest complete checkpoint in output_dir, if "
                "any (model, optimizer, scheduler, RNG, data position); or a checkpoint directory"})

    def __post_init__(self):
        if self.lm_loss_normalization not in LM_LOSS_NORMALIZATIONS:
            raise ValueError(f"--lm_loss_normalization must be one of {LM_LOSS_NORMALIZATIONS}, "
                             f"got {self.lm_loss_normalization!r}")
        # --gradient_checkpointing is the reference's spelling, not a deprecated one here: pass it
        # on under transformers 5's name so it does not warn on every run.
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if getattr(self, new) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()


ModelArguments._argument_group_name = "CoMP model"
DataArguments._argument_group_name = "data"

# `comp train --help`: CoMP's flags, then transformers' TrainingArguments by topic (first
# matching prefix wins); `--help_all` prints transformers' full text.
_CUSTOM = {f.name for f in fields(CompTrainingArguments)} - {f.name for f in fields(TrainingArguments)}
TRAINING_GROUPS = (
    ("CoMP training", tuple(sorted(_CUSTOM | {"resume_from_checkpoint", "output_dir"}))),
    ("schedule and optimizer", ("num_train_epochs", "max_steps", "learning_rate", "lr_scheduler", "warmup",
                                "optim", "weight_decay", "adam_", "max_grad_norm", "label_smoothing")),
    ("batches and data loading", ("per_device_train", "gradient_accumulation", "average_tokens", "auto_find",
                                  "dataloader_", "remove_unused", "label_names", "train_sampling",
                                  "length_column", "group_by", "seed", "data_seed", "full_determinism")),
    ("precision, memory and devices", ("bf16", "fp16", "tf32", "activation_checkpointing", "gradient_checkpointing",
                                       "torch_compile", "use_liger", "liger", "use_cache", "torch_empty",
                                       "use_cpu", "deepspeed", "fsdp", "ddp_", "local_rank", "accelerator",
                                       "parallelism", "neftune")),
    ("checkpoints and logging", ("save_", "enable_jit", "logging_", "log_", "include_num", "disable_tqdm",
                                 "report_to", "run_name", "project", "trackio", "ignore_data_skip",
                                 "restore_callback", "skip_memory", "debug", "push_to_hub", "hub_")),
    ("evaluation (unused by CoMP's recipes)", ("eval_", "per_device_eval", "prediction", "include_for",
                                                "batch_eval", "load_best", "metric_for", "greater_is",
                                                "bf16_full", "fp16_full", "do_")),
)


def _one_line(text: str | None, width: int = 70) -> str:
    text = " ".join((text or "").split())
    first = text.split(". ")[0].rstrip(".")
    return first if len(first) <= width else first[: width - 3].rstrip() + "..."


USAGE = ("usage: comp train --model_name_or_path LLM_OR_COMP_MM [--custom_visual_model VFM]\n"
         "                  --data_path DATA.yaml --output_dir DIR [flags]")


class TrainArgumentParser(HfArgumentParser):
    """HfArgumentParser with a help text a person can read: one line per flag, CoMP's first;
    a bad flag prints the short usage, not argparse's hundred lines of every flag."""

    def format_usage(self) -> str:
        return USAGE + "\n"

    def format_help(self) -> str:
        actions = {a.dest: a for a in self._actions  # --no_x shares x's dest: keep --x
                   if a.option_strings and a.dest != "help" and not a.option_strings[0].startswith("--no_")}
        own = [g for g in self._action_groups if g.title in ("CoMP model", "data")]
        lines = [*USAGE.splitlines(), "",
                 "Train one CoMP step (the reference scripts' flags). Flags take underscores or dashes;",
                 "switches take 1/0/True/False (alone: on). --help_all: transformers' full help.", ""]

        def section(title: str, group_actions, full: bool = False) -> None:
            lines.append(f"{title}:")
            for a in group_actions:
                default = "" if a.default in (None, dataclasses.MISSING) or a.required else f" (default {a.default})"
                flag = a.option_strings[0]
                text = ("required: " if a.required else "") + (
                    " ".join((a.help or "").split()) if full else _one_line(a.help)) + default
                wrapped = textwrap.wrap(text, 70) or [""]
                lines.append(f"  {flag:<30} {wrapped[0]}")
                lines.extend(" " * 33 + more for more in wrapped[1:])
            lines.append("")

        shown: set[str] = set()
        for group in own:
            acts = [a for a in group._group_actions if a.option_strings and not a.option_strings[0].startswith("--no_")]
            shown |= {a.dest for a in group._group_actions}
            section(group.title, acts, full=True)
        rest = [a for d, a in actions.items() if d not in shown]
        for title, prefixes in TRAINING_GROUPS:
            picked = [a for a in rest if a.dest.startswith(prefixes) and a.dest not in shown]
            shown |= {a.dest for a in picked}
            if picked:
                section(title, picked, full=title == "CoMP training")
        other = [a for a in rest if a.dest not in shown]
        if other:
            section("other TrainingArguments", other)
        return "\n".join(lines)

    def parse_args_into_dataclasses(self, args=None, **kwargs):
        import sys

        argv = list(sys.argv[1:] if args is None else args)
        if "--help_all" in argv or "--help-all" in argv:
            print(super().format_help())
            raise SystemExit(0)
        return super().parse_args_into_dataclasses(args=argv, **kwargs)


def build_parser() -> TrainArgumentParser:
    return TrainArgumentParser((ModelArguments, DataArguments, CompTrainingArguments), prog="comp train")


def flag_problems(model_args: ModelArguments, data_args: DataArguments,
                  training_args: CompTrainingArguments | None = None) -> list[str]:
    """What is wrong with the numeric and choice flags, one message per flag (empty: all good).
    Checked at parse time, so a bad value never reaches the first forward pass."""
    m, d, t = model_args, data_args, training_args
    checks = [
        ("embed_temp", m.embed_temp > 0, "must be > 0"),
        ("word_temp", m.word_temp > 0, "must be > 0"),
        ("word_eps", m.word_eps > 0, "must be > 0"),
        ("loss_weight", m.loss_weight >= 0, "must be >= 0"),
        ("sinkhorn_iters", m.sinkhorn_iters >= 1, "must be >= 1"),
        ("lm_loss_chunk_size", m.lm_loss_chunk_size > 0, "must be > 0"),
        ("use_rope", m.use_rope in (0, 1), "must be 0 or 1"),
        ("use_alignment_loss", m.use_alignment_loss in (0, 1), "must be 0 or 1"),
        ("max_skip_fraction", 0 <= d.max_skip_fraction <= 1, "must be in [0, 1]"),
        ("model_max_length", d.model_max_length > 0, "must be > 0"),
        ("max_num_vistoken", d.max_num_vistoken > 0, "must be > 0"),
        ("min_num_vistoken", 0 < d.min_num_vistoken <= d.max_num_vistoken,
         "must be > 0 and <= --max_num_vistoken"),
        ("force_resize", d.force_resize is None or 0 < d.force_resize ** 2 <= DEFAULT_MAX_IMAGE_PIXELS,
         f"must be > 0 and at most {math.isqrt(DEFAULT_MAX_IMAGE_PIXELS)} (the image pixel limit)"),
        ("pack_length", d.pack_length is None or d.pack_length > 0, "must be > 0"),
        ("align_max_length", d.align_max_length >= 0, "must be >= 0 (0: --model_max_length)"),
    ]
    if t is not None:
        checks += [
            ("max_steps", t.max_steps == -1 or t.max_steps > 0,
             "must be > 0, or -1 to train --num_train_epochs"),
            ("num_train_epochs", t.max_steps > 0 or t.num_train_epochs > 0, "must be > 0"),
            ("logging_steps", t.logging_steps > 0, "must be > 0 (below 1: a fraction of the steps)"),
            ("save_steps", t.save_steps > 0, "must be > 0 (below 1: a fraction of the steps)"),
            ("dataloader_num_workers", t.dataloader_num_workers >= 0, "must be >= 0"),
            ("seed", 0 <= t.seed < 2**32, "must be in [0, 2**32)"),
            ("data_seed", t.data_seed is None or 0 <= t.data_seed < 2**32, "must be in [0, 2**32)"),
            ("adam_beta1", 0 <= t.adam_beta1 < 1, "must be in [0, 1)"),
            ("adam_beta2", 0 <= t.adam_beta2 < 1, "must be in [0, 1)"),
            ("adam_epsilon", t.adam_epsilon >= 0, "must be >= 0"),
            ("label_smoothing_factor", 0 <= t.label_smoothing_factor < 1, "must be in [0, 1)"),
            ("learning_rate", t.learning_rate >= 0, "must be >= 0"),
            ("mm_vision_tower_lr", t.mm_vision_tower_lr is None or t.mm_vision_tower_lr >= 0, "must be >= 0"),
            ("mm_projector_lr", t.mm_projector_lr is None or t.mm_projector_lr >= 0, "must be >= 0"),
            ("weight_decay", t.weight_decay >= 0, "must be >= 0"),
            ("max_grad_norm", t.max_grad_norm >= 0, "must be >= 0"),
            ("per_device_train_batch_size", t.per_device_train_batch_size > 0, "must be > 0"),
            ("gradient_accumulation_steps", t.gradient_accumulation_steps > 0, "must be > 0"),
        ]
    problems = [f"--{name} must be one of {list(choices)}, got {value!r}"
                for name, value, choices in _choice_problems(m, d, t)]
    problems += [f"--{name} must be a finite number, got {value!r}" for name, value in _non_finite(m, d, t)]
    problems += [f"--{name} {fix}, got {_value(m, d, t, name)!r}" for name, ok, fix in checks
                 if not ok and name not in dict(_non_finite(m, d, t))]
    parts = parse_tunable_parts(m.mm_tunable_parts)
    unknown = sorted(set(parts) - set(TUNABLE_PARTS))
    if unknown:
        problems.append(f"--mm_tunable_parts: unknown part(s) {unknown}; choose from {list(TUNABLE_PARTS)}")
    elif not parts:
        problems.append(f"--mm_tunable_parts is empty; name at least one of {list(TUNABLE_PARTS)}")
    return problems


def choice_fields(cls) -> dict[str, tuple]:
    """The ``Literal`` fields of a dataclass (``X | None`` too) -> their choices (None included
    where allowed): the flags HfArgumentParser gives argparse ``choices``."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) is Literal:
            out[f.name] = typing.get_args(kind)
            continue
        literals = [a for a in typing.get_args(kind) if typing.get_origin(a) is Literal]
        if literals and type(None) in typing.get_args(kind):
            out[f.name] = (*typing.get_args(literals[0]), None)
    return out


def _choice_problems(*objects) -> list[tuple[str, object, tuple]]:
    """(flag, value, choices) of every CoMP choice flag holding a value outside its choices
    (argparse refuses those on the command line; this also covers arguments built in code)."""
    found = []
    for o in objects:
        if o is None:
            continue
        own = {f.name for f in fields(TrainingArguments)} if isinstance(o, TrainingArguments) else set()
        for name, choices in choice_fields(type(o)).items():
            if name not in own and getattr(o, name) not in choices:
                found.append((name, getattr(o, name), tuple(c for c in choices if c is not None)))
    return found


def _non_finite(*objects) -> list[tuple[str, float]]:
    """Every float flag that is NaN or infinite (comparisons with NaN are all False, so a range
    check alone lets it through, and inf passes ``>= 0``)."""
    return [(f.name, getattr(o, f.name)) for o in objects if o is not None for f in fields(o)
            if isinstance(getattr(o, f.name), float) and not math.isfinite(getattr(o, f.name))]


def _value(*args_and_name):
    *objects, name = args_and_name
    return next(getattr(o, name) for o in objects if o is not None and hasattr(o, name))


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, CompTrainingArguments]:
    parser = build_parser()
    try:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:  # unknown flags, transformers' own checks in TrainingArguments
        text = " ".join(str(err).split())
        unused = "Some specified arguments are not used by the HfArgumentParser: "
        parser.error(f"unknown flag(s) {text[len(unused):]} (see `comp train --help`)"
                     if text.startswith(unused) else text)

    if training_args.fsdp:
        parser.error("--fsdp is not supported: comp train shards with DeepSpeed ZeRO-3 "
                     "(--deepspeed scripts/zero3.json) or ZeRO-2 (scripts/zero2.json), the engines "
                     "its tests run; on CPU accelerate would silently replace FSDP with DDP")
    problems = flag_problems(model_args, data_args, training_args)
    if problems:
        parser.error("; ".join(problems))
    return model_args, data_args, training_args
