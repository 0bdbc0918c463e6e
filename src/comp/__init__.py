"""CoMP: continual multimodal pre-training of vision foundation models.

Public names are imported lazily, and CoMP's classes are registered with transformers' Auto
classes when transformers imports those (comp.auto): ``import comp`` imports neither torch nor
transformers.
"""
from __future__ import annotations

import importlib
import logging

__version__ = "0.1.0"


class _NoCpuFallbackNotice(logging.Filter):
    """DeepSpeed, imported by transformers, announces on stdout that it "set the accelerator to
    CPU" on every machine without a GPU: expected there, and it corrupts ``--json`` output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


logging.getLogger("DeepSpeed").addFilter(_NoCpuFallbackNotice())

_PUBLIC = {
    "CompImageProcessor": "comp.data.image",
    "ImageLoadError": "comp.data.image",
    "CompVisionConfig": "comp.models.vision.configuration",
    "CompVisionModel": "comp.models.vision.model",
    "CompProcessor": "comp.data.processor",
    "CompConfig": "comp.models.configuration",
    "CompForConditionalGeneration": "comp.models.mllm",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'comp' has no attribute {name!r}")


# Last: with transformers' Auto modules already imported, this registers at once (comp.auto).
importlib.import_module("comp.auto").install()
