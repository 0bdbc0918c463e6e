"""Released (reference-code) checkpoints load: CoMP-MM in the reference's key names, CoMP-VFM
encoders detected as raster-trained, merger initialisation per family.

The key names below are facts about the reference (SliMM-X/CoMP-MM): its SliMM model holds
``visual`` (CoMPSiglipVisionModel: ``vision_model`` with embeddings.patch_embedding,
embeddings.position_embedding, encoder.layers.N.{self_attn.{k,v,q,out}_proj, layer_norm1,
mlp.fc1, mlp.fc2, layer_norm2}, then ``merger``; or CoMPDinov2Model: embeddings without
cls_token / mask_token, encoder.layer.N.*, layernorm, merger), the Qwen2 decoder as ``model``
and ``lm_head``, and with the alignment loss a persistent buffer ``vocab_dist`` [V, 1].
Non-persistent buffers (position_ids, rotary inv_freq) are never saved.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from comp import CompForConditionalGeneration, CompProcessor
from comp.models.convert import load_reference_checkpoint
from comp.models.vision.loading import reference_trained
from comp.models.vision.model import CompVisionModel

MERGER = [f"visual.merger.{m}.{p}" for m in ("ln_q", "mlp.0", "mlp.2") for p in ("weight", "bias")]


def _wb(prefix: str) -> list[str]:
    return [f"{prefix}.weight", f"{prefix}.bias"]


def reference_vision_names(family: str, layers: int) -> list[str]:
    if family == "siglip":
        t = "visual.vision_model."
        names = _wb(t + "embeddings.patch_embedding") + [t + "embeddings.position_embedding.weight"]
        for i in range(layers):
            layer = f"{t}encoder.layers.{i}."
            for sub in ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj",
                        "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"):
                names += _wb(layer + sub)
        return names + MERGER
    names = ["visual.embeddings.position_embeddings"] + _wb("visual.embeddings.patch_embeddings.projection")
    for i in range(layers):
        layer = f"visual.encoder.layer.{i}."
        names += _wb(layer + "norm1") + _wb(layer + "norm2") + _wb(layer + "mlp.fc1") + _wb(layer + "mlp.fc2")
        names += [layer + "layer_scale1.lambda1", layer + "layer_scale2.lambda1"]
        for sub in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                    "attention.output.dense"):
            names += _wb(layer + sub)
    return names + _wb("visual.layernorm") + MERGER


def reference_llm_names(layers: int) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]  # lm_head tied: not saved
    for i in range(layers):
        layer = f"model.layers.{i}."
        names += _wb(layer + "self_attn.q_proj") + _wb(layer + "self_attn.k_proj") + _wb(layer + "self_attn.v_proj")
        names += [layer + "self_attn.o_proj.weight", layer + "input_layernorm.weight",
                  layer + "post_attention_layernorm.weight"]
        names += [f"{layer}mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
    return names


def _ours(name: str) -> str:
    return "visual." + name[len("visual.vision_model."):] if name.startswith("visual.vision_model.") else name


def _inputs(processor):
    img = Image.fromarray(torch.randint(0, 256, (56, 84, 3), generator=torch.Generator().manual_seed(1),
                                        dtype=torch.uint8).numpy())
    prompt = processor.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is shown?"}]}], add_generation_prompt=True)
    return processor([prompt], images=[img])


@pytest.mark.parametrize("family", ["siglip", "dinov2"])
def test_reference_layout_checkpoint_gives_the_same_logits(tiny_dir, tmp_path, family):
    torch.manual_seed(3)
    source = CompForConditionalGeneration.from_components(tiny_dir("qwen2"), tiny_dir(family), use_rope=True).eval()
    source.config.vision_config.pos_order = "raster"  # how the reference code trained it
    ours = source.state_dict()
    names = (reference_vision_names(family, source.config.vision_config.num_hidden_layers)
             + reference_llm_names(source.config.text_config.num_hidden_layers))
    assert all(_ours(n) in ours for n in names), [n for n in names if _ours(n) not in ours]
    state = {n: ours[_ours(n)].clone() for n in names}
    state["vocab_dist"] = torch.rand(source.num_prototypes - 3, 1)  # a Stage I/II buffer
    save_file(state, tmp_path / "model.safetensors")

    loaded = load_reference_checkpoint(tmp_path, llm_dir=tiny_dir("qwen2"), vision_dir=tiny_dir(family)).eval()
    assert loaded.config.vision_config.pos_order == "raster"
    processor = CompProcessor.from_components(tiny_dir("qwen2"), tiny_dir(family), max_num_vistoken=64)
    inputs = _inputs(processor)
    with torch.no_grad():
        want, got = source(**inputs).logits, loaded(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _released_vfm(tiny_dir, tmp_path, family: str, architecture: str) -> tuple:
    """A CoMP-VFM as the reference releases it: the family's config (model_type kept, the
    reference's class as architecture) and its encoder's weights, merger included."""
    torch.manual_seed(5)
    ours = CompVisionModel.from_pretrained(tiny_dir(family), use_rope=True, w_merger=48)
    out = tmp_path / f"released_{family}"
    out.mkdir()
    raw = json.loads((tiny_dir(family) / "config.json").read_text())
    if family == "siglip":
        raw = dict(raw["vision_config"], model_type="siglip_vision_model")
    raw["architectures"] = [architecture]
    (out / "config.json").write_text(json.dumps(raw))
    shutil.copy(tiny_dir(family) / "preprocessor_config.json", out)
    names = [n for n in reference_vision_names(family, ours.config.num_hidden_layers) if n not in MERGER]
    state = {(n[len("visual."):]): ours.state_dict()[_ours(n)[len("visual."):]] for n in names}
    save_file(state | {k: v for k, v in ours.state_dict().items() if k.startswith("merger.")},
              out / "model.safetensors")
    return out, ours


@pytest.mark.parametrize("family, architecture", [("siglip", "CoMPSiglipVisionModel"), ("dinov2", "Dinov2Model")])
def test_released_encoder_is_detected_and_loads_in_raster_order(tiny_dir, tmp_path, family, architecture):
    path, ours = _released_vfm(tiny_dir, tmp_path, family, architecture)
    assert reference_trained(path) is not None
    assert reference_trained(tiny_dir(family)) is None  # the original checkpoint
    loaded = CompVisionModel.from_pretrained(path, use_rope=True)
    assert loaded.config.pos_order == "raster"
    assert CompVisionModel.from_pretrained(path, use_rope=True, pos_order="merge").config.pos_order == "merge"
    trunk = {k: v for k, v in ours.state_dict().items() if not k.startswith(("merger.", "embeddings.cls_token"))}
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in trunk.items())
    assert CompVisionModel.from_pretrained(tiny_dir(family)).config.pos_order == "merge"


def test_custom_visual_model_and_pos_order_flag(tiny_dir, tmp_path):
    from comp.train.args import DataArguments, ModelArguments
    from comp.train.run import build_model

    path, _ = _released_vfm(tiny_dir, tmp_path, "siglip", "CoMPSiglipVisionModel")
    data = DataArguments(data_path="unused.yaml", max_num_vistoken=64)
    model, _ = build_model(ModelArguments(model_name_or_path=str(tiny_dir("qwen2")), custom_visual_model=str(path)), data)
    assert model.config.vision_config.pos_order == "raster"
    model, _ = build_model(ModelArguments(model_name_or_path=str(tiny_dir("qwen2")), custom_visual_model=str(path),
                                          pos_order="merge"), data)
    assert model.config.vision_config.pos_order == "merge"


@pytest.mark.parametrize("family", ["siglip", "dinov2"])
def test_new_merger_is_initialised_as_the_family(tiny_dir, family):
    torch.manual_seed(0)
    merger = CompVisionModel.from_pretrained(tiny_dir(family), w_merger=64).merger
    fan_in = merger.mlp[0].weight.shape[1]
    want_std = math.sqrt(1 / fan_in) if family == "siglip" else 0.02
    for layer in (merger.mlp[0], merger.mlp[2]):
        assert torch.count_nonzero(layer.bias) == 0
        assert abs(layer.weight.std().item() / want_std - 1) < 0.05
    if family == "siglip":  # truncated at two standard deviations of the untruncated normal
        assert merger.mlp[0].weight.abs().max().item() <= 2 * want_std / 0.87962566103423978 + 1e-6
    assert torch.equal(merger.ln_q.weight, torch.ones_like(merger.ln_q.weight))
    assert torch.count_nonzero(merger.ln_q.bias) == 0


def test_encode_probe_and_plugin_take_pos_order(tiny_dir, tmp_path):
    from comp.eval import encode, probe
    from comp.eval.features import load_encoder

    path, _ = _released_vfm(tiny_dir, tmp_path, "dinov2", "Dinov2Model")
    assert load_encoder(path, device="cpu").setting["pos_order"] == "raster"  # detected
    assert load_encoder(path, device="cpu", pos_order="merge").setting["pos_order"] == "merge"
    assert probe.build_parser().parse_args(["x", "--train", "a", "--val", "b", "--pos_order", "raster"]).pos_order == "raster"
    image = tmp_path / "a.png"
    Image.new("RGB", (56, 84), (10, 200, 10)).save(image)
    out = tmp_path / "f.safetensors"
    assert encode.main([str(path), str(image), "--out", str(out), "--pos_order", "merge", "--device", "cpu"]) == 0
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["setting"])["pos_order"] == "merge"


def test_plugin_takes_pos_order(tiny_mm_dir):
    pytest.importorskip("lmms_eval")
    from comp.eval.lmms_plugin import CompLMMS

    assert CompLMMS(pretrained=str(tiny_mm_dir), device="cpu").model.visual.config.pos_order == "merge"
    lm = CompLMMS(pretrained=str(tiny_mm_dir), device="cpu", pos_order="raster")
    assert lm.model.visual.config.pos_order == "raster"
    with pytest.raises(ValueError, match="pos_order"):
        CompLMMS(pretrained=str(tiny_mm_dir), device="cpu", pos_order="zigzag")
