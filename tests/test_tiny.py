import hashlib

import pytest
from transformers import AutoConfig, AutoTokenizer

from comp.models.configuration import mrope_section_for
from comp.models.tiny import write_tiny


@pytest.mark.parametrize("kind, model_type", [
    ("siglip", "siglip"), ("dinov2", "dinov2"), ("aimv2", "aimv2_vision_model"), ("qwen2", "qwen2")])
def test_tiny_checkpoint_has_real_layout(tiny_dir, kind, model_type):
    path = tiny_dir(kind)
    assert (path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(path).model_type == model_type
    if kind == "qwen2":
        assert (path / "tokenizer.json").exists()
    else:
        assert (path / "preprocessor_config.json").exists()


def test_tiny_is_deterministic_for_a_seed(tmp_path):
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()
    a = write_tiny(tmp_path / "a", "dinov2", seed=3)
    b = write_tiny(tmp_path / "b", "dinov2", seed=3)
    c = write_tiny(tmp_path / "c", "dinov2", seed=4)
    assert digest(a) == digest(b) != digest(c)


def test_tiny_tokenizer_has_qwen_specials_and_chat_template(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir("qwen2"))
    for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        assert tok.convert_tokens_to_ids(t) is not None
        assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(t)) == t
    text = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
         {"role": "assistant", "content": "A dot."}], tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"  # Qwen2-VL's default
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
                    "<|im_start|>assistant\nA dot.<|im_end|>\n")
    ids = tok("the red circle", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "the red circle"


@pytest.mark.parametrize("head_dim, expected", [(128, [16, 24, 24]), (64, [8, 12, 12]), (16, [2, 3, 3])])
def test_mrope_section_scales_with_head_dim(head_dim, expected):
    assert mrope_section_for(head_dim) == expected
