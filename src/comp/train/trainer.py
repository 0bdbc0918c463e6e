"""CompTrainer: transformers' Trainer with CoMP's parameter groups, loss bookkeeping and
crash-safe checkpoints. DeepSpeed ZeRO-2/3, mixed precision, schedulers and logging
integrations come from transformers / accelerate unchanged.

Loss normalisation: each optimizer step's loss is the LM loss summed over the step's
supervised tokens on all ranks and micro-batches, divided by their global count, plus
``loss_weight`` x the alignment loss summed over the step's image samples, divided by their
global count. So the curve does not depend on how a global batch is split across processes or
accumulation steps. ``lm_loss_normalization="micro_batch"`` gives the reference's instead:
each micro-batch's token mean, divided by the accumulation steps and averaged over ranks.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINING_ARGS_NAME

from comp.data.collator import Batch
from comp.data.dataset import SkipStats, TooManySkips

from comp.errors import UserError
from comp.files import atomic_output, disk_full_is_user_error, file_sha256
from comp.tokens import IGNORE_INDEX
from comp.train.ownership import CHECKPOINT_PREFIX, COMPLETE_MARKER, marker_run

logger = logging.getLogger(__name__)

SKIP_VERDICT_SAMPLES = 1000
# Every sample skipped: judged after this fraction of the data (at least one optimizer step's
# samples, at most SKIP_VERDICT_SAMPLES), not after 1000 samples a short run never reaches.
ALL_SKIPPED_VERDICT_FRACTION = 0.01
# What a checkpoint needs to resume the run exactly (besides its weights).
STATE_FILES = ("trainer_state.json",)
OPTIMIZER_FILES = ("optimizer.pt", "scheduler.pt")


class SkippedTooMany(UserError, TooManySkips):
    """More samples were skipped than --max_skip_fraction allows: the one-line form."""


class NonFiniteError(UserError):
    """The loss, the gradient norm or a weight is NaN or infinite: training stops, nothing is saved."""


def non_finite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter holding NaN or inf on this process (under ZeRO-3 the
    process's shard of it), or None."""
    for name, param in model.named_parameters():
        data = getattr(param, "ds_tensor", None)
        data = param.data if data is None else data
        if data.numel() and not bool(torch.isfinite(data).all()):
            return name
    return None


@dataclass
class StepCounts:
    """One optimizer step, counted when its micro-batches are fetched: the global (all ranks,
    all micro-batches) loss denominators, whether every sample of the step was skipped on
    every rank, and this rank's records and visual tokens (for messages and logs)."""
    supervised_tokens: torch.Tensor
    align_samples: torch.Tensor
    empty: bool = False
    records: list[str] = field(default_factory=list)
    visual_tokens: int = 0


def part_of(name: str) -> str:
    """The reference's tunable part a parameter belongs to."""
    if name.startswith("visual.merger."):
        return "mm_mlp_adapter"
    if name.startswith("visual."):
        return "mm_vision_tower"
    if name.startswith("lm_head."):
        return "mm_lm_head"
    return "mm_language_model"


def set_tunable_parts(model: torch.nn.Module, parts: list[str]) -> None:
    """Freeze everything outside ``parts``. A tied embedding/lm_head matrix (registered once,
    as ``model.embed_tokens.weight``) trains when either mm_language_model or mm_lm_head does."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, param in model.named_parameters():
        part = part_of(name)
        wanted = part in parts
        if tied and name == "model.embed_tokens.weight":
            wanted = bool({"mm_language_model", "mm_lm_head"} & set(parts))
        param.requires_grad_(wanted)


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    return param.dim() < 2 or "norm" in name or name.endswith(".bias")


def param_groups(model: torch.nn.Module, *, lr: float, vision_lr: float | None,
                 projector_lr: float | None, weight_decay: float, reference: bool = False) -> list[dict]:
    """Optimizer groups: the vision lr covers the encoder but not the merger; the projector
    lr covers the merger (the base lr without one); biases and norms get no weight decay.

    ``reference=True`` reproduces the reference's groups exactly, where the vision keyword
    claims the merger's names and then excludes "merger": with a vision lr and no projector
    lr the merger is in no group and never updated (its released Stage III)."""
    lrs = {"mm_vision_tower": vision_lr or lr, "mm_mlp_adapter": projector_lr or lr}
    merger_orphaned = reference and vision_lr is not None and projector_lr is None
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = part_of(name)
        if merger_orphaned and part == "mm_mlp_adapter":
            continue
        decay = not _no_decay(name, param)
        key = (part, decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr": lrs.get(part, lr),
                           "weight_decay": weight_decay if decay else 0.0, "part": part}
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return list(groups.values())


def module_table(model: torch.nn.Module, groups: list[dict]) -> str:
    """Parameters per tunable part: count, trainable or frozen, lr and weight decay."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, param in model.named_parameters():
        counts[part_of(name)][0] += param.numel()
        counts[part_of(name)][1] += param.numel() if param.requires_grad else 0
    lr_of = defaultdict(set)
    wd_of = defaultdict(set)
    for g in groups:
        lr_of[g["part"]].add(g["lr"])
        wd_of[g["part"]].add(g["weight_decay"])
    lines = [f"{'part':<20}{'params':>14}{'trainable':>14}  {'lr':<12}{'weight decay':<12}"]
    for part in ("mm_vision_tower", "mm_mlp_adapter", "mm_language_model", "mm_lm_head"):
        total, trainable = counts.get(part, [0, 0])
        lr = ",".join(f"{v:g}" for v in sorted(lr_of[part])) or ("no group" if trainable else "frozen")
        wd = ",".join(f"{v:g}" for v in sorted(wd_of[part])) or "-"
        if part == "mm_lm_head" and getattr(model.config, "tie_word_embeddings", False):
            lr, wd = "tied to model.embed_tokens", ""
        lines.append(f"{part:<20}{total:>14,}{trainable:>14,}  {lr:<12}{wd:<12}")
    return "\n".join(lines)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / COMPLETE_MARKER).exists()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the parameter names and full shapes: the same architecture and vocabulary give
    the same value, another model's checkpoints a different one."""
    h = hashlib.sha256()
    for name, param in model.named_parameters():
        shape = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3: the unpartitioned shape
        h.update(f"{name}:{shape};".encode())
    return h.hexdigest()[:16]


def _checkpoint_files(checkpoint: Path) -> list[Path]:
    return [path for path in sorted(checkpoint.rglob("*"))
            if path.is_file() and path.name != COMPLETE_MARKER
            and not path.name.startswith(f".{COMPLETE_MARKER}.")]  # atomic_output's temporary


def checkpoint_manifest(checkpoint: Path) -> dict[str, int]:
    """Every file under ``checkpoint`` (relative path -> size in bytes), the marker aside."""
    return {str(path.relative_to(checkpoint)): path.stat().st_size for path in _checkpoint_files(checkpoint)}


def checkpoint_checksums(checkpoint: Path) -> dict[str, str]:
    """Every file under ``checkpoint`` (relative path -> sha256): the marker records them so
    that resuming verifies content, not only sizes (a flipped byte keeps the size)."""
    return {str(path.relative_to(checkpoint)): file_sha256(path) for path in _checkpoint_files(checkpoint)}


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot resume the run exactly, or None when it verifies: the marker
    lists every file with its size and sha256 (a truncated, missing or altered file fails),
    the trainer state must parse, and the optimizer and scheduler state must be there unless
    the marker says the checkpoint holds the model only."""
    marker = checkpoint / COMPLETE_MARKER
    if not marker.exists():
        return "no COMPLETE marker (its writing never finished)"
    try:
        info = json.loads(marker.read_text())
        files, checksums = dict(info["files"]), dict(info["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return (f"its {COMPLETE_MARKER} marker lists no files and checksums (unreadable, or "
                "written by an older version)")
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the marker recorded {size} (truncated?)"
        if name not in checksums:
            return f"its marker records no checksum of {name}"
        if file_sha256(path) != checksums[name]:
            return f"{name} does not match the checksum its marker recorded (damaged after saving)"
    for name in STATE_FILES:
        if name not in files:
            return f"it has no {name}"
        try:
            json.loads((checkpoint / name).read_text())
        except (OSError, ValueError) as err:
            return f"{name} does not parse ({err})"
    has_deepspeed_state = any(name.startswith("global_step") for name in files)
    if not info.get("model_only") and not has_deepspeed_state:
        lacking = [name for name in OPTIMIZER_FILES if name not in files]
        if lacking:
            return f"it has no {' or '.join(lacking)}: resuming would restart the optimizer and schedule"
    return None


def last_complete_checkpoint(output_dir: str | Path, *, report=None,
                             runs: set[str] | None = None) -> Path | None:
    """The newest checkpoint that verifies (``checkpoint_problem``); each newer one that does
    not is passed to ``report(path, why)`` (default: a warning) and skipped. With ``runs``,
    only checkpoints whose marker names one of those run ids count."""
    candidates = []
    for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit() and is_complete(path) and (runs is None or marker_run(path) in runs):
            candidates.append((int(suffix), path))
    for _, path in sorted(candidates, reverse=True):
        why = checkpoint_problem(path)
        if why is None:
            return path
        (report or _warn_skipped)(path, why)
    return None


def _warn_skipped(path: Path, why: str) -> None:
    logger.warning("not resuming from %s: %s; trying the previous checkpoint", path, why)


def checkpoint_fingerprint(checkpoint: Path) -> str | None:
    """The model fingerprint a checkpoint's marker recorded (None for older markers)."""
    try:
        return json.loads((checkpoint / COMPLETE_MARKER).read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None


# The transformers Trainer methods CompTrainer overrides: the parameters they had in the versions
# this was checked against (transformers 5.24-5.25; pyproject pins that range) and why each is
# overridden. Everything goes through public methods and TrainerCallback events; a private
# (underscore) method is here only where no public route exists. ``check_trainer_hooks`` runs
# when a CompTrainer is built and stops the run with this table rather than silently
# mis-training; tests/test_trainer_contract.py fails when a private override is missing here.
# ``None``: the override passes its arguments through unchanged, whatever they are.
TRAINER_HOOKS: dict[str, tuple[tuple[str, ...] | None, str]] = {
    "_get_train_sampler": (("self", "train_dataset"),
                           "private, the only route: the modality-length-grouped sampler of "
                           "comp.data.sampler; get_train_dataloader builds the loader (accelerate's "
                           "sharding, workers, seeds) around this sampler and takes none as an argument"),
    "get_batch_samples": (("self", "epoch_iterator", "num_batches", "device"),
                          "each optimizer step's micro-batches, counted once: skipped samples "
                          "(--max_skip_fraction), the step-global loss denominators, an empty step"),
    "compute_loss": (("self", "model", "inputs", "return_outputs", "num_items_in_batch"),
                     "the LM and alignment losses normalised over the whole step"),
    "create_optimizer": (("self", "model"), "CoMP's parameter groups; the empty-step guard's hooks"),
    "log": (("self", "logs", "start_time"), "loss parts, tokens, skipped samples and each group's lr"),
    "save_model": (("self", "output_dir", "_internal_call"),
                   "a checkpoint's weights are checked finite before it is written, the "
                   "checkpoint being written is remembered, and training_args.bin records the "
                   "run's save_total_limit"),
    "train": (None, "a checkpoint whose writing failed is removed; a full disk is one line"),
}
# Public Trainer attributes CompTrainer sets (read by training_step).
TRAINER_ATTRIBUTES = {
    "loss_is_scaled_for_ga": "compute_loss already normalises over the step: no division by the accumulation steps",
}


def hook_changes(base: type, table: dict) -> list[str]:
    """Entries of ``table`` (name -> (parameters or None, why)) that ``base`` no longer has, or
    has with other parameters."""
    import inspect

    changed = []
    for name, (expected, _) in table.items():
        hook = getattr(base, name, None)
        if hook is None:
            changed.append(f"{name} is gone")
            continue
        params = tuple(inspect.signature(hook).parameters)
        if expected is not None and params != expected:
            changed.append(f"{name}{expected} is now {name}{params}")
    return changed


def check_trainer_hooks(trainer_cls: type = Trainer) -> None:
    """Raise when a Trainer method CompTrainer overrides changed its parameters or is gone, when
    a public attribute it sets is gone, or when a TrainerCallback event its callbacks listen to
    no longer exists."""
    import transformers
    from transformers import TrainerCallback

    changed = hook_changes(trainer_cls, TRAINER_HOOKS)
    changed += [f"the Trainer attribute {name} is gone" for name in TRAINER_ATTRIBUTES
                if not hasattr(trainer_cls, name)]
    changed += [f"the TrainerCallback event {name} is gone" for name in callback_events()
                if not hasattr(TrainerCallback, name)]
    if changed:
        raise RuntimeError(
            f"transformers {transformers.__version__}: Trainer hooks that CompTrainer overrides have "
            f"changed ({'; '.join(changed)}); CoMP was checked against transformers 5.24-5.25: "
            "install one of those (pip install 'transformers>=5.24,<5.26') or update "
            "comp.train.trainer")


def callback_events() -> set[str]:
    """The TrainerCallback events CompTrainer's callbacks listen to."""
    return {name for cls in (EmptyStepGuard, CompEvents) for name in vars(cls) if name.startswith("on_")}


class EmptyStepGuard(TrainerCallback):
    """An optimizer step whose samples were all skipped (on every process) leaves the weights,
    the optimizer state and the learning-rate schedule as they were: its zero gradients would
    still move AdamW's weights (momentum, weight decay) and the schedule would advance.

    Public routes only: torch's optimizer step hooks hide the parameters from that one step
    (also the inner optimizer DeepSpeed steps), and the scheduler's state taken before the step
    is loaded back after it (DeepSpeed steps the scheduler inside backward, before
    ``on_optimizer_step``; the Trainer after it, before ``on_step_end``)."""

    def __init__(self):
        self.empty = False
        self._hidden: list | None = None
        self._schedule: tuple | None = None  # (scheduler, optimizer, its state, the groups' lrs)

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.register_step_pre_hook(self._hide_parameters)
        optimizer.register_step_post_hook(self._show_parameters)

    def begin_step(self, empty: bool, scheduler, optimizer) -> None:
        """Called when the step's micro-batches are fetched, before its first forward."""
        self.empty = empty
        self._schedule = None
        if empty and scheduler is not None and optimizer is not None:
            self._schedule = (scheduler, optimizer, copy.deepcopy(scheduler.state_dict()),
                              [group["lr"] for group in optimizer.param_groups])

    def _hide_parameters(self, optimizer, args, kwargs) -> None:
        if self.empty:
            self._hidden = [group["params"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["params"] = []

    def _show_parameters(self, optimizer, args, kwargs) -> None:
        if self._hidden is not None:
            for group, params in zip(optimizer.param_groups, self._hidden):
                group["params"] = params
            self._hidden = None

    def _restore_schedule(self) -> None:
        if self._schedule is not None:
            scheduler, optimizer, state, lrs = self._schedule
            scheduler.load_state_dict(copy.deepcopy(state))
            for group, lr in zip(optimizer.param_groups, lrs):
                group["lr"] = lr

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._restore_schedule()

    def on_step_end(self, args, state, control, **kwargs):
        self._restore_schedule()
        self.empty, self._schedule = False, None


class CompEvents(TrainerCallback):
    """CompTrainer's part of the Trainer's public events: gradients checked finite before the
    optimizer step, and each checkpoint marked complete and rotated once it is written."""

    def __init__(self, trainer: CompTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.stop_if_gradients_not_finite()

    def on_save(self, args, state, control, **kwargs):
        self.trainer.mark_checkpoint_complete()


class CompTrainer(Trainer):
    loss_is_scaled_for_ga = True  # compute_loss normalises over the whole step

    def __init__(self, model=None, args: TrainingArguments | None = None, *trainer_args,
                 vision_lr: float | None = None,
                 projector_lr: float | None = None, max_skip_fraction: float = 0.01,
                 train_sampler=None, reference_groups: bool = False,
                 lm_loss_normalization: str = "step", run: str | None = None,
                 runs: set[str] | None = None, **kwargs):
        self.vision_lr, self.projector_lr = vision_lr, projector_lr
        self.run, self.runs = run, runs  # this run's id; the ids whose checkpoints it rotates
        self.steps_with_data = 0  # optimizer steps with at least one sample on some process
        self.reference_groups = reference_groups
        self.lm_loss_normalization = lm_loss_normalization
        self.max_skip_fraction = max_skip_fraction
        self.skip_stats = SkipStats()
        self.step_counts: StepCounts | None = None  # the current optimizer step's
        self.empty_steps = EmptyStepGuard()
        self._custom_sampler = train_sampler
        self._parts_sum: dict[str, float] = defaultdict(float)
        self._last_parts_step = 0
        self._writing: Path | None = None  # the checkpoint being written
        check_trainer_hooks()
        # Rotation is CoMP's (_rotate: complete checkpoints of this run only). The Trainer's
        # own, which counts unfinished checkpoints and other runs' and deletes before the
        # COMPLETE marker exists, must never run: it gets a copy of the arguments without a
        # limit, made once here, before the run.
        self.save_total_limit = args.save_total_limit if args is not None else None
        if args is not None and args.save_total_limit is not None:
            args = copy.copy(args)
            args.save_total_limit = None
        super().__init__(model, args, *trainer_args, **kwargs)
        self.add_callback(self.empty_steps)
        self.add_callback(CompEvents(self))

    # ---------------------------------------------------------------- data
    def _get_train_sampler(self, train_dataset=None):
        if self._custom_sampler is not None:
            return self._custom_sampler
        return super()._get_train_sampler(train_dataset)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches, and as ``num_items_in_batch`` its supervised-token count
        over all processes (``self.step_counts`` holds the rest of the step's counts)."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        for batch in batches:
            self.skip_stats.update(batch.num_samples, batch.skipped)
        try:
            self.skip_stats.check(self.max_skip_fraction, min_samples=self._skip_verdict_samples(len(batches)))
        except TooManySkips as err:
            summary = "; ".join(line.strip() for line in self.skip_stats.summary().splitlines())
            raise SkippedTooMany(f"too many bad samples, more than --max_skip_fraction "
                                 f"{self.max_skip_fraction:g} ({summary})", self.args.output_dir,
                                 "fix the data (`comp data check`) or raise --max_skip_fraction") from err
        self.step_counts = self._count_step(batches, device)  # every rank: a collective
        self.steps_with_data += not self.step_counts.empty
        if self.step_counts.empty and batches:
            logger.warning("step %d: every sample was skipped; the weights, optimizer and schedule "
                           "stay as they are", self.state.global_step + 1)
        self.empty_steps.begin_step(self.step_counts.empty, self.lr_scheduler, self.optimizer)
        return batches, self.step_counts.supervised_tokens

    def _skip_verdict_samples(self, micro_batches: int) -> int:
        """Samples seen before the skip fraction is judged, so one early bad batch is no verdict:
        1000 (or the whole data), but when every sample so far was skipped, a proportion of
        the data (at least one optimizer step's samples)."""
        size = len(self.train_dataset)
        if self.skip_stats.kept == 0 and self.max_skip_fraction < 1:
            step = micro_batches * self.args.per_device_train_batch_size * max(1, self.args.world_size)
            return min(size, SKIP_VERDICT_SAMPLES, max(step, math.ceil(ALL_SKIPPED_VERDICT_FRACTION * size)))
        return min(SKIP_VERDICT_SAMPLES, size)

    def _count_step(self, batches: list[Batch], device) -> StepCounts:
        tokens = sum(int((b.inputs["labels"][..., 1:] != IGNORE_INDEX).sum()) for b in batches)
        align = sum(int(_align_mask(b).sum()) for b in batches)
        both = torch.tensor([tokens, align], dtype=torch.float64, device=device)
        if self.args.world_size > 1:
            both = self.accelerator.gather(both.view(1, 2)).sum(0)
        return StepCounts(
            supervised_tokens=both[0].clamp(min=1), align_samples=both[1].clamp(min=1),
            empty=bool(both.sum() == 0),  # every sample of the step (all processes) skipped
            records=[r for b in batches for r in b.record_ids],
            visual_tokens=sum(int(b.inputs["image_grid_thw"].prod(-1).sum())
                              for b in batches if b.inputs["image_grid_thw"] is not None))

    # ---------------------------------------------------------------- optimisation
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = param_groups(self.model, lr=self.args.learning_rate, vision_lr=self.vision_lr,
                                  projector_lr=self.projector_lr, weight_decay=self.args.weight_decay,
                                  reference=self.reference_groups)
            if self.args.should_log:
                logger.info("modules:\n%s", module_table(self.model, groups))
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            kwargs.pop("lr", None)
            for g in groups:
                g.pop("names")
            self.optimizer = cls(groups, **kwargs)
            self.empty_steps.watch(self.optimizer)
        return self.optimizer

    # ---------------------------------------------------------------- non-finite numbers
    def _stop_if_non_finite(self, outputs, batch: Batch) -> None:
        """Raise NonFiniteError on every rank when any rank's loss is NaN or infinite, naming
        the step, the loss parts and the micro-batch's records (before backward: the weights
        and the last good checkpoint stay as they are)."""
        loss = outputs.loss.detach()
        bad = (~torch.isfinite(loss)).any().float().view(1)
        if self.args.world_size > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if float(bad) > 0:
            parts = {"loss": outputs.loss, "lm_loss": outputs.lm_loss, "align_loss": outputs.align_loss}
            shown = ", ".join(f"{k} {float(v.detach()):.6g}" for k, v in parts.items() if v is not None)
            records = batch.record_ids
            raise NonFiniteError(
                f"step {self.state.global_step + 1}: the loss is not finite ({shown}) on records "
                f"{records[:8]}{' ...' if len(records) > 8 else ''}", self.args.output_dir,
                "nothing was saved; lower --learning_rate, check --embed_temp/--word_temp/"
                f"--loss_weight and these records, then {self.resume_hint()}")

    def gradient_norm(self) -> float | None:
        """The step's global gradient norm once its gradients are complete; None before any.
        DeepSpeed: the engine's, from the step it took inside backward. Otherwise the norm of
        the (all-reduced) gradients after the Trainer clipped them, which is finite exactly
        when the norm before clipping was."""
        if self.is_deepspeed_enabled:
            norm = self.model_wrapped.get_global_grad_norm()
            return None if norm is None else float(norm)
        norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32)
                 for p in self.model.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None

    def stop_if_gradients_not_finite(self) -> None:
        """Raise NonFiniteError with the step's records when its gradient norm is NaN or inf
        (before the optimizer step; under DeepSpeed after it, before anything is saved). The
        norm is the same on every process."""
        norm = self.gradient_norm()
        if norm is not None and not math.isfinite(norm):
            records = self.step_counts.records if self.step_counts is not None else []
            raise NonFiniteError(
                f"step {self.state.global_step + 1}: the gradient norm is {norm} "
                f"(records {records[:8]}{' ...' if len(records) > 8 else ''})", self.args.output_dir,
                "nothing was saved; lower --learning_rate or check the loss settings, then "
                f"{self.resume_hint()}")

    def compute_loss(self, model, inputs: Batch, return_outputs=False, num_items_in_batch=None):
        """With ``num_items_in_batch`` (a training step's, see get_batch_samples) the losses are
        summed over this micro-batch and divided by the step's global counts; without it, the
        model's own means."""
        counts = self.step_counts if num_items_in_batch is not None else None
        batch = inputs.to(self.args.device)  # a no-op where accelerate's loader placed it
        if batch.inputs["input_ids"].numel() == 0:  # every sample of this micro-batch was skipped
            zero = sum(0.0 * p.sum() for p in model.parameters() if p.requires_grad)
            return (zero, None) if return_outputs else zero
        has_align = _align_mask(batch)
        model_inputs = dict(batch.inputs)
        if counts is not None:
            model_inputs["lm_loss_normalizer"] = num_items_in_batch
            model_inputs["align_normalizer"] = counts.align_samples
            if self.lm_loss_normalization == "micro_batch":  # x num_processes below: mean / GA
                model_inputs["lm_loss_normalizer"] = micro_batch_normalizer(
                    batch.inputs["labels"], self.args.gradient_accumulation_steps, self.accelerator.num_processes)
        outputs = model(**model_inputs)
        scale = self.accelerator.num_processes if counts is not None else 1
        loss = outputs.loss * scale
        self._stop_if_non_finite(outputs, batch)
        self._parts_sum["lm_loss"] += float(outputs.lm_loss) * scale
        if outputs.align_loss is not None:
            self._parts_sum["align_loss"] += float(outputs.align_loss) * scale
        self._parts_sum["text_tokens"] += float(batch.inputs["attention_mask"].sum())
        self._parts_sum["align_samples"] += float(has_align.sum())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs and self.state.global_step:
            steps = max(1, self.state.global_step - self._last_parts_step)
            self._last_parts_step = self.state.global_step
            local = torch.tensor([self._parts_sum[k] for k in ("lm_loss", "align_loss", "text_tokens")],
                                 dtype=torch.float64, device=self.args.device)
            if self.args.world_size > 1:
                gathered = self.accelerator.gather(local.view(1, -1))
                local = torch.cat([gathered[:, :2].mean(0), gathered[:, 2:].sum(0)])
            logs["lm_loss"] = round(float(local[0]) / steps, 6)
            if self.model.config.use_alignment_loss:
                logs["align_loss"] = round(float(local[1]) / steps, 6)
            logs["text_tokens"] = float(local[2]) / steps
            logs["visual_tokens"] = self.step_counts.visual_tokens if self.step_counts is not None else 0
            logs["samples_skipped"] = self.skip_stats.skipped
            if "learning_rate" in logs and self.optimizer is not None:
                logs.update(group_learning_rates(self.optimizer.param_groups, self.args.learning_rate,
                                                 logs["learning_rate"]))
            self._parts_sum.clear()
        super().log(logs, start_time)

    def resume_hint(self) -> str:
        """How to go on after a stop: the newest checkpoint of this run that verifies, if any."""
        last = last_complete_checkpoint(self.args.output_dir, runs=self.runs, report=lambda *_: None)
        return (f"resume with --resume_from_checkpoint {last}" if last is not None
                else "start again (no checkpoint of this run verifies)")

    def stop_if_weights_not_finite(self, what: str) -> None:
        """Raise NonFiniteError on every process when any weight (any shard) holds NaN or inf,
        naming it, before ``what`` is written: the last good checkpoint stays the newest."""
        bad = non_finite_parameter(self.model)
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            bad = next((name for name in gather_object([bad]) if name), None)
        if bad is not None:
            raise NonFiniteError(
                f"step {self.state.global_step}: the weight {bad} holds NaN or inf; {what} was not "
                "written", self.args.output_dir,
                f"lower --learning_rate or check the loss settings, then {self.resume_hint()}")

    # ---------------------------------------------------------------- checkpoints
    # A checkpoint: save_model (checked weights, the old marker gone) -> transformers writes the
    # rest -> on_save: the COMPLETE marker (each file's size and sha256, this run's id), then
    # rotation. A crash at any point leaves either no marker (ignored by resume) or a whole
    # checkpoint; a failure while writing removes the unfinished checkpoint (train).
    def checkpoint_dir(self) -> Path:
        """Where transformers writes the checkpoint of the current step."""
        return Path(self.args.output_dir) / f"{CHECKPOINT_PREFIX}{self.state.global_step}"

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if output_dir is not None and Path(output_dir) == self.checkpoint_dir():
            checkpoint = Path(output_dir)
            self.stop_if_weights_not_finite(checkpoint.name)
            if self.args.should_save:  # rewritten (a resume from an older step): incomplete meanwhile
                (checkpoint / COMPLETE_MARKER).unlink(missing_ok=True)
            self._writing = checkpoint
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:  # the run's save_total_limit, not the Trainer's copy's (__init__)
            recorded = copy.copy(self.args)
            recorded.save_total_limit = self.save_total_limit
            torch.save(recorded, Path(output_dir or self.args.output_dir) / TRAINING_ARGS_NAME)

    def mark_checkpoint_complete(self) -> None:
        """After transformers wrote the step's checkpoint (every process): the marker, then
        this run's rotation."""
        checkpoint = self.checkpoint_dir()
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if not checkpoint.is_dir():
                raise RuntimeError(f"transformers saved no checkpoint at {checkpoint}: its checkpoint "
                                   "folder naming changed; update comp.train.trainer")
            _write_marker(checkpoint, {"global_step": self.state.global_step, "run": self.run,
                                       "model": model_fingerprint(self.model),
                                       "model_only": bool(self.args.save_only_model),
                                       "files": checkpoint_manifest(checkpoint),
                                       "sha256": checkpoint_checksums(checkpoint)})
            _rotate(Path(self.args.output_dir), self.save_total_limit, self.runs)
        self._writing = None
        self.accelerator.wait_for_everyone()

    def train(self, *args, **kwargs):
        """transformers' training; a failure while a checkpoint is written removes that
        checkpoint, and a full disk then ends the run with one line naming it."""
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            checkpoint, self._writing = self._writing, None
            if checkpoint is None:
                raise
            if self.args.should_save:
                shutil.rmtree(checkpoint, ignore_errors=True)
            with disk_full_is_user_error(checkpoint, lambda: f"free space, then {self.resume_hint()}"):
                raise


def group_learning_rates(groups: list[dict], base_lr: float, logged: float) -> dict[str, float]:
    """Each part's current lr as the optimizer holds it (``lr/<part>``), and ``learning_rate``
    = the current lr of the groups that started at the base lr (else ``logged`` unchanged)."""
    out = {f"lr/{g.get('part', 'all')}": float(g["lr"]) for g in groups}
    base = [g for g in groups if g.get("initial_lr", g["lr"]) == base_lr]
    out["learning_rate"] = float(base[0]["lr"]) if base else logged
    return out


def micro_batch_normalizer(labels: torch.Tensor, grad_accum_steps: int, num_processes: int) -> torch.Tensor:
    """Divisor of this micro-batch's summed LM loss so that, after the x num_processes of
    compute_loss and the ranks' gradient average, the step's loss is the reference's: the mean
    over ranks and micro-batches of each micro-batch's token mean."""
    tokens = (labels[..., 1:] != IGNORE_INDEX).sum().clamp(min=1)
    return tokens.double() * grad_accum_steps * num_processes


def _align_mask(batch: Batch) -> torch.Tensor:
    """Samples that contribute an alignment term: with an image and with answer text."""
    has_image = batch.has_image_S
    if batch.inputs.get("align_attention_mask") is None:
        return torch.zeros_like(has_image)
    return has_image & (batch.inputs["align_attention_mask"].sum(1) > 0).to(has_image.device)


def _write_marker(checkpoint: Path, info: dict) -> None:
    with atomic_output(checkpoint / COMPLETE_MARKER) as tmp:
        tmp.write_text(json.dumps(info))


def _rotate(run_dir: Path, limit: int | None, runs: set[str] | None = None) -> None:
    """Keep the newest ``limit`` complete checkpoints of ``runs`` (None: any run); drop
    incomplete leftovers older than the newest. Another run's checkpoints are never touched
    (``claim_output_dir`` refused, or deleted them on --overwrite_output_dir)."""
    complete, partial = [], []
    for path in run_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if not suffix.isdigit():
            continue
        if not is_complete(path):
            partial.append((int(suffix), path))
        elif runs is None or marker_run(path) in runs:
            complete.append((int(suffix), path))
    newest = max(complete)[0] if complete else -1
    stale = [p for step, p in partial if step < newest]
    if limit:
        stale += [p for _, p in sorted(complete)[:-limit]]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
