"""After ``import comp``, transformers' Auto classes load a saved CoMP-MM directory as CoMP's
own classes do (same classes, same logits), in this process and in a fresh one."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import skimage
import torch
from PIL import Image
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText,
                          AutoProcessor)

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


def test_a_fresh_process_needs_only_import_comp(tiny_mm_dir):
    code = textwrap.dedent(f"""
        import comp
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({str(tiny_mm_dir)!r})
        processor = AutoProcessor.from_pretrained({str(tiny_mm_dir)!r})
        print(type(model).__name__, type(processor).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["CompForConditionalGeneration", "CompProcessor"]
