"""Key maps between CoMP-MM and foreign checkpoint layouts (one module for all of them).

The reference implementation's released CoMP-MM checkpoints store
- the SigLIP / AIMv2 trunk under ``visual.vision_model.*`` (ours: ``visual.*``, the names of
  the original checkpoint); its unused ``post_layernorm`` / ``head`` are dropped,
- the DINOv2 trunk under ``visual.embeddings|encoder|layernorm.*`` (same as ours),
- the merger as ``visual.merger.ln_q|mlp.0|mlp.2`` and the LLM as ``model.*`` / ``lm_head.*``
  (same as ours);
- no DINOv2 ``embeddings.cls_token`` (its DINOv2 has none; ours keeps the tensor, unused
  when CLS is dropped, so it loads as zeros);
- with the alignment loss on (Stage I/II), the persistent buffer ``vocab_dist`` [V, 1]: the
  normalised word prior, not a weight; it is dropped (pass the prior file to train on);
- word embeddings resized to the reference's tokenizer, Qwen2-VL's (151,657 rows), which lacks
  Qwen2.5's eight tool tokens (151,657-151,664): the table grows to the LLM tokenizer's length,
  the new rows at the mean of the others, so every id indexes a row and prototypes = tokens.
The reference also added the interpolated position table in raster order to tokens in
merge-window order; its weights were trained that way, so they load with ``pos_order="raster"``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from comp.models.weights import load_state_dict

REFERENCE_TRUNK_PREFIX = "visual.vision_model."
_REFERENCE_UNUSED = ("visual.vision_model.post_layernorm.", "visual.vision_model.head.", "vocab_dist")
_ABSENT_IN_REFERENCE = ("visual.embeddings.cls_token",)  # DINOv2: loads as zeros when CLS is dropped


def reference_to_comp(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Reference layout -> ours. Returns (mapped state, names dropped as unused)."""
    mapped, dropped = {}, []
    for name, tensor in state.items():
        if name.startswith(_REFERENCE_UNUSED):
            dropped.append(name)
        elif name.startswith(REFERENCE_TRUNK_PREFIX):
            mapped["visual." + name[len(REFERENCE_TRUNK_PREFIX):]] = tensor
        else:
            mapped[name] = tensor
    return mapped, dropped


def load_reference_checkpoint(ckpt_dir: str | Path, *, llm_dir: str | Path, vision_dir: str | Path,
                              pos_order: str = "raster", **config_overrides):
    """A CoMP-MM from a reference-layout checkpoint. ``llm_dir`` / ``vision_dir`` supply the
    architecture (configs and tokenizer: e.g. Qwen2.5-0.5B-Instruct and SigLIP-So400M); every
    weight comes from ``ckpt_dir``. A table shorter than the tokenizer grows to it (module doc)."""
    from comp.models.mllm import CompForConditionalGeneration

    model = CompForConditionalGeneration.from_components(llm_dir, vision_dir, use_rope=True,
                                                         **config_overrides)
    model.config.vision_config.pos_order = pos_order
    state, _ = reference_to_comp(load_state_dict(ckpt_dir))
    if model.config.tie_word_embeddings and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    rows = state["model.embed_tokens.weight"].shape[0]
    if rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    own = model.state_dict()
    if not model.config.vision_config.keep_cls:
        state.update({k: torch.zeros_like(own[k]) for k in _ABSENT_IN_REFERENCE if k in own and k not in state})
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"{ckpt_dir}: not a reference CoMP-MM layout for this architecture; "
                       f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model.resize_vocab(model.config.num_prototypes, "llm")  # grows only: every token gets a row
    return model
