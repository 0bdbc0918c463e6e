"""CoMP's loading of vision encoders (not shipped by ``comp export-vfm --standalone``).

``CompVisionModel.from_pretrained`` comes here inside the package (model.py explains the
split): a directory or Hub id (``comp.hub``) holding an original SigLIP / DINOv2 / AIMv2
checkpoint (two-tower ``vision_model.`` prefix included) or a saved CoMP-VFM; CoMP's
settings on top (use_rope, w_merger, pos_order, any config field); unused tensors reported,
missing ones an error; a reference-trained encoder detected. It also accepts what
``AutoModel.from_pretrained`` passes (``config=``, hub keywords, ``trust_remote_code``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from transformers import AutoConfig

from comp.hub import is_repo_id, resolve_model_dir
from comp.models.weights import no_progress_bars, normal_permissions, weight_files

from .configuration import MODEL_TYPES, PREPROCESSOR_NAME, CompVisionConfig
from .families import FAMILIES
from .merger import PatchMerger, init_merger

if TYPE_CHECKING:  # the model imports this module when it loads; annotations only here
    from .model import CompVisionModel

logger = logging.getLogger(__name__)

# Tensors a reference-trained (CoMP-MM code) encoder lacks; unused when CLS is dropped, they
# load as zeros then.
_OPTIONAL_WITHOUT_CLS = ("embeddings.cls_token",)
# What AutoModel.from_pretrained passes along that only steers transformers' own resolution.
_AUTO_KWARGS = ("trust_remote_code", "adapter_kwargs", "code_revision", "_from_auto", "_commit_hash")
# Hub download settings: comp.hub resolves Hub ids by the HF environment (HF_HUB_CACHE,
# HF_TOKEN, HF_HUB_OFFLINE); for a local directory they mean nothing, as in transformers.
_HUB_KWARGS = {"cache_dir": None, "force_download": False, "local_files_only": False, "proxies": None,
               "token": None, "subfolder": ""}


def load_vision_model(cls: type[CompVisionModel], path: str | Path, *model_args, use_rope: bool | None = None,
                      w_merger: int | bool | None = None, dtype: torch.dtype | str | None = None,
                      revision: str | None = None, config: CompVisionConfig | None = None,
                      torch_dtype: torch.dtype | str | None = None, device_map=None,
                      new_merger: bool = False, **overrides) -> CompVisionModel:
    """Load an HF SigLIP / DINOv2 / AIMv2 or a saved CoMP-VFM: a directory or a Hub id
    (``org/name[@revision]``, see ``comp.hub``).

    use_rope / w_merger None keep the directory's setting (a plain HF checkpoint: rope
    off, no merger); ``w_merger=0`` drops a saved merger; a new merger is freshly
    initialised (as the family initialises its linear layers). The reference's booleans work
    as in its quick start: ``w_merger=False`` = no merger, ``True`` = the saved one. ``dtype``
    (or the reference's ``torch_dtype``): a torch dtype, its name, or "auto" (the saved one);
    default float32. ``device_map``: a device ("cpu", "cuda", "cuda:1"), ``{"": device}`` or
    "auto" (the first GPU if any), as transformers takes it for a one-device model.
    ``config``: a CompVisionConfig to use instead of a CoMP-VFM's config.json (AutoModel
    passes it). ``overrides`` set any other CompVisionConfig field.

    A merger saved in the directory (a CoMP-VFM's, or ``merger.*`` next to an original
    encoder config, as the reference saves its encoders) is loaded when the width asks for it,
    as the reference's ``from_pretrained`` loads it; ``new_merger=True`` starts a new one.

    An encoder trained by the reference code (a released CoMP-SigLIP / CoMP-DINOv2) added
    its position table in raster order; when the directory shows it (see
    ``reference_trained``) ``pos_order`` defaults to "raster", logged. ``pos_order=`` wins.
    """
    if model_args:
        raise TypeError(f"from_pretrained({path}): unexpected positional arguments {model_args}")
    for key in _AUTO_KWARGS:
        overrides.pop(key, None)
    _check_hub_kwargs(path, overrides)
    path = resolve_model_dir(path, revision)
    dtype = _one_dtype(dtype, torch_dtype, path)
    config, saved_merger = _config_for(path, overrides, config)
    if new_merger:
        saved_merger = None
    why = reference_trained(path) if "pos_order" not in overrides else None
    if why and config.pos_order != "raster":
        logger.info("%s: %s, so positions are added in raster order (pos_order='raster'; "
                    "pass pos_order='merge' to override)", path, why)
        config.pos_order = "raster"
    if use_rope is not None:
        config.use_rope = bool(use_rope)
    if w_merger is not None:
        config.w_merger = _merger_width(w_merger, saved_merger, path)
    config.w_merger = config.w_merger or None
    if saved_merger and config.w_merger and config.w_merger != saved_merger:
        raise ValueError(f"{path} holds a merger of width {saved_merger}; pass w_merger="
                         f"{saved_merger} (keep it) or 0 (drop it), not {config.w_merger}")
    _validate(config, path)
    dtype = _dtype(dtype, config)
    config.dtype = dtype
    with torch.device("meta"):
        model = cls(config)
    state = _read_weights(path, model, saved_merger if config.w_merger else None)
    state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    preprocessor = path / PREPROCESSOR_NAME
    if preprocessor.exists():
        model.preprocessor_config = json.loads(preprocessor.read_text())
    if device_map is not None:
        model.to(_one_device(device_map, path))
    return model.eval()


def _one_dtype(dtype, torch_dtype, path):
    """``dtype``, or the reference's older spelling ``torch_dtype`` (not both)."""
    if torch_dtype is not None and dtype is not None:
        raise TypeError(f"from_pretrained({path}): pass dtype or torch_dtype, not both")
    return torch_dtype if torch_dtype is not None else dtype


def _merger_width(w_merger: int | bool, saved: int | None, path: Path) -> int:
    """An integer width from ``w_merger``: the reference's quick start passes a bool (False:
    no merger; True: keep the saved one, whose width the directory records)."""
    if w_merger is False:
        return 0
    if w_merger is True:
        if not saved:
            raise ValueError(f"from_pretrained({path}): w_merger=True keeps a saved merger, and this "
                             "directory has none; pass its width (the LLM's hidden size) as an int")
        return saved
    return w_merger


def _one_device(device_map, path: Path) -> torch.device:
    """The single device of a ``device_map`` (the encoder is never split across devices)."""
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if set(device_map) != {""} or len(devices) != 1:
            raise ValueError(f"from_pretrained({path}): device_map must place the whole encoder on "
                             f"one device ({{'': 'cuda:0'}}), got {device_map}")
        device_map = devices.pop()
    if device_map == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)


def _check_hub_kwargs(path, kwargs: dict) -> None:
    """Pop transformers' hub keywords; refuse a non-default one for a Hub id (comp.hub would
    not honour it) instead of dropping it silently."""
    given = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_KWARGS}
    active = sorted(k for k, v in given.items() if v != _HUB_KWARGS[k])
    if active and not Path(path).expanduser().exists() and is_repo_id(str(path)):
        raise ValueError(f"from_pretrained({path}): {', '.join(active)} cannot be set here; CoMP "
                         "resolves Hub ids through comp.hub (set HF_HUB_CACHE, HF_TOKEN or "
                         "HF_HUB_OFFLINE=1 in the environment, or pass a local directory)")


def _validate(config: CompVisionConfig, path: Path) -> None:
    """The strict config's checks after the overrides, as a ValueError naming the directory."""
    try:
        config.validate()
    except StrictDataclassError as err:
        raise ValueError(f"from_pretrained({path}): {err.__cause__ or err}") from None


def _dtype(dtype, config: CompVisionConfig) -> torch.dtype:
    if dtype == "auto":
        dtype = config.dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if isinstance(getattr(torch, dtype, None), torch.dtype) else dtype
    if dtype is None:
        return torch.float32
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch dtype, its name or 'auto', got {dtype!r}")
    return dtype


@contextlib.contextmanager
def saving(out: Path):
    """CompVisionModel.save_pretrained inside comp: no progress bar, and the weight files get
    the mode of a plain open() (safetensors writes 0600)."""
    with no_progress_bars():
        yield
    normal_permissions(*out.glob("*.safetensors"))


def _disk_keys(path: Path) -> set[str]:
    keys: set[str] = set()
    for f in weight_files(path):
        with safe_open(f, "pt") as sf:
            keys.update(sf.keys())
    return keys


def saved_merger_width(path: str | Path) -> int | None:
    """Output width of a merger stored in ``path`` (``merger.mlp.2.weight`` rows, unprefixed or
    under ``vision_model.``), None when it holds none."""
    for f in weight_files(Path(path)):
        with safe_open(f, "pt") as sf:
            for key in ("merger.mlp.2.weight", "vision_model.merger.mlp.2.weight"):
                if key in sf.keys():
                    return int(sf.get_slice(key).get_shape()[0])
    return None


REFERENCE_SOURCES = ("Original-SigLIP-So400M", "Original-DINOv2-Large")


def reference_source(path: str | Path) -> str | None:
    """The name of the reference's model source ``path`` is (a Hub snapshot of, or a directory
    named as, ``SliMM-X/Original-SigLIP-So400M`` / ``-DINOv2-Large``), else None. The reference
    trains from these: the original encoder saved with its own code (so possibly a merger, and
    DINOv2 without ``cls_token``) next to its tokenizer and image processor; their files cannot
    be told from a CoMP-trained encoder's, their name can."""
    for part in Path(path).resolve().parts[-3:]:
        name = part.split("--")[-1]  # models--SliMM-X--Original-SigLIP-So400M
        if name in REFERENCE_SOURCES:
            return name
    return None


def reference_trained(path: str | Path) -> str | None:
    """Why the encoder in ``path`` was trained by the reference code (so with raster-order
    positions), or None. Signs, from the reference's files: a ``CoMP...`` architecture name in
    config.json, a merger saved next to a plain SigLIP/DINOv2 config, or DINOv2 weights
    without ``embeddings.cls_token`` (the reference's DINOv2 has none). A ``comp_vision``
    directory records ``pos_order`` itself and is never guessed about, and neither is one of the
    reference's own model sources (see ``reference_source``): they hold untrained encoders."""
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") == CompVisionConfig.model_type or reference_source(path):
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


def _config_for(path: Path, overrides: dict, given: CompVisionConfig | None
                ) -> tuple[CompVisionConfig, int | None]:
    """-> (config, width of a merger stored in the directory or None)."""
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    raw = json.loads(cfg_file.read_text())
    model_type = raw.get("model_type")
    if model_type == CompVisionConfig.model_type:
        if given is not None and not isinstance(given, CompVisionConfig):
            raise TypeError(f"from_pretrained({path}): config must be a CompVisionConfig, got {type(given).__name__}")
        config = copy.deepcopy(given) if given is not None else CompVisionConfig.from_pretrained(path)
        if hasattr(config, "auto_map"):  # a standalone export's code files; comp's class needs none
            del config.auto_map
        saved = raw.get("w_merger")
    elif model_type in MODEL_TYPES:
        if given is not None:
            raise TypeError(f"from_pretrained({path}): config= applies to CoMP-VFM directories; this is an "
                            f"original {model_type} checkpoint (pass CompVisionConfig fields as keywords)")
        family = MODEL_TYPES[model_type]
        saved = saved_merger_width(path)
        with _quiet_transformers():  # e.g. a two-tower config's text token ids: not our concern
            hf_config = AutoConfig.from_pretrained(path)
        # an original checkpoint was trained without RoPE: it loads as it was trained
        config = CompVisionConfig(family=family, use_rope=False, **FAMILIES[family].config_from_hf(hf_config))
    else:
        raise ValueError(f"{cfg_file}: model_type {model_type!r} is not a supported vision encoder; "
                         f"expected one of {sorted(MODEL_TYPES) + ['comp_vision']}")
    for key, value in overrides.items():
        _set_field(config, key, value, path)
    return config, saved


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
    if key not in CompVisionConfig.__dataclass_fields__:
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
    designed = [k for k in rest if k[len(prefix):].startswith(DESIGNED_OUT) or k.startswith("merger.")]
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
    # the trunk under the two-tower prefix; a reference-layout merger sits beside it, unprefixed
    source = {k: k if k.startswith("merger.") and prefix + k not in on_disk else prefix + k for k in wanted}
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
        c = model.config
        fresh = init_merger(PatchMerger(c.hidden_size, c.w_merger, c.merge_size), FAMILIES[c.family].init_linear)
        state.update({f"merger.{k}": v for k, v in fresh.state_dict().items()})
    return state
