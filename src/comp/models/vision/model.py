"""CompVisionModel: a SigLIP / DINOv2 / AIMv2 encoder reading packed native-resolution images,
as a transformers ``PreTrainedModel``.

Shape legend: T tokens of all images packed (merge-window order), N images, K = C*P*P,
D VFM width, E LLM width (merger output).

Parameter names are those of the source checkpoint (transformers' vision model of the
family), so an original directory loads without conversion and ``save_pretrained`` writes
the same names (plus ``merger.*``) next to a ``comp_vision`` config.json and the source
preprocessor_config.json.

Self-contained modeling vs comp's loading. This file and the modules it imports with
``from .x import y`` (configuration, families, encoder, the family modules, attention, mlp,
merger, packing, rope2d) import only torch / transformers / safetensors: ``comp export-vfm
--standalone`` copies them next to the weights, and transformers' remote-code loader, which
copies exactly the files named by such relative imports, loads them without ``comp``.
What only CoMP needs (Hub ids through ``comp.hub``, original SigLIP/DINOv2/AIMv2 layouts and
two-tower prefixes, use_rope/w_merger/pos_order overrides, reference-trained detection, the
unused-tensor report, quiet saving with normal file modes) lives in loading.py, which is not
shipped. The class reaches it through ``_comp_loading()``: ``from . import loading`` inside a
try block, a form the remote-code loader neither copies nor checks, which succeeds in the
package and fails in a standalone copy, which then loads as any transformers model.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init

from .attention import PackedContext
from .configuration import POS_ORDERS, PREPROCESSOR_NAME, CompVisionConfig
from .encoder import Encoder
from .families import FAMILIES
from .merger import PatchMerger
from .packing import cu_seqlens, insert_first, rowcol_ids
from .rope2d import rope_cos_sin

POSITION_STD = 0.02  # random position tables / CLS of a from_config model


def _comp_loading():
    """comp's loading module in the package, None in a standalone copy (see the docstring)."""
    try:
        from . import loading
    except ImportError:
        return None
    return loading


class CompVisionPreTrainedModel(PreTrainedModel):
    config_class = CompVisionConfig
    base_model_prefix = ""
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = [f.Layer.__name__ for f in FAMILIES.values()]

    def _init_weights(self, module: nn.Module) -> None:
        """Random weights only matter for a new merger and ``from_config`` models (CoMP starts
        from pretrained VFMs): linear layers as the family initialises them, biases zero,
        norms one, position tables and CLS normal, DINOv2's layer scale one."""
        family = FAMILIES[self.config.family]
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            family.init_linear(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm) or "RMSNorm" in type(module).__name__:
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, std=POSITION_STD)
        elif type(module).__name__ == "LayerScale":
            init.ones_(module.lambda1)
        for name in ("position_embeddings", "cls_token"):  # DINOv2's bare parameters
            param = module._parameters.get(name)
            if param is not None:
                init.trunc_normal_(param, std=POSITION_STD)


class CompVisionModel(CompVisionPreTrainedModel):
    """``model(pixel_values [T, K], grid_thw [N, 3])`` -> ``[T, D]`` (``[T/4, E]`` with a merger;
    ``[T+N, D]`` with keep_cls, each image's CLS first)."""

    def __init__(self, config: CompVisionConfig):
        super().__init__(config)
        family = FAMILIES[config.family]
        self.embeddings = family.Embeddings(config)
        self.encoder = Encoder(config, family)
        self._final_norm_name = family.final_norm
        if family.final_norm:
            self.add_module(family.final_norm, family.make_final_norm(config))
        self.merger = (PatchMerger(config.hidden_size, config.w_merger, config.merge_size)
                       if config.w_merger else None)
        self.gradient_checkpointing = False
        self.preprocessor_config: dict | None = None
        self.post_init()

    def _check_inputs(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> None:
        c = self.config
        k = c.num_channels * c.patch_size**2
        if pixel_values.dim() != 2 or pixel_values.shape[1] != k:
            raise ValueError(f"pixel_values must be [T, C*P*P] = [T, {k}], got {tuple(pixel_values.shape)}")
        for i, (t, h, w) in enumerate(grids):
            if t != 1:
                raise ValueError(f"grid_thw[{i}] has t={t}; only images (t=1) are supported")
            if h % c.merge_size or w % c.merge_size:
                raise ValueError(f"grid_thw[{i}] = {h}x{w} patches is not divisible by the "
                                 f"merge size {c.merge_size}")
        total = sum(t * h * w for t, h, w in grids)
        if total != pixel_values.shape[0]:
            raise ValueError(f"grid_thw covers {total} patches but pixel_values has "
                             f"{pixel_values.shape[0]} rows")

    def _rope(self, grids_hw: list[tuple[int, int]], lengths: list[int], device: torch.device):
        c = self.config
        cache: dict[tuple[int, int], torch.Tensor] = {}
        pos_T2 = torch.cat([cache.setdefault(hw, rowcol_ids(*hw, c.merge_size)) for hw in grids_hw])
        cos, sin = rope_cos_sin(pos_T2.to(device), c.head_dim, c.rope_theta)
        if c.keep_cls:  # CLS has no grid position: identity rotation
            n = len(lengths)
            cos = insert_first(cos, torch.ones(n, cos.shape[1], device=device), lengths)
            sin = insert_first(sin, torch.zeros(n, sin.shape[1], device=device), lengths)
        return cos, sin

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Per-token features ``[T, D]``, merged ``[T/4, E]`` when a merger is attached. A trunk
        with no trainable parameter (Stage I) runs without autograd."""
        trunk_frozen = not any(p.requires_grad for n, p in self.named_parameters() if not n.startswith("merger."))
        with torch.no_grad() if trunk_frozen and torch.is_grad_enabled() else contextlib.nullcontext():
            x_TD = self.features(pixel_values, grid_thw)
        return self.merger(x_TD) if self.merger is not None else x_TD

    def features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """The trunk's per-token features ``[T, D]`` (before any merger)."""
        c = self.config
        grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        self._check_inputs(pixel_values, grids)
        grids_hw = [(h, w) for _, h, w in grids]
        lengths = [h * w for h, w in grids_hw]
        x_TD = self.embeddings(pixel_values, grids_hw, lengths)
        rope = self._rope(grids_hw, lengths, x_TD.device) if c.use_rope else None
        if c.keep_cls:
            lengths = [n + 1 for n in lengths]
        ctx = PackedContext(lengths, cu_seqlens(lengths, x_TD.device), rope, c.attn_backend)
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for layer in self.encoder.blocks:
            x_TD = checkpoint(layer, x_TD, ctx, use_reentrant=False) if ckpt else layer(x_TD, ctx)
        if self._final_norm_name:
            x_TD = getattr(self, self._final_norm_name)(x_TD)
        return x_TD

    # ---------------------------------------------------------------- loading / saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> "CompVisionModel":
        """In the package: CoMP's loader (``loading.load_vision_model``: original SigLIP /
        DINOv2 / AIMv2 directories or CoMP-VFMs, Hub ids, ``use_rope`` / ``w_merger`` /
        ``dtype`` / config-field overrides). In a standalone copy: transformers' loading."""
        loading = _comp_loading()
        if loading is None:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        return loading.load_vision_model(cls, pretrained_model_name_or_path, *model_args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs) -> Path:
        """transformers' saving plus the source preprocessor_config.json (CoMP's image processor
        reads it); in the package quiet and with normal file modes (see loading.saving)."""
        out = Path(save_directory)
        loading = _comp_loading()
        with loading.saving(out) if loading is not None else contextlib.nullcontext():
            super().save_pretrained(out, *args, **kwargs)
            if self.preprocessor_config is not None:
                (out / PREPROCESSOR_NAME).write_text(json.dumps(self.preprocessor_config, indent=2) + "\n")
        return out


def set_pos_order(model: CompVisionModel, pos_order: str) -> None:
    """Switch the order in which the absolute position table is added ("merge" or "raster")."""
    if pos_order not in POS_ORDERS:
        raise ValueError(f"pos_order must be one of {POS_ORDERS}, got {pos_order!r}")
    model.config.pos_order = pos_order
