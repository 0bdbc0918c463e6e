"""``register()``: transformers' Auto classes know CoMP's directories after ``import comp``.

=========================== ======================= ==================================
Auto class                  ``comp`` (CoMP-MM)       ``comp_vision`` (CoMP-VFM)
=========================== ======================= ==================================
AutoConfig                  CompConfig              CompVisionConfig
AutoModel                   CompModel               CompVisionModel
AutoModelForImageTextToText CompForConditionalGen.  -
AutoProcessor               CompProcessor           -
AutoImageProcessor          CompImageProcessor      CompImageProcessor
=========================== ======================= ==================================

Registering needs the config classes (which import transformers and torch) but not the
modeling or processing code: the Auto classes get stand-ins whose loading entry points import
the real class on first use and return its instances, so a bare ``import comp`` stays at the
cost of importing the configs.
"""
from __future__ import annotations

import importlib

# Keywords the Auto classes pass to a processor's from_pretrained that CoMP's loaders resolve
# themselves (comp.hub) or do not need.
_AUTO_ONLY_KWARGS = ("trust_remote_code", "_from_auto", "code_revision", "use_fast", "backend")


def _real(target: str):
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _model_stand_in(name: str, config_class: type, target: str) -> type:
    """A class AutoModel* accept for ``config_class`` that loads/builds ``target``."""
    def from_pretrained(cls, *args, **kwargs):
        return _real(target).from_pretrained(*args, **kwargs)

    def from_config(cls, config, **kwargs):
        return _real(target)._from_config(config, **kwargs)

    return type(name, (), {"config_class": config_class, "__doc__": f"Loads {target} (see comp.auto).",
                           "from_pretrained": classmethod(from_pretrained),
                           "_from_config": classmethod(from_config), "from_config": classmethod(from_config)})


def _processor_stand_in(name: str, target: str, base: type = object) -> type:
    """``from_pretrained`` (and, for image processors, ``from_dict`` of a read config)."""
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        for key in _AUTO_ONLY_KWARGS:
            kwargs.pop(key, None)
        return _real(target).from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def from_dict(cls, config_dict, **kwargs):
        for key in _AUTO_ONLY_KWARGS + ("return_unused_kwargs",):
            kwargs.pop(key, None)
        return _real(target).from_dict(config_dict, **kwargs)

    return type(name, (base,), {"__doc__": f"Loads {target} (see comp.auto).",
                                "from_pretrained": classmethod(from_pretrained),
                                "from_dict": classmethod(from_dict)})


def register() -> None:
    """Idempotent; ``import comp`` calls it."""
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText,
                              AutoProcessor)
    from transformers.image_processing_utils import BaseImageProcessor

    from comp.models.configuration import CompConfig
    from comp.models.vision.configuration import CompVisionConfig

    for config in (CompConfig, CompVisionConfig):
        AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModel.register(CompVisionConfig, _model_stand_in(
        "AutoCompVisionModel", CompVisionConfig, "comp.models.vision.model:CompVisionModel"), exist_ok=True)
    AutoModel.register(CompConfig, _model_stand_in(
        "AutoCompModel", CompConfig, "comp.models.mllm:CompModel"), exist_ok=True)
    AutoModelForImageTextToText.register(CompConfig, _model_stand_in(
        "AutoCompForConditionalGeneration", CompConfig, "comp.models.mllm:CompForConditionalGeneration"),
        exist_ok=True)
    AutoProcessor.register(CompConfig, _processor_stand_in(
        "AutoCompProcessor", "comp.data.processor:CompProcessor"), exist_ok=True)
    # AutoImageProcessor takes BaseImageProcessor subclasses only, and finds a saved config's
    # image_processor_type by class name: the stand-in is both.
    image_processor = _processor_stand_in("CompImageProcessor", "comp.data.image:CompImageProcessor",
                                          BaseImageProcessor)
    for config in (CompConfig, CompVisionConfig):
        AutoImageProcessor.register(config, image_processor_classes={"pil": image_processor}, exist_ok=True)
