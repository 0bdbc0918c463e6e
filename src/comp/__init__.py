"""CoMP: continual multimodal pre-training of vision foundation models.

Public names are imported lazily: ``import comp`` costs what registering CoMP with
transformers' Auto classes costs (the configs, not the modeling code).
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

# transformers' Auto classes load CoMP directories (comp.auto); costs importing the configs.
importlib.import_module("comp.auto").register()

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
