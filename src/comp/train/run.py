"""``comp train`` / ``python -m comp.train``: parse -> build -> run one training step.

A step's ``output_dir`` holds a CoMP-MM checkpoint (model + processor) that the next step
names as ``--model_name_or_path``; the trained encoder travels inside it. When
``model_name_or_path`` is an LLM instead, a new CoMP-MM is built around it with the encoder
of ``--custom_visual_model``.
"""
from __future__ import annotations

import json
import logging
import os

import sys
from pathlib import Path

import torch
import transformers

from comp.data.collator import DataCollator
from comp.data.dataset import MixtureDataset
from comp.data.index import JSONSyntaxError

from comp.data.lengths import shared_lengths
from comp.data.processor import CompProcessor
from comp.data.sampler import ModalityLengthGroupedSampler
from comp.errors import UserError, ensure_writable_dir
from comp.files import disk_full_is_user_error, file_sha256, refuse_output_over_input

from comp.models.alignment import UNIFORM_PRIOR
from comp.models.kinds import load_comp_mm, require_kind
from comp.models.mllm import CompForConditionalGeneration
from comp.train.args import (CompTrainingArguments, DataArguments, ModelArguments, parse_args,
                             parse_tunable_parts)
from comp.train.trainer import (CompTrainer, checkpoint_fingerprint, checkpoint_problem,
                                last_complete_checkpoint, model_fingerprint, set_tunable_parts)
from comp.train.ownership import (OutputLock, accepted_runs, foreign_checkpoints, record_run,
                                  refuse_foreign, run_id, run_identity)



logger = logging.getLogger("comp.train")

_ALIGNMENT_FIELDS = ("loss_weight", "embed_temp", "word_temp", "word_eps", "sinkhorn_iters",
                     "prior_mode", "lm_loss_chunk_size")


def image_settings(data_args: DataArguments) -> dict:
    """Processor settings of this step; they override what a previous step saved."""
    return {"max_num_vistoken": data_args.max_num_vistoken,
            "min_num_vistoken": data_args.min_num_vistoken,
            "force_resize": data_args.force_resize}


def build_model(model_args: ModelArguments, data_args: DataArguments,
                dtype: torch.dtype | None = None) -> tuple[CompForConditionalGeneration, CompProcessor]:
    source = model_args.model_name_or_path
    kind = require_kind(source, "comp-mm", "llm")
    if kind == "comp-mm":
        if model_args.custom_visual_model:
            logger.warning("--custom_visual_model is ignored: %s is a CoMP-MM checkpoint whose "
                           "encoder continues training", source)
        model = load_comp_mm(source, dtype=dtype)
        processor = CompProcessor.from_pretrained(source, **image_settings(data_args))
        model.resize_vocab(len(processor.tokenizer), model_args.vocab_rows)  # no-op once resized
    else:
        if not model_args.custom_visual_model:
            raise UserError("this LLM is no CoMP-MM checkpoint, so a new one is built around it",
                            source, "name its encoder with --custom_visual_model (a SigLIP/DINOv2/"
                            "AIMv2 or CoMP-VFM directory)")
        require_kind(model_args.custom_visual_model, "vfm", "comp-vfm")
        processor = CompProcessor.from_components(source, model_args.custom_visual_model,
                                                  **image_settings(data_args))
        model = CompForConditionalGeneration.from_components(
            source, model_args.custom_visual_model, tokenizer=processor.tokenizer,
            use_rope=bool(model_args.use_rope), dtype=dtype, vocab_rows=model_args.vocab_rows,
            new_merger=bool(model_args.new_merger))
    configure(model, model_args)
    return model, processor


def word_prior_for_step(config, wanted: str | None) -> str | None:
    """The prior file (or "uniform") of this step. Without ``--word_dist_path`` a continued
    CoMP-MM reuses the prior its config records, if that file is unchanged; otherwise this
    says why not. A different prior than the recorded one is allowed, with a warning."""
    recorded, sha = config.word_prior_source, config.word_prior_sha256
    if wanted is not None:
        if sha and wanted != UNIFORM_PRIOR and Path(wanted).is_file() and file_sha256(wanted) != sha:
            logger.warning("--word_dist_path %s differs from the prior the checkpoint trained with "
                           "(%s, sha256 %s)", wanted, recorded, sha[:12])
        return wanted
    if recorded is None:
        return None  # log_word_prior raises with the hint
    if recorded == UNIFORM_PRIOR:
        logger.info("word prior: uniform, as the checkpoint trained")
        return UNIFORM_PRIOR
    if not Path(recorded).is_file():
        raise UserError(f"the checkpoint trained with this word prior (sha256 {sha}), which no "
                        "longer exists", recorded, "pass --word_dist_path")
    if sha and file_sha256(recorded) != sha:
        raise UserError(f"the word prior changed since the checkpoint trained with it (sha256 {sha})",
                        recorded, "pass --word_dist_path to use it anyway")
    logger.info("word prior: %s, as the checkpoint trained (sha256 %s)", recorded, (sha or "")[:12])
    return recorded


def check_resume_prior(checkpoint: str | Path, config) -> None:
    """A resume must use the prior the interrupted run used (same checksum)."""
    saved = Path(checkpoint) / "config.json"
    if not config.use_alignment_loss or not saved.exists():
        return
    raw = json.loads(saved.read_text())
    before = _prior_identity(raw.get("word_prior_source"), raw.get("word_prior_sha256"))
    now = _prior_identity(config.word_prior_source, config.word_prior_sha256)
    if raw.get("word_prior_source") and before != now:
        raise UserError(f"the checkpoint trained with the word prior {raw.get('word_prior_source')} "
                        f"({before}) but this run uses {config.word_prior_source} ({now})",
                        checkpoint, "resume with the same --word_dist_path")


def _prior_identity(source: str | None, sha: str | None) -> str | None:
    return UNIFORM_PRIOR if source == UNIFORM_PRIOR else sha


def configure(model: CompForConditionalGeneration, model_args: ModelArguments) -> None:
    """This step's switches: rope, position order and interpolation, alignment loss and prior,
    tunable parts."""
    model.config.vision_config.use_rope = bool(model_args.use_rope)
    if model_args.pos_order is not None:
        model.config.vision_config.pos_order = model_args.pos_order
    model.config.vision_config.pos_interp_mode = model_args.pos_interp_mode
    model.config.use_alignment_loss = bool(model_args.use_alignment_loss)
    for name in _ALIGNMENT_FIELDS:
        setattr(model.config, name, getattr(model_args, name))
    if model.config.use_alignment_loss:
        prior = word_prior_for_step(model.config, model_args.word_dist_path)
        try:
            model.set_word_prior(prior, pad=model_args.word_dist_pad)
        except (ValueError, OSError) as err:  # empty, truncated, text, NaN, negative, 2-D, too short
            raise UserError(f"the word prior cannot be used: {' '.join(str(err).split())}", prior, "write it with `comp data prior DATA --tokenizer LLM --out FILE`, or pass "
                            "--word_dist_path uniform for the ablation") from None
    set_tunable_parts(model, parse_tunable_parts(model_args.mm_tunable_parts))


def build_data(data_args: DataArguments, processor: CompProcessor, training_args: CompTrainingArguments):
    try:
        dataset = MixtureDataset.from_yaml(
            data_args.data_path, processor.tokenizer, processor.image_processor,
            data_root=data_args.data_root, image_folder=data_args.image_folder,
            model_max_length=data_args.model_max_length, seed=training_args.seed,
            prompt_format=data_args.prompt_format, align_max_length=data_args.align_max_length or None)
    except (JSONSyntaxError, FileNotFoundError) as err:  # a data file that cannot be indexed
        raise UserError(str(err), None, "fix the file, or find the bad records with `comp data check`") from None
    collator = DataCollator(pad_token_id=processor.tokenizer.pad_token_id, pack_length=data_args.pack_length)
    sampler = None
    if training_args.group_by_modality_length:
        sampler = ModalityLengthGroupedSampler(
            shared_lengths(dataset, data_args.length_cache_dir, data_args.length_workers),
            batch_size=training_args.per_device_train_batch_size,
            world_size=training_args.world_size,
            grad_accum_steps=training_args.gradient_accumulation_steps, seed=training_args.seed)
    return dataset, collator, sampler


_NO_RESUME = (None, "", "False", "false", "0")
_AUTO_RESUME = ("auto", "True", "true", "1")


def _named_checkpoint(training_args: CompTrainingArguments) -> str | None:
    """The checkpoint ``--resume_from_checkpoint`` names (None: none, or auto)."""
    wanted = training_args.resume_from_checkpoint
    return None if wanted in _NO_RESUME + _AUTO_RESUME else wanted


def resume_point(training_args: CompTrainingArguments, model=None, runs: set[str] | None = None) -> str | None:
    """``--resume_from_checkpoint auto`` (or ``True``) = the newest checkpoint of ``runs``
    (None: of any run) that verifies (newer ones that do not are named and skipped); a named
    checkpoint must verify. With ``model``, a checkpoint of another architecture or
    vocabulary is refused."""
    wanted = training_args.resume_from_checkpoint
    if wanted in _NO_RESUME:
        return None
    if wanted in _AUTO_RESUME:
        found = last_complete_checkpoint(training_args.output_dir, runs=runs)
    else:
        found = Path(wanted)
        why = checkpoint_problem(found)
        if why is not None:
            raise UserError(f"cannot resume from this checkpoint: {why}", found,
                            "name a checkpoint that `comp train` finished writing, or use auto")
    if found is not None and model is not None:
        theirs = checkpoint_fingerprint(found)
        if theirs is not None and theirs != model_fingerprint(model):
            raise UserError("the checkpoint belongs to another model (different parameters or "
                            "shapes than this run's)", found,
                            "use a fresh --output_dir, or the --model_name_or_path that wrote it")
    return str(found) if found else None


def start_deepspeed_comm(training_args: CompTrainingArguments) -> None:
    """Under ZeRO-3 a saved CoMP-MM is built already partitioned (transformers' sharded init),
    which asks DeepSpeed's communication layer for the world size. accelerate does not start
    that layer on every path (not with ``--use_cpu``), and without it every rank believes it is
    alone and DeepSpeed's batch-size check fails; so start it on the process group first."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not (training_args.deepspeed and is_deepspeed_zero3_enabled()):
        return
    import deepspeed

    dist = torch.distributed
    backend = dist.get_backend() if dist.is_initialized() else ("gloo" if training_args.use_cpu else "nccl")
    deepspeed.init_distributed(dist_backend=backend)


class RunClaim:
    """This run's identity in its output directory: the run ids whose checkpoints it may
    resume and rotate, and (main process) another run's checkpoints found there, refused
    up front unless --overwrite_output_dir; ``record`` writes the claim once the resume
    point verified."""

    def __init__(self, model_args: ModelArguments, data_args: DataArguments,
                 training_args: CompTrainingArguments):
        self.args = training_args
        self.identity = run_identity(model_args, data_args, training_args)
        self.run = run_id(self.identity)
        self.runs = accepted_runs(training_args.output_dir, self.run, _named_checkpoint(training_args))
        self.foreign = foreign_checkpoints(training_args.output_dir, self.runs) if training_args.should_save else []
        if self.foreign and not training_args.overwrite_output_dir:
            refuse_foreign(training_args.output_dir, self.foreign, self.identity)

    def record(self) -> None:
        if self.args.should_save:
            record_run(self.args.output_dir, self.identity, self.runs, self.foreign)


def trained_nothing(trainer: CompTrainer, dataset, resumed: bool) -> str | None:
    """Why the run ends without having trained (None: it trained, or a resumed run had
    nothing left to do)."""
    args = trainer.args
    if trainer.state.global_step == 0:
        return (f"0 optimizer steps: {len(dataset)} samples give no step with "
                f"--per_device_train_batch_size {args.per_device_train_batch_size} x "
                f"{args.world_size} process(es) x --gradient_accumulation_steps "
                f"{args.gradient_accumulation_steps}, --max_steps {args.max_steps}, "
                f"--num_train_epochs {args.num_train_epochs:g}")
    if trainer.steps_with_data == 0 and not resumed:
        summary = "; ".join(line.strip() for line in trainer.skip_stats.summary().splitlines())
        return f"every sample of its {trainer.state.global_step} step(s) was skipped ({summary})"

    return None


def train(model_args: ModelArguments, data_args: DataArguments,
          training_args: CompTrainingArguments, callbacks: list | None = None) -> CompTrainer:
    """Train one step into ``output_dir``, which this process holds locked meanwhile."""
    transformers.set_seed(training_args.seed)
    start_deepspeed_comm(training_args)
    lock = None
    refuse_output_over_input(training_args.output_dir, [model_args.model_name_or_path,
                             model_args.custom_visual_model], flag="--output_dir", nested=False)
    if training_args.should_save:
        ensure_writable_dir(training_args.output_dir)
        lock = OutputLock(training_args.output_dir).acquire()
    try:
        return _train(model_args, data_args, training_args, callbacks)
    except KeyboardInterrupt as err:
        err.hint = interrupted_hint(model_args, data_args, training_args)
        raise
    finally:
        if lock is not None:
            lock.release()


def interrupted_hint(model_args: ModelArguments, data_args: DataArguments,
                     training_args: CompTrainingArguments) -> str:
    """What to run after Ctrl-C: resume from the newest checkpoint of this run, if any."""
    runs = accepted_runs(training_args.output_dir, run_id(run_identity(model_args, data_args, training_args)),
                         _named_checkpoint(training_args))
    last = last_complete_checkpoint(training_args.output_dir, runs=runs, report=lambda *_: None)

    if last is None:
        return "no checkpoint was saved; run the same command again (--save_steps keeps progress)"
    return f"resume with the same flags and --resume_from_checkpoint auto (newest checkpoint: {last})"



def _train(model_args: ModelArguments, data_args: DataArguments,
           training_args: CompTrainingArguments, callbacks: list | None) -> CompTrainer:
    claim = RunClaim(model_args, data_args, training_args)  # before any work
    dtype = torch.bfloat16 if training_args.bf16 else None
    model, processor = build_model(model_args, data_args, dtype)
    resume = resume_point(training_args, model, claim.runs)  # verified and of this model
    if resume:
        check_resume_prior(resume, model.config)
    claim.record()
    dataset, collator, sampler = build_data(data_args, processor, training_args)
    if len(dataset) == 0:
        raise UserError("the data selects no records", data_args.data_path,
                        "check its sampling_strategy entries and JSON files (`comp data check`)")
    trainer = CompTrainer(
        model=model, args=training_args, train_dataset=dataset, data_collator=collator,
        processing_class=processor,
        vision_lr=training_args.mm_vision_tower_lr, projector_lr=training_args.mm_projector_lr,
        max_skip_fraction=data_args.max_skip_fraction, train_sampler=sampler,
        reference_groups=training_args.reference_optimizer_groups,
        lm_loss_normalization=training_args.lm_loss_normalization, callbacks=callbacks,
        run=claim.run, runs=claim.runs)
    trainer.train(resume_from_checkpoint=resume)
    logger.info("data: %s", trainer.skip_stats.summary())
    why = trained_nothing(trainer, dataset, bool(resume))
    if why is not None:
        raise UserError(f"the run trained nothing: {why}", training_args.output_dir,
                        "fix the data or the step flags; the untrained model was not saved")
    trainer.stop_if_weights_not_finite("the final model")
    with disk_full_is_user_error(training_args.output_dir, lambda: f"free space, then {trainer.resume_hint()}"):
        trainer.save_model(training_args.output_dir)
        if trainer.args.should_save:
            processor.save_pretrained(training_args.output_dir)
            trainer.state.save_to_json(str(Path(training_args.output_dir) / "trainer_state.json"))
    return trainer


def exit_distributed(code: int) -> None:
    """End a process of a multi-process run once every rank is done, without interpreter
    finalisation.

    Gloo's worker threads release finished work objects, and with them tensors owned by
    Python, whenever they get to it; when that happens while the interpreter finalises, the
    thread cannot take the GIL, is unwound and the process aborts ("terminate called without
    an active exception", exit -6) after a successful run, and the recipe stops there (seen
    in about 1 of 6 ZeRO-3 runs on CPU; the stack was read with gdb). The process group has no
    call that stops those threads, so, after a barrier (every checkpoint is written and
    closed) and with output flushed, the process leaves with ``os._exit``."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    train(*parse_args(argv))
    exit_distributed(0)
    return 0
