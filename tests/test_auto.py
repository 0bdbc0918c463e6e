"""After ``import comp``, transformers' Auto classes load a saved CoMP-MM directory as CoMP's
own classes do (same classes, same logits), in this process and in a fresh one, whatever was
imported first; directories saved before the processors were transformers processors load too."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import skimage
import torch
from PIL import Image
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText,
                          AutoProcessor, ProcessorMixin)
from transformers.image_processing_utils import BaseImageProcessor

import comp  # noqa: F401  (registers)
from comp.data.image import CompImageProcessor
from comp.data.processor import CompProcessor
from comp.models.configuration import CompConfig
from comp.models.mllm import CompForConditionalGeneration, CompModel


def _inputs(processor):
    image = Image.fromarray(skimage.data.astronaut()).resize((64, 48))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    return processor.encode_messages([messages], images=[image])


def test_auto_classes_load_a_comp_mm(tiny_mm_dir):
    assert isinstance(AutoConfig.from_pretrained(tiny_mm_dir), CompConfig)
    processor = AutoProcessor.from_pretrained(tiny_mm_dir)
    assert type(processor) is CompProcessor
    image_processor = AutoImageProcessor.from_pretrained(tiny_mm_dir)
    assert type(image_processor) is CompImageProcessor
    assert image_processor.to_dict() == processor.image_processor.to_dict()

    auto = AutoModelForImageTextToText.from_pretrained(tiny_mm_dir).eval()
    assert type(auto) is CompForConditionalGeneration
    ours = CompForConditionalGeneration.from_pretrained(tiny_mm_dir).eval()
    inputs = _inputs(processor)
    with torch.no_grad():
        assert torch.equal(auto(**inputs).logits, ours(**inputs).logits)
    base = AutoModel.from_pretrained(tiny_mm_dir)
    assert type(base) is CompModel
    assert set(base.state_dict()) == {k for k in ours.state_dict() if not k.startswith("lm_head.")}


def test_saved_layout_is_transformers_processors(tiny_mm_dir):
    assert json.loads((tiny_mm_dir / "processor_config.json").read_text()) == {"processor_class": "CompProcessor"}
    saved = json.loads((tiny_mm_dir / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "CompImageProcessor" and saved["max_pixels"] == 14 * 14 * 4 * 64
    processor = CompProcessor.from_pretrained(tiny_mm_dir)
    assert isinstance(processor, ProcessorMixin) and isinstance(processor.image_processor, BaseImageProcessor)
    assert processor.chat_template == processor.tokenizer.chat_template == \
        (tiny_mm_dir / "chat_template.jinja").read_text()


def test_a_directory_saved_by_the_earlier_processor_loads(tiny_mm_dir, tmp_path):
    """The earlier CompProcessor wrote no processor_config.json and no processor_class."""
    old = tmp_path / "old"
    shutil.copytree(tiny_mm_dir, old)
    (old / "processor_config.json").unlink()
    tokenizer_config = json.loads((old / "tokenizer_config.json").read_text())
    del tokenizer_config["processor_class"]
    (old / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    processor = AutoProcessor.from_pretrained(old)
    assert type(processor) is CompProcessor
    now = CompProcessor.from_pretrained(tiny_mm_dir)
    inputs, expected = _inputs(processor), _inputs(now)
    assert inputs.keys() == expected.keys()
    assert all(torch.equal(inputs[k], expected[k]) for k in inputs)


def _start(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _printed(proc: subprocess.Popen) -> list[str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return out.split()


def test_fresh_processes_need_only_import_comp(tiny_mm_dir):
    """Whether transformers comes after comp (its Auto modules then first imported from inside
    Qwen2-VL's half-imported modeling code, where comp.auto must wait to register) or before
    (comp registers at once). The two interpreters run side by side."""
    after = _start(f"""
        import comp
        from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText,
                                  AutoProcessor)
        path = {str(tiny_mm_dir)!r}
        loaded = [AutoConfig.from_pretrained(path), AutoImageProcessor.from_pretrained(path),
                  AutoProcessor.from_pretrained(path), AutoModel.from_pretrained(path),
                  AutoModelForImageTextToText.from_pretrained(path)]
        print(*(type(x).__name__ for x in loaded))
    """)
    before = _start("""
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
        import comp
        config = comp.CompConfig
        print(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[config].__name__, PROCESSOR_MAPPING[config].__name__,
              IMAGE_PROCESSOR_MAPPING[config]["pil"].__name__)
    """)
    assert _printed(after) == ["CompConfig", "CompImageProcessor", "CompProcessor", "CompModel",
                               "CompForConditionalGeneration"]
    assert _printed(before) == ["CompForConditionalGeneration", "CompProcessor", "CompImageProcessor"]
