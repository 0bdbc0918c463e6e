"""``register_auto()``: ``AutoConfig`` and ``AutoModel`` know the CoMP-VFM (``comp_vision``).

Registering needs the config class (transformers and torch get imported) but not the
modeling code: ``AutoModel`` is given ``LazyCompVisionModel``, a stand-in whose loading
entry points import ``comp.models.vision.model`` on first use and return a real
``CompVisionModel``. Registration alone thus costs what importing the config costs.
"""
from __future__ import annotations

from .configuration import CompVisionConfig


class LazyCompVisionModel:
    """What AutoModel calls (``from_pretrained``, ``_from_config`` / ``from_config``), handed to
    CompVisionModel; instances are always CompVisionModel."""

    config_class = CompVisionConfig

    @staticmethod
    def _real():
        from .model import CompVisionModel

        return CompVisionModel

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls._real().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, config, **kwargs):
        return cls._real()._from_config(config, **kwargs)

    @classmethod
    def from_config(cls, config, **kwargs):
        return cls._real()._from_config(config, **kwargs)


def register_auto() -> None:
    """Idempotent; the package's ``comp`` entry point may call it."""
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(CompVisionConfig.model_type, CompVisionConfig, exist_ok=True)
    AutoModel.register(CompVisionConfig, LazyCompVisionModel, exist_ok=True)
