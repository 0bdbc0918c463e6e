"""CompVisionConfig: the encoder's architecture and CoMP settings, importable without the
modeling code (``AutoConfig`` reads it, ``comp export-vfm --standalone`` ships this file).

Shipped: imports only transformers / huggingface_hub and nothing of ``comp``.
"""

from typing import Literal, get_args

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

FAMILIES = ("siglip", "dinov2", "aimv2")  # the keys of families.FAMILIES (a test checks)
# config.json model_type of an original checkpoint -> family
MODEL_TYPES = {"siglip": "siglip", "siglip_vision_model": "siglip", "dinov2": "dinov2",
               "aimv2": "aimv2", "aimv2_vision_model": "aimv2"}
PosOrder = Literal["merge", "raster"]
POS_ORDERS: tuple[str, ...] = get_args(PosOrder)
PosInterpMode = Literal["bicubic", "bilinear", "nearest", "nearest-exact", "area"]  # torch's 2D modes
POS_INTERP_MODES: tuple[str, ...] = get_args(PosInterpMode)
ATTN_BACKENDS = ("auto", "flash", "varlen", "sdpa")  # see attention.py
# The image processor settings a CoMP-VFM directory carries beside config.json.
PREPROCESSOR_NAME = "preprocessor_config.json"


@strict
class CompVisionConfig(PreTrainedConfig):
    """Architecture of the source VFM (``family`` + its dimensions) and the CoMP settings.

    use_rope: 2D RoPE on q, k in every layer (C-RoPE), CoMP's encoder and the one default of
        the setting (``comp train --use_rope``, ``from_components``); False = the plain VFM with
        the interpolated absolute table only, as an original checkpoint loads.
    pos_interp_mode / pos_interp_antialias: how the learned table is resized to an image grid
        (one of POS_INTERP_MODES).
    pos_order: "merge" (correct) or "raster" (the reference code's permuted positions).
    keep_cls: DINOv2 only; CoMP drops the CLS token.
    w_merger: output width of the 2x2 merger, or None for per-token features.
    attn_backend: one of ATTN_BACKENDS.

    As transformers' strict configs, fields are type-checked and ``validate_architecture``
    runs on construction and on ``validate()`` (call it after changing fields).
    """

    model_type = "comp_vision"

    family: str = "siglip"
    hidden_size: int = 32
    intermediate_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_channels: int = 3
    image_size: int = 56
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    mlp_bias: bool = True
    use_rope: bool = True
    rope_theta: float = 10000.0
    pos_interp_mode: str = "bicubic"
    pos_interp_antialias: bool = False
    pos_order: str = "merge"
    keep_cls: bool = False
    merge_size: int = 2
    w_merger: int | None = None
    attn_backend: str = "auto"

    def validate_architecture(self) -> None:
        super().validate_architecture()
        if self.family not in FAMILIES:
            raise ValueError(f"unknown vision family {self.family!r}; expected one of {FAMILIES}")
        if self.pos_order not in POS_ORDERS:
            raise ValueError(f"pos_order must be 'merge' or 'raster', got {self.pos_order!r}")
        if self.pos_interp_mode not in POS_INTERP_MODES:
            raise ValueError(f"pos_interp_mode must be one of {POS_INTERP_MODES}, got {self.pos_interp_mode!r}")
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        if self.keep_cls and self.family != "dinov2":
            raise ValueError(f"keep_cls=True needs a CLS token; the {self.family} family has none")
        if self.keep_cls and self.w_merger:
            raise ValueError("keep_cls=True cannot be combined with a merger (CLS breaks the 2x2 windows)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"{self.num_attention_heads} heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
