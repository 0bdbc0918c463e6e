"""transformers' Auto classes know CoMP's directories after ``import comp``, at no import cost.

=========================== ======================= ==================================
Auto class                  ``comp`` (CoMP-MM)       ``comp_vision`` (CoMP-VFM)
=========================== ======================= ==================================
AutoConfig                  CompConfig              CompVisionConfig
AutoModel                   CompModel               CompVisionModel
AutoModelForImageTextToText CompForConditionalGen.  -
AutoProcessor               CompProcessor           -
AutoImageProcessor          CompImageProcessor      CompImageProcessor
=========================== ======================= ==================================

Why a post-import hook: registering a class needs the class, and CoMP's classes need torch
(``transformers.configuration_utils`` imports it) and, for the models and processors,
``transformers.modeling_utils``: seconds that ``comp --help``, ``comp data`` and every
``import comp`` would pay for an Auto class they may never use. So ``install()`` (called by
``import comp``) registers nothing itself: a meta-path finder wraps the loader of each Auto
module (``transformers.models.auto.configuration_auto`` ...) and registers CoMP's classes with
it once it has been imported, by whoever imports it; Auto modules imported before ``comp``
get theirs at once.

Why the registration waits for the outermost import: transformers imports its Auto modules
from the middle of other imports (``modeling_utils`` imports ``configuration_auto``;
Qwen2-VL's configuration module, through ``auto_docstring``, imports ``modeling_auto``, its
modeling module every Auto module), and CoMP's modules import those. Registering there would
import CoMP's classes from half-initialised modules, theirs or ours (ImportError). The finder
therefore also wraps the loaders of transformers' and CoMP's own modules, counts those being
executed in this thread, and registers when the last one is done: then no transformers or
CoMP module is half-initialised.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading

_AUTO = "transformers.models.auto."
# Auto module -> the function below that registers CoMP's classes with it.
_REGISTRATIONS = {
    _AUTO + "configuration_auto": "_register_configs",
    _AUTO + "modeling_auto": "_register_models",
    _AUTO + "image_processing_auto": "_register_image_processor",
    _AUTO + "processing_auto": "_register_processor",
}
# Packages whose modules' execution the finder counts (see the module docstring).
_WATCHED = ("transformers", "comp")

_due: list[str] = []  # Auto modules imported, their registration not yet run
_state = threading.local()  # .depth: watched modules being executed in this thread


def _register_configs() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    from comp.models.configuration import CompConfig
    from comp.models.vision.configuration import CompVisionConfig

    for config in (CompConfig, CompVisionConfig):
        AutoConfig.register(config.model_type, config, exist_ok=True)


def _register_models() -> None:
    from transformers.models.auto.modeling_auto import AutoModel, AutoModelForImageTextToText

    from comp.models.configuration import CompConfig
    from comp.models.mllm import CompForConditionalGeneration, CompModel
    from comp.models.vision.configuration import CompVisionConfig
    from comp.models.vision.model import CompVisionModel

    AutoModel.register(CompVisionConfig, CompVisionModel, exist_ok=True)
    AutoModel.register(CompConfig, CompModel, exist_ok=True)
    AutoModelForImageTextToText.register(CompConfig, CompForConditionalGeneration, exist_ok=True)


def _register_image_processor() -> None:
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from comp.data.image import CompImageProcessor
    from comp.models.configuration import CompConfig
    from comp.models.vision.configuration import CompVisionConfig

    # A saved config names the class (image_processor_type); the backend key is transformers'.
    for config in (CompConfig, CompVisionConfig):
        AutoImageProcessor.register(config, image_processor_classes={"pil": CompImageProcessor}, exist_ok=True)


def _register_processor() -> None:
    from transformers.models.auto.processing_auto import AutoProcessor

    from comp.data.processor import CompProcessor
    from comp.models.configuration import CompConfig

    AutoProcessor.register(CompConfig, CompProcessor, exist_ok=True)


def _run_due() -> None:
    """Registrations whose Auto module is imported, once no watched module is executing."""
    while _due and not getattr(_state, "depth", 0):
        auto_module = _due.pop(0)
        try:
            globals()[_REGISTRATIONS[auto_module]]()
        except ImportError as err:  # raised from whichever import finished last: say whose it is
            raise ImportError(f"comp could not register its classes with {auto_module}: {err}") from err


class _Loader(importlib.abc.Loader):
    """Delegates to the loader found; counts the execution and queues the registration."""

    def __init__(self, loader, name: str):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            self._loader.exec_module(module)
        finally:
            _state.depth -= 1
        if self._name in _REGISTRATIONS:
            _due.append(self._name)
        _run_due()

    def __getattr__(self, name: str):  # get_source, get_resource_reader, is_package, ...
        if name in ("_loader", "_name"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds transformers' and CoMP's modules with the finders after it, wrapping their loaders."""

    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] not in _WATCHED:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, name)
                return spec
        return None


def install() -> None:
    """Idempotent; ``import comp`` calls it."""
    if any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _AfterImport())
    _due.extend(name for name in _REGISTRATIONS if name in sys.modules)
    _run_due()
