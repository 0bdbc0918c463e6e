"""CompVisionModel: a SigLIP / DINOv2 / AIMv2 encoder reading packed native-resolution images.

Shape legend: T tokens of all images packed (merge-window order), N images, K = C*P*P,
D VFM width, E LLM width (merger output).

Parameter names are those of the source checkpoint (transformers' vision model of the
family), so ``from_pretrained`` of an original directory needs no conversion and
``save_pretrained`` writes the same names (plus ``merger.*``) next to a ``comp_vision``
config.json and the source preprocessor_config.json.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig

from comp.hub import resolve_model_dir

from ..merger import PatchMerger, init_merger
from ..weights import SINGLE_FILE as WEIGHTS_NAME
from ..weights import save_file, weight_files
from .attention import PackedContext
from .configuration import MODEL_TYPES, POS_ORDERS, CompVisionConfig
from . import aimv2, dinov2, siglip
from .packing import cu_seqlens, insert_first, rowcol_ids
from .rope2d import rope_cos_sin

logger = logging.getLogger(__name__)
FAMILY_MODULES = {"siglip": siglip, "dinov2": dinov2, "aimv2": aimv2}

PREPROCESSOR_NAME = "preprocessor_config.json"
# Tensors a reference-trained (CoMP-MM code) encoder lacks; unused when CLS is dropped, they
# load as zeros then.
_OPTIONAL_WITHOUT_CLS = ("embeddings.cls_token",)


class CompVisionModel(nn.Module):
    """``model(pixel_values [T, K], grid_thw [N, 3])`` -> ``[T, D]`` (``[T/4, E]`` with a merger;
    ``[T+N, D]`` with keep_cls, each image's CLS first)."""

    def __init__(self, config: CompVisionConfig):
        super().__init__()
        self.config = config
        fam = FAMILY_MODULES[config.family]
        self.embeddings = fam.Embeddings(config)
        self.encoder = fam.Encoder(config)
        self._final_norm_name = fam.FINAL_NORM
        if fam.FINAL_NORM:
            self.add_module(fam.FINAL_NORM, fam.make_final_norm(config))
        self.merger = (PatchMerger(config.hidden_size, config.w_merger, config.merge_size)
                       if config.w_merger else None)
        self.gradient_checkpointing = False
        self.preprocessor_config: dict | None = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

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
    def from_pretrained(cls, path: str | Path, use_rope: bool | None = None, w_merger: int | None = None,
                        torch_dtype: torch.dtype | None = None, revision: str | None = None,
                        **overrides) -> "CompVisionModel":
        """Load an HF SigLIP / DINOv2 / AIMv2 or a saved CoMP-VFM: a directory or a Hub id
        (``org/name[@revision]``, see ``comp.hub``).

        use_rope / w_merger None keep the directory's setting (a plain HF checkpoint: rope
        off, no merger); ``w_merger=0`` drops a saved merger; a new merger is freshly
        initialised (as the family initialises its linear layers, see comp.models.merger).
        ``overrides`` set any other CompVisionConfig field.

        An encoder trained by the reference code (a released CoMP-SigLIP / CoMP-DINOv2) added
        its position table in raster order; when the directory shows it (see
        ``reference_trained``) ``pos_order`` defaults to "raster", logged. ``pos_order=`` wins.
        """
        path = resolve_model_dir(path, revision)
        config, saved_merger = _config_for(path, overrides)
        why = reference_trained(path) if "pos_order" not in overrides else None
        if why and config.pos_order != "raster":
            logger.info("%s: %s, so positions are added in raster order (pos_order='raster'; "
                        "pass pos_order='merge' to override)", path, why)
            config.pos_order = "raster"
        if use_rope is not None:
            config.use_rope = bool(use_rope)
        if w_merger is not None:
            if saved_merger and w_merger and w_merger != saved_merger:
                raise ValueError(f"{path} holds a merger of width {saved_merger}; pass w_merger="
                                 f"{saved_merger} (keep it) or 0 (drop it), not {w_merger}")
            config.w_merger = w_merger or None
        config.validate()
        dtype = torch_dtype or torch.float32
        with torch.device("meta"):
            model = cls(config)
        state = _read_weights(path, model, saved_merger if config.w_merger else None)
        state = {k: v.to(dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        preprocessor = path / PREPROCESSOR_NAME
        if preprocessor.exists():
            model.preprocessor_config = json.loads(preprocessor.read_text())
        return model.eval()

    def save_pretrained(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(out)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, out / WEIGHTS_NAME, metadata={"format": "pt"})
        if self.preprocessor_config is not None:
            (out / PREPROCESSOR_NAME).write_text(json.dumps(self.preprocessor_config, indent=2) + "\n")
        return out


def set_pos_order(model: "CompVisionModel", pos_order: str) -> None:
    """Switch the order in which the absolute position table is added ("merge" or "raster")."""
    if pos_order not in POS_ORDERS:
        raise ValueError(f"pos_order must be one of {POS_ORDERS}, got {pos_order!r}")
    model.config.pos_order = pos_order


def _disk_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for f in weight_files(path):
        with safe_open(f, "pt") as sf:
            keys.update(sf.keys())
    return keys


def reference_trained(path: str | Path) -> str | None:
    """Why the encoder in ``path`` was trained by the reference code (so with raster-order
    positions), or None. Signs, from the reference's files: a ``CoMP...`` architecture name in
    config.json, a merger saved next to a plain SigLIP/DINOv2 config, or DINOv2 weights
    without ``embeddings.cls_token`` (the reference's DINOv2 has none). A ``comp_vision``
    directory records ``pos_order`` itself and is never guessed about."""
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") == CompVisionConfig.model_type:
        return None
    arch = [a for a in raw.get("architectures") or [] if a.lower().startswith("comp")]
    if arch:
        return f"config.json names the reference architecture {arch[0]}"
    keys = {k[len("vision_model."):] if k.startswith("vision_model.") else k for k in _disk_keys(path)}
    if any(k.startswith("merger.") for k in keys):
        return "its weights hold a merger next to a plain encoder config (a reference CoMP-VFM)"
    if MODEL_TYPES.get(raw.get("model_type")) == "dinov2" and "embeddings.cls_token" not in keys:
        return "its DINOv2 weights have no embeddings.cls_token (the reference's DINOv2)"
    return None


def _config_for(path: Path, overrides: dict) -> tuple[CompVisionConfig, int | None]:
    """-> (config, width of a merger stored in the directory or None)."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    raw = json.loads(cfg_file.read_text())
    model_type = raw.get("model_type")
    if model_type == CompVisionConfig.model_type:
        config = CompVisionConfig.from_pretrained(path)
        for key, value in overrides.items():
            _set_field(config, key, value, path)
        return config, config.w_merger
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{cfg_file}: model_type {model_type!r} is not a supported vision encoder; "
                         f"expected one of {sorted(MODEL_TYPES) + ['comp_vision']}")
    family = MODEL_TYPES[model_type]
    with _quiet_transformers():  # e.g. a two-tower config's text token ids: not our concern
        hf_config = AutoConfig.from_pretrained(path)
    fields = FAMILY_MODULES[family].config_from_hf(hf_config)
    config = CompVisionConfig(family=family, **fields)
    for key, value in overrides.items():
        _set_field(config, key, value, path)
    return config, None


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings off while reading a source config: its checks cover the text
    tower too, which CoMP never builds."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _set_field(config: CompVisionConfig, key: str, value, path: Path) -> None:
    if not hasattr(config, key):
        raise TypeError(f"from_pretrained({path}): unknown setting {key!r} (not a CompVisionConfig field)")
    setattr(config, key, value)


# Tensors of the original checkpoints CoMP leaves out by design (comp-method.md: no pooling
# head, no post-layernorm, no CLS/mask token); a SigLIP / CLIP two-tower file also holds the text tower.
TEXT_TOWER = ("text_model.", "logit_scale", "logit_bias")
DESIGNED_OUT = ("head.", "post_layernorm.", "embeddings.mask_token")


def report_unused(path: Path, ignored: list[str], prefix: str) -> None:
    """The text tower and the parts CoMP drops by design are one info line each; any other
    unused tensor is a warning (a wrong checkpoint or a naming mismatch)."""
    text = [k for k in ignored if k.startswith(TEXT_TOWER)]
    rest = [k for k in ignored if k not in set(text)]
    designed = [k for k in rest if k[len(prefix):].startswith(DESIGNED_OUT)]
    unexpected = [k for k in rest if k not in set(designed)]
    if text:
        logger.info("%s: two-tower checkpoint; its text tower (%d tensors) is not used", path, len(text))
    if designed:
        logger.info("%s: %d tensors CoMP leaves out by design (%s)", path, len(designed), _groups(designed))
    if unexpected:
        logger.warning("%s: %d checkpoint tensors not used by CompVisionModel (%s)", path, len(unexpected),
                       _groups(unexpected))


def _groups(keys: list[str]) -> str:
    return ", ".join(sorted({".".join(k.split(".")[:2]) for k in keys}))


def _read_weights(path: Path, model: CompVisionModel, saved_merger: int | None) -> dict[str, torch.Tensor]:
    """Read exactly the model's parameters, accepting the family's two-tower prefix
    ``vision_model.``; unused checkpoint entries are reported once, missing ones raise."""
    wanted = set(model.state_dict())
    merger_fresh = {k for k in wanted if k.startswith("merger.")} if not saved_merger else set()
    wanted -= merger_fresh
    files = weight_files(path)
    on_disk: dict[str, Path] = {}
    for f in files:
        with safe_open(f, "pt") as sf:
            on_disk.update({k: f for k in sf.keys()})
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in on_disk) else ""
    source = {k: prefix + k for k in wanted}
    zeros = set()
    if not model.config.keep_cls:
        zeros = {k for k in _OPTIONAL_WITHOUT_CLS if k in source and source[k] not in on_disk}
        for k in zeros:
            del source[k]
    missing = sorted(k for k, s in source.items() if s not in on_disk)
    if missing:
        shown = ", ".join(prefix + k for k in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise KeyError(f"{path}: checkpoint lacks {len(missing)} parameter(s) needed by the "
                       f"{model.config.family} encoder: {shown}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(f, "pt") as sf:
            for k, s in source.items():
                if on_disk[s] == f:
                    state[k] = sf.get_tensor(s)
    ignored = sorted(set(on_disk) - set(source.values()))
    report_unused(path, ignored, prefix)
    for k in zeros:
        state[k] = torch.zeros(model.get_parameter(k).shape)
    if merger_fresh:  # a new merger, initialised as the family's, materialised off the meta device
        fresh = init_merger(PatchMerger(model.config.hidden_size, model.config.w_merger,
                                        model.config.merge_size), model.config.family)
        state.update({f"merger.{k}": v for k, v in fresh.state_dict().items()})
    return state
