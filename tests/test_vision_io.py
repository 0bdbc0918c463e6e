"""Loading, saving, errors, gradient checkpointing and bf16 of CompVisionModel."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from safetensors.torch import load_file, save_file

from comp import CompVisionConfig, CompVisionModel
from comp.models.vision.packing import patchify


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    grids = [(4, 6), (2, 2), (6, 4)]
    patches = [patchify(torch.randn(3, 14 * h, 14 * w, generator=gen), 14) for h, w in grids]
    return torch.cat(patches), torch.tensor([[1, h, w] for h, w in grids])


@pytest.mark.parametrize("kind,extra", [
    ("siglip", {"w_merger": 24}), ("dinov2", {"keep_cls": True}), ("aimv2", {"pos_order": "raster"})])
def test_save_load_round_trip_exact(tiny_dir, tmp_path, kind, extra):
    model = CompVisionModel.from_pretrained(tiny_dir(kind), use_rope=True, **extra)
    out = model.save_pretrained(tmp_path / "vfm")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "comp_vision" and cfg["family"] == kind and cfg["use_rope"] is True
    src_keys = set(load_file(tiny_dir(kind) / "model.safetensors"))
    saved_keys = set(load_file(out / "model.safetensors"))
    prefix = "vision_model." if kind == "siglip" else ""
    src_names = {k.removeprefix(prefix) for k in src_keys}
    assert {k for k in saved_keys if not k.startswith("merger.")} <= src_names
    assert (out / "preprocessor_config.json").read_text() == (
        json.dumps(json.loads((tiny_dir(kind) / "preprocessor_config.json").read_text()), indent=2) + "\n")
    again = CompVisionModel.from_pretrained(out)
    for key, value in extra.items():
        assert getattr(again.config, key) == value
    x, grid = _batch()
    with torch.no_grad():
        assert torch.equal(model(x, grid), again(x, grid))


def test_siglip_vision_model_checkpoint_loads(tiny_dir, tmp_path):
    """A vision-only SiglipVisionModel directory (no ``vision_model.`` prefix) equals the two-tower one."""
    tf.SiglipModel.from_pretrained(tiny_dir("siglip")).vision_model.save_pretrained(tmp_path / "sv")
    assert json.loads((tmp_path / "sv" / "config.json").read_text())["model_type"] == "siglip_vision_model"
    x, grid = _batch()
    with torch.no_grad():
        a = CompVisionModel.from_pretrained(tmp_path / "sv", use_rope=True)(x, grid)
        b = CompVisionModel.from_pretrained(tiny_dir("siglip"), use_rope=True)(x, grid)
    assert torch.equal(a, b)


def test_merger_width_conflict_and_drop(tiny_dir, tmp_path):
    out = CompVisionModel.from_pretrained(tiny_dir("siglip"), w_merger=24).save_pretrained(tmp_path / "m")
    assert CompVisionModel.from_pretrained(out).merger is not None
    assert CompVisionModel.from_pretrained(out, w_merger=0).merger is None
    with pytest.raises(ValueError, match="merger of width 24"):
        CompVisionModel.from_pretrained(out, w_merger=64)


def test_missing_keys_error_names_dir_and_keys(tiny_dir, tmp_path):
    src = tiny_dir("dinov2")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    del state["encoder.layer.1.attention.attention.key.weight"]
    save_file(state, broken / "model.safetensors")
    key = r"encoder\.layer\.1\.attention\.attention\.key\.weight"
    with pytest.raises(KeyError, match=rf"broken.*lacks 1 parameter.*{key}"):
        CompVisionModel.from_pretrained(broken)


def test_unsupported_directory_errors(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="model_type 'qwen2' is not a supported vision encoder"):
        CompVisionModel.from_pretrained(tiny_dir("qwen2"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CompVisionModel.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="unknown setting 'use_ropes'"):
        CompVisionModel.from_pretrained(tiny_dir("siglip"), use_ropes=True)
    with pytest.raises(ValueError, match="keep_cls"):
        CompVisionModel.from_pretrained(tiny_dir("siglip"), keep_cls=True)


def test_bad_inputs_raise_clear_errors(tiny_dir):
    model = CompVisionModel.from_pretrained(tiny_dir("siglip"))
    x, grid = _batch()
    with pytest.raises(ValueError, match="covers 52 patches but pixel_values has 51"):
        model(x[:-1], grid)
    with pytest.raises(ValueError, match=r"\[T, 588\]"):
        model(x[:, :100], grid)
    with pytest.raises(ValueError, match="not divisible by the merge size"):
        model(x[:15], torch.tensor([[1, 3, 5]]))


def test_gradient_checkpointing_same_output_and_grads(tiny_dir):
    x, grid = _batch()
    path = tiny_dir("aimv2")  # written first: writing seeds the global generator
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)  # the fresh merger draws from the global generator
        model = CompVisionModel.from_pretrained(path, use_rope=True, w_merger=16).train()
        if ckpt:
            model.activation_checkpointing_enable()  # transformers' entry point (PreTrainedModel)
            assert model.gradient_checkpointing
        out = model(x, grid)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_a, out_b, atol=0, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads_a.items() if "position" not in n)


def test_bf16_forward(tiny_dir):
    x, grid = _batch()
    ref = CompVisionModel.from_pretrained(tiny_dir("siglip"), use_rope=True)
    model = CompVisionModel.from_pretrained(tiny_dir("siglip"), use_rope=True, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        out, ref_out = model(x, grid), ref(x, grid)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref_out, atol=0.1, rtol=0.05)


def test_config_validation():
    """A strict config, as transformers' own: checked on construction, on validate(), and by type."""
    with pytest.raises(StrictDataclassClassValidationError, match="unknown vision family"):
        CompVisionConfig(family="vit")
    with pytest.raises(StrictDataclassClassValidationError, match="pos_order"):
        CompVisionConfig(pos_order="zigzag")
    with pytest.raises(StrictDataclassClassValidationError, match="merger"):
        CompVisionConfig(family="dinov2", keep_cls=True, w_merger=8)
    with pytest.raises(StrictDataclassFieldValidationError, match="w_merger"):
        CompVisionConfig(w_merger="64")
    config = CompVisionConfig()
    config.family = "vit"
    with pytest.raises(StrictDataclassClassValidationError, match="unknown vision family"):
        config.validate()


def test_every_trainable_parameter_gets_a_gradient(tiny_dir):
    """No unused trainable parameters (DDP-safe): DINOv2's dropped CLS token is frozen."""
    x, grid = _batch()
    for kind in ("siglip", "dinov2", "aimv2"):
        model = CompVisionModel.from_pretrained(tiny_dir(kind), use_rope=True).train()
        model(x, grid).square().mean().backward()
        idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert idle == [], (kind, idle)
    assert not CompVisionModel.from_pretrained(tiny_dir("dinov2")).embeddings.cls_token.requires_grad
