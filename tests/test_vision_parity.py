"""Parity with transformers' own implementations (float32, tiny checkpoints, rope off).

Our tokens are in 2x2 merge-window order; transformers' are raster, so HF outputs are
reordered with merge_window_perm before comparing.

- SigLIP: equal to SiglipModel's vision encoder output BEFORE post_layernorm (CoMP's SigLIP
  has no post-layernorm and no head).
- AIMv2: equal to Aimv2VisionModel.last_hidden_state, i.e. AFTER its final rms_norm (we keep it).
- DINOv2: with keep_cls=True, CLS and patch tokens equal Dinov2Model.last_hidden_state
  (after its final layernorm, which CoMP keeps). With the CoMP default keep_cls=False no
  oracle exists: dropping CLS removes one key/value from every attention, so features differ
  from Dinov2Model from the first layer on; only the embedding stage is shared.
"""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from comp import CompVisionModel
from comp.models.vision.packing import merge_window_perm, patchify

TOL = dict(atol=1e-4, rtol=0)


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 14 * h, 14 * w, generator=torch.Generator().manual_seed(seed))


def _ours(model: CompVisionModel, img: torch.Tensor) -> torch.Tensor:
    h, w = img.shape[1] // 14, img.shape[2] // 14
    with torch.no_grad():
        return model(patchify(img, 14), torch.tensor([[1, h, w]]))


def _hf_siglip(path, img: torch.Tensor, interpolate: bool) -> torch.Tensor:
    vision = tf.SiglipModel.from_pretrained(path).vision_model.eval()
    with torch.no_grad():
        emb = vision.embeddings(img[None], interpolate_pos_encoding=interpolate)
        return vision.encoder(inputs_embeds=emb).last_hidden_state[0]  # before post_layernorm


def _hf_dinov2(path, img: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tf.Dinov2Model.from_pretrained(path).eval()(img[None]).last_hidden_state[0]


def _to_merge(x_LD: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return x_LD[merge_window_perm(h, w)]


def test_siglip_native(tiny_dir):
    img = _image(4, 4)
    ours = _ours(CompVisionModel.from_pretrained(tiny_dir("siglip"), use_rope=False), img)
    ref = _to_merge(_hf_siglip(tiny_dir("siglip"), img, interpolate=False), 4, 4)
    assert ours.shape == (16, 32)
    torch.testing.assert_close(ours, ref, **TOL)


def test_aimv2_native_after_final_norm(tiny_dir):
    img = _image(4, 4)
    ours = _ours(CompVisionModel.from_pretrained(tiny_dir("aimv2"), use_rope=False), img)
    with torch.no_grad():
        ref = tf.Aimv2VisionModel.from_pretrained(tiny_dir("aimv2")).eval()(img[None]).last_hidden_state[0]
    torch.testing.assert_close(ours, _to_merge(ref, 4, 4), **TOL)


def test_dinov2_native_with_cls(tiny_dir):
    img = _image(4, 4)
    ours = _ours(CompVisionModel.from_pretrained(tiny_dir("dinov2"), use_rope=False, keep_cls=True), img)
    ref = _hf_dinov2(tiny_dir("dinov2"), img)
    assert ours.shape == (17, 32)
    torch.testing.assert_close(ours[0], ref[0], **TOL)
    torch.testing.assert_close(ours[1:], _to_merge(ref[1:], 4, 4), **TOL)


def test_dinov2_default_drops_cls(tiny_dir):
    img = _image(4, 4)
    with_cls = _ours(CompVisionModel.from_pretrained(tiny_dir("dinov2"), keep_cls=True), img)
    without = _ours(CompVisionModel.from_pretrained(tiny_dir("dinov2")), img)
    assert without.shape == (16, 32)
    # CLS really left the attention: outside the parity tolerance (tiny random weights keep
    # attention near uniform, so one key of 17 moves features by ~5e-4)
    assert (without - with_cls[1:]).abs().max() > TOL["atol"]


# transformers' SigLIP and DINOv2 resize the table with F.interpolate(size=(h, w), bicubic,
# align_corners=False, no antialias): our defaults. (The original facebookresearch DINOv2 uses
# scale_factor with a +0.1 offset and antialias=True; transformers does not, and neither do we.)
# Aimv2VisionModel has no interpolation path for its learned table, so AIMv2 has no oracle here.
@pytest.mark.parametrize("hw", [(8, 8), (4, 8)])
def test_siglip_interpolated(tiny_dir, hw):
    img = _image(*hw, seed=2)
    model = CompVisionModel.from_pretrained(tiny_dir("siglip"), use_rope=False,
                                            pos_interp_mode="bicubic", pos_interp_antialias=False)
    ref = _to_merge(_hf_siglip(tiny_dir("siglip"), img, interpolate=True), *hw)
    torch.testing.assert_close(_ours(model, img), ref, **TOL)


@pytest.mark.parametrize("hw", [(8, 8), (4, 8)])
def test_dinov2_interpolated(tiny_dir, hw):
    img = _image(*hw, seed=3)
    model = CompVisionModel.from_pretrained(tiny_dir("dinov2"), use_rope=False, keep_cls=True,
                                            pos_interp_mode="bicubic", pos_interp_antialias=False)
    ours, ref = _ours(model, img), _hf_dinov2(tiny_dir("dinov2"), img)
    torch.testing.assert_close(ours[0], ref[0], **TOL)
    torch.testing.assert_close(ours[1:], _to_merge(ref[1:], *hw), **TOL)


def test_rope_changes_features(tiny_dir):
    """use_rope=True rotates q/k in every layer: features differ from the plain VFM."""
    img = _image(4, 6)
    off = _ours(CompVisionModel.from_pretrained(tiny_dir("siglip"), use_rope=False), img)
    on = _ours(CompVisionModel.from_pretrained(tiny_dir("siglip"), use_rope=True), img)
    assert (on - off).abs().max() > 1e-3


def test_raster_order_reproduces_reference_defect(tiny_dir):
    """pos_order='raster' adds raster-order table rows to merge-order tokens: differs from
    the correct order except where the two orders coincide (first merge window's row 0)."""
    img = _image(4, 4)
    good = _ours(CompVisionModel.from_pretrained(tiny_dir("siglip")), img)
    bad = _ours(CompVisionModel.from_pretrained(tiny_dir("siglip"), pos_order="raster"), img)
    assert (good - bad).abs().max() > 1e-3


def test_merger_output(tiny_dir):
    model = CompVisionModel.from_pretrained(tiny_dir("siglip"), use_rope=True, w_merger=48)
    img = _image(4, 6)
    out = _ours(model, img)
    assert out.shape == (6, 48)
    assert [n for n, _ in model.merger.named_parameters()] == [
        "ln_q.weight", "ln_q.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    feats = _ours(CompVisionModel.from_pretrained(tiny_dir("siglip"), use_rope=True), img)
    torch.testing.assert_close(out, model.merger(feats))


def test_aimv2_two_tower_checkpoint(tmp_path):
    """A full Aimv2Model directory (vision weights under ``vision_model.``) loads too."""
    torch.manual_seed(0)
    dims = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    full = tf.Aimv2Model(tf.Aimv2Config(
        vision_config=dict(**dims, image_size=56, patch_size=14),
        text_config=dict(**dims, vocab_size=128, max_position_embeddings=16, eos_token_id=2))).eval()
    full.save_pretrained(tmp_path / "aimv2")
    img = _image(4, 4, seed=4)
    with torch.no_grad():
        ref = full.vision_model(img[None]).last_hidden_state[0]
    ours = _ours(CompVisionModel.from_pretrained(tmp_path / "aimv2"), img)
    torch.testing.assert_close(ours, _to_merge(ref, 4, 4), **TOL)
