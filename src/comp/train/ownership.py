"""An output directory belongs to one run.

A run's identity is what changes its result: the model and encoder, the data (the mixture
file's sha256, each JSON file's path and size), the seed and the model, data and optimizer
flags. ``max_steps``/``num_train_epochs`` are not part of it (a run may be extended), nor are
logging, saving and loader flags. ``comp_run.json`` records it when the run starts and every
checkpoint's COMPLETE marker carries its id, so a second run into the directory is refused
instead of rotating away (or resuming) the first run's checkpoints; a lock file keeps two runs
from starting in one directory at once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from comp.errors import UserError
from comp.files import DirectoryLock, atomic_output, file_sha256

logger = logging.getLogger(__name__)

RUN_FILE = "comp_run.json"
LOCK_FILE = ".comp-train.lock"
CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "COMPLETE"
# Flags of ModelArguments/DataArguments that do not change the result.
_NOT_IDENTITY = {"length_cache_dir", "length_workers"}
# TrainingArguments that do.
_TRAINING_IDENTITY = (
    "seed", "data_seed", "learning_rate", "mm_vision_tower_lr", "mm_projector_lr", "weight_decay",
    "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "optim", "lr_scheduler_type",
    "warmup_steps", "warmup_ratio", "per_device_train_batch_size", "gradient_accumulation_steps",
    "bf16", "fp16", "lm_loss_normalization", "reference_optimizer_groups",
    "group_by_modality_length", "label_smoothing_factor")
_PATH_FLAGS = ("model_name_or_path", "custom_visual_model", "data_path", "image_folder", "data_root",
               "word_dist_path")


def _absolute(value):
    """A local path made absolute (the same files named from another directory are one run);
    a Hub id or a missing path stays as written."""
    if isinstance(value, str) and os.path.exists(value):
        return os.path.abspath(value)
    return value


def _data_identity(data_path: str, data_root: str | None) -> dict:
    """The mixture file's sha256 and each listed JSON file's path and size (hashing many
    gigabytes of records at every start would cost minutes)."""
    from comp.data.mixture import load_mixture

    out = {}
    if os.path.isfile(data_path) and not data_path.lower().endswith((".json", ".jsonl")):
        out["sha256"] = file_sha256(data_path)  # the mixture YAML: small

    try:
        specs = load_mixture(data_path, data_root=data_root)
    except (ValueError, OSError):  # reported with its own message when the data is read
        return out
    out["files"] = {str(s.json_path.resolve()): (s.json_path.stat().st_size if s.json_path.is_file() else None)
                    for s in specs}
    return out


def run_identity(model_args, data_args, training_args) -> dict:
    """The flags and data that make this run's result (see the module docstring)."""
    identity = {}
    for args in (model_args, data_args):
        for f in dataclasses.fields(args):
            if f.name not in _NOT_IDENTITY:
                value = getattr(args, f.name)
                identity[f.name] = _absolute(value) if f.name in _PATH_FLAGS else value
    for name in _TRAINING_IDENTITY:
        value = getattr(training_args, name, None)
        identity[name] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    identity["data"] = _data_identity(data_args.data_path, data_args.data_root)
    return identity


def run_id(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def marker_run(checkpoint: Path) -> str | None:
    """The run id a checkpoint's COMPLETE marker records (None: no marker, or an older one)."""
    try:
        return json.loads((checkpoint / COMPLETE_MARKER).read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None


def _checkpoints(output_dir: Path) -> list[Path]:
    return sorted((p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*")
                   if p.name[len(CHECKPOINT_PREFIX):].isdigit() and p.is_dir()),
                  key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def read_run(output_dir: str | Path) -> dict | None:
    try:
        record = json.loads((Path(output_dir) / RUN_FILE).read_text())
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def _differences(before: dict, now: dict, limit: int = 4) -> str:
    changed = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    shown = [f"{k} {before.get(k)!r} -> {now.get(k)!r}" if k != "data" else "the data changed"
             for k in changed[:limit]]
    return "; ".join(shown) + (" ..." if len(changed) > limit else "")


def accepted_runs(output_dir: str | Path, me: str, resume_from: str | Path | None) -> set[str]:
    """The run ids whose checkpoints this run (id ``me``) may resume from and rotate: its
    own, and the run it continues from a named checkpoint (with that run's own ancestry).
    Every process computes the same set, before or after the main one records the run."""
    record = read_run(output_dir) or {}
    ours = {me}
    if record.get("run") == me:
        ours |= set(record.get("continues", []))
    theirs = marker_run(Path(resume_from)) if resume_from is not None else None
    if theirs is not None and theirs not in ours:
        ours.add(theirs)
        if record.get("run") == theirs:
            ours |= set(record.get("continues", []))
        logger.warning("continuing %s (run %s) with other settings as run %s", resume_from, theirs, me)
    return ours


def foreign_checkpoints(output_dir: str | Path, ours: set[str]) -> list[Path]:
    """Checkpoints in ``output_dir`` of runs outside ``ours``; one without a marker counts as
    the run the directory records (none recorded: another run's)."""
    recorded = (read_run(output_dir) or {}).get("run")
    return [p for p in _checkpoints(Path(output_dir)) if (marker_run(p) or recorded) not in ours]


def refuse_foreign(output_dir: str | Path, foreign: list[Path], identity: dict) -> None:
    """The one-line refusal of a start into a directory that holds another run's checkpoints,
    with the flags that differ from the run the directory records."""
    record = read_run(output_dir) or {}
    names = ", ".join(p.name for p in foreign[-3:])
    why = f"; {_differences(record['identity'], identity)}" if isinstance(record.get("identity"), dict) else ""
    raise UserError(f"the output directory holds checkpoints of another run: {names}{why}", output_dir,
                    "use a new --output_dir, rerun that run with its own flags, or pass "
                    "--overwrite_output_dir to delete its checkpoints")


def record_run(output_dir: str | Path, identity: dict, ours: set[str], foreign: list[Path]) -> None:
    """Delete ``foreign`` checkpoints (--overwrite_output_dir: named in a warning) and record
    this run in ``output_dir/comp_run.json``."""
    out = Path(output_dir)
    if foreign:
        logger.warning("--overwrite_output_dir: deleting %d checkpoint(s) of another run in %s (%s)",
                       len(foreign), out, ", ".join(p.name for p in foreign))
        for path in foreign:
            shutil.rmtree(path)
    me = run_id(identity)
    with atomic_output(out / RUN_FILE) as tmp:
        tmp.write_text(json.dumps({"run": me, "continues": sorted(ours - {me}), "identity": identity},
                                  indent=1, default=str))


# ------------------------------------------------------------------ lock

class OutputLock(DirectoryLock):
    """``output_dir/.comp-train.lock``, held by the comp train that writes the directory."""

    def __init__(self, output_dir: str | Path):
        super().__init__(output_dir, LOCK_FILE, "comp train", "--output_dir")
