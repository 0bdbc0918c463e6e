"""What kind of checkpoint a directory holds, and the checks each command makes before loading.

Kinds: ``comp-mm`` (a `comp train` output: CoMP-MM model + processor), ``comp-vfm`` (a `comp
export-vfm` output), ``vfm`` (an original SigLIP / DINOv2 / AIMv2 encoder) and ``llm`` (a
Qwen2 / Qwen2.5 causal LM). Naming the wrong directory is the commonest mistake; loading it
anyway would build a default-sized model or leave tensors at random.
"""
from __future__ import annotations

import json
from pathlib import Path

from comp.errors import UserError

LABELS = {"comp-mm": "CoMP-MM (a `comp train` output_dir)",
          "comp-vfm": "CoMP-VFM (a `comp export-vfm` output)",
          "vfm": "original vision encoder (SigLIP / DINOv2 / AIMv2)",
          "llm": "LLM (Qwen2 / Qwen2.5)"}
LLM_TYPES = ("qwen2", "qwen2_5", "qwen2_moe", "qwen3")


def checkpoint_kind(directory: str | Path) -> str:
    """The kind of ``directory`` (or cached Hub id; see the module doc); UserError when it is
    none of them."""
    from comp.hub import resolve_model_dir
    from comp.models.vision.configuration import MODEL_TYPES

    try:
        directory = resolve_model_dir(directory)
    except FileNotFoundError as err:
        raise UserError("no such checkpoint directory", directory, str(err)) from None
    if not directory.is_dir():
        raise UserError("no such checkpoint directory" if not directory.exists() else
                        "a checkpoint is a directory, this is a file", directory,
                        "name a Hugging Face checkpoint directory")
    config = directory / "config.json"
    try:
        raw = json.loads(config.read_text())
    except FileNotFoundError:
        raise UserError("the directory has no config.json", directory,
                        "name a checkpoint directory (config.json + weights)") from None
    except (OSError, ValueError) as err:
        raise UserError(f"config.json cannot be read ({err})", config, "re-save the checkpoint") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type == "comp":
        return "comp-mm"
    if model_type == "comp_vision":
        return "comp-vfm"
    if model_type in MODEL_TYPES:
        return "vfm"
    if model_type in LLM_TYPES:
        return "llm"
    raise UserError(f"config.json has model_type {model_type!r}, which is no checkpoint kind CoMP "
                    "reads", config, f"name one of: {', '.join(LABELS.values())}")


def require_kind(directory: str | Path, *kinds: str) -> str:
    """``checkpoint_kind(directory)`` if it is one of ``kinds``; else UserError saying which
    kind it is and which the command needs."""
    kind = checkpoint_kind(directory)
    if kind not in kinds:
        need = " or ".join(LABELS[k] for k in kinds)
        raise UserError(f"this is a {LABELS[kind]}, not a {need}", directory,
                        f"name a {need} directory")
    return kind


def _layer_counts(config, prefix: str = "") -> list[tuple[str, int]]:
    """Every ``num_hidden_layers`` of ``config`` and its sub-configs (text, vision)."""
    found = []
    for key, value in vars(config).items():
        if key == "num_hidden_layers" and isinstance(value, int):
            found.append((prefix + key, value))
        elif hasattr(value, "to_dict") and hasattr(value, "num_hidden_layers"):
            found += _layer_counts(value, f"{prefix}{key}.")
    return found


def refuse_non_finite(model, directory: str | Path) -> None:
    """UserError naming the first weight that holds NaN or inf, or a config that builds no
    model (``num_hidden_layers`` below 1): features, answers and exports from it are garbage."""
    import torch

    empty = [(name, n) for name, n in _layer_counts(model.config) if n < 1]
    if empty:
        raise UserError(f"config.json sets {empty[0][0]} = {empty[0][1]}: that builds a model "
                        "without layers", Path(directory) / "config.json",
                        "restore the config.json the checkpoint was saved with")
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            raise UserError(f"the weight {name} holds NaN or inf", directory,
                            "use a checkpoint saved before the numbers went non-finite")


def load_comp_mm(directory: str | Path, *, allow_new_tensors: bool = False, **kwargs):
    """A saved CoMP-MM, after checking the directory's kind and weight files. Tensors the
    checkpoint lacks would be "newly initialized" (random): that is an error naming them,
    unless ``allow_new_tensors``."""
    from comp.hub import resolve_model_dir
    from comp.models.mllm import CompForConditionalGeneration
    from comp.models.weights import check_weight_files

    require_kind(directory, "comp-mm")
    directory = resolve_model_dir(directory)
    try:
        check_weight_files(directory)
    except FileNotFoundError as err:
        raise UserError("the checkpoint has no weights", directory, str(err)) from None
    model, info = CompForConditionalGeneration.from_pretrained(
        directory, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)  # named below
    for name, saved, built in sorted(info.get("mismatched_keys") or [])[:1]:
        raise UserError(f"the tensor {name} has shape {list(saved)} but config.json builds {list(built)}",
                        directory, "use the config.json the weights were saved with")
    missing = sorted(info.get("missing_keys") or [])

    if missing and not allow_new_tensors:
        raise UserError(f"the checkpoint lacks {len(missing)} tensors that would start random, e.g. "
                        f"{missing[:5]}", directory,
                        "use a complete CoMP-MM checkpoint (the weights of a `comp train` output_dir)")
    refuse_non_finite(model, directory)
    return model

