"""Second fidelity audit (issue 21): the released-checkpoint path trains, the reference's
quick-start call works, and each flag of docs/departures.md reproduces the reference.

Oracles are the reference's own rules, computed here on tiny models: its LLM is resized with
transformers' ``resize_token_embeddings(len(tokenizer))``, its alignment text is cut by a
tokenizer with ``model_max_length=2048``, its encoder's ``from_pretrained`` loads a saved
``merger.*``, its quick start calls ``from_pretrained(path, torch_dtype="auto",
device_map=..., w_merger=False)``, and its scripts pass ``--image_folder data``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, Qwen2ForCausalLM

from comp import CompForConditionalGeneration, CompProcessor
from comp.models.convert import load_reference_checkpoint
from comp.models.kinds import load_comp_mm
from comp.models.vision.loading import reference_source, reference_trained
from comp.models.vision.model import CompVisionModel
from runs import REPO
from test_reference_checkpoints import _inputs, _ours, _released_vfm, reference_llm_names, reference_vision_names

TOOL_TOKENS = 8  # Qwen2.5's tool tokens, absent from the reference's Qwen2-VL tokenizer


# ------------------------------------------------------------------ 2: quick-start keywords
def test_quick_start_keywords_of_the_reference(tiny_dir, tmp_path):
    path, ours = _released_vfm(tiny_dir, tmp_path, "siglip", "CoMPSiglipVisionModel")
    plain = CompVisionModel.from_pretrained(path, torch_dtype="auto", device_map="cpu", w_merger=False)
    assert plain.merger is None and plain.dtype == torch.float32
    kept = CompVisionModel.from_pretrained(path, torch_dtype="auto", device_map={"": "cpu"}, w_merger=True)
    assert kept.config.w_merger == 48
    for k, v in ours.merger.state_dict().items():  # the saved merger, as the reference loads it
        assert torch.equal(kept.merger.state_dict()[k], v), k
    model = kept.to(torch.bfloat16)
    grid = torch.tensor([[1, 4, 6]])
    out = model(torch.randn(24, 3 * 14 * 14).to(torch.bfloat16), grid)
    assert out.shape == (6, 48) and out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="w_merger=True keeps a saved merger"):
        CompVisionModel.from_pretrained(tiny_dir("siglip"), w_merger=True)
    with pytest.raises(TypeError, match="dtype or torch_dtype"):
        CompVisionModel.from_pretrained(path, dtype="auto", torch_dtype="auto")


# ------------------------------------------------- 3: the reference's sources, its merger
@pytest.mark.parametrize("family, name", [("siglip", "Original-SigLIP-So400M"), ("dinov2", "Original-DINOv2-Large")])
def test_reference_sources_are_not_taken_for_trained_encoders(tiny_dir, tmp_path, family, name):
    made, _ = _released_vfm(tiny_dir, tmp_path, family, "CoMPSiglipVisionModel" if family == "siglip" else "Dinov2Model")
    assert reference_trained(made) is not None  # a merger saved / no cls_token: looks CoMP-trained
    local = tmp_path / name
    hub = tmp_path / "hub" / f"models--SliMM-X--{name}" / "snapshots" / "0123abc"
    for target in (local, hub):
        shutil.copytree(made, target)
        assert reference_source(target) == name and reference_trained(target) is None
        assert CompVisionModel.from_pretrained(target).config.pos_order == "merge"
    assert reference_source(made) is None


def test_a_saved_merger_of_the_llm_width_is_loaded_unless_new_merger(tiny_dir, tmp_path):
    torch.manual_seed(5)
    width = json.loads((tiny_dir("qwen2") / "config.json").read_text())["hidden_size"]
    encoder = CompVisionModel.from_pretrained(tiny_dir("siglip"), w_merger=width)
    out = tmp_path / "vfm"
    shutil.copytree(tiny_dir("siglip"), out)  # the original files plus merger.*, the reference's layout
    from safetensors.torch import load_file
    state = load_file(out / "model.safetensors") | {f"merger.{k}": v for k, v in encoder.merger.state_dict().items()}
    save_file(state, out / "model.safetensors")
    built = CompForConditionalGeneration.from_components(tiny_dir("qwen2"), out, use_rope=True)
    for k, v in encoder.merger.state_dict().items():
        assert torch.equal(built.visual.merger.state_dict()[k], v), k
    fresh = CompForConditionalGeneration.from_components(tiny_dir("qwen2"), out, use_rope=True, new_merger=True)
    assert not torch.equal(fresh.visual.merger.mlp[2].weight, encoder.merger.mlp[2].weight)


# ------------------------------------------------------------------ 4: vocabulary rows
def test_vocab_rows_follow_the_tokenizer_as_the_reference_resizes(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir("qwen2"))
    reference = Qwen2ForCausalLM.from_pretrained(tiny_dir("qwen2"))
    padded = reference.config.vocab_size
    assert padded > len(tokenizer)  # Qwen's padded table
    reference.resize_token_embeddings(len(tokenizer))  # what the reference's train.py does
    model = CompForConditionalGeneration.from_components(tiny_dir("qwen2"), tiny_dir("siglip"))
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == model.config.text_config.vocab_size
    assert torch.equal(model.get_input_embeddings().weight, reference.get_input_embeddings().weight)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = torch.tensor([[1, 5, 9, len(tokenizer) - 1]])
    with torch.no_grad():  # text logits equal the resized LLM's
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    kept = CompForConditionalGeneration.from_components(tiny_dir("qwen2"), tiny_dir("siglip"), vocab_rows="llm")
    assert kept.get_input_embeddings().weight.shape[0] == padded


def test_an_untied_head_keeps_the_loss_head_when_resized(tiny_dir):
    model = CompForConditionalGeneration.from_components(tiny_dir("qwen2"), tiny_dir("siglip"), vocab_rows="llm")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.resize_vocab(model.num_prototypes - 3)
    assert type(model.lm_head).__name__ == "CompLMHead"
    assert model.lm_head.weight.shape[0] == model.num_prototypes


# ------------------------------------------------------------------ 5: alignment text length
def test_alignment_text_is_cut_at_2048_tokens_as_the_reference(tiny_dir):
    from comp.data.dataset import MixtureDataset
    from comp.data.image import CompImageProcessor
    from comp.data.records import parse_record

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir("qwen2"))
    answer = " ".join(["red circle left of a blue square"] * 600)
    record = parse_record({"id": "long", "conversations": [{"from": "human", "value": "Describe."},
                                                           {"from": "gpt", "value": answer}]}, 0)
    full = tokenizer(answer, add_special_tokens=True)["input_ids"]
    assert len(full) > 3000
    reference = AutoTokenizer.from_pretrained(tiny_dir("qwen2"), model_max_length=2048)
    want = reference(answer, truncation=True, add_special_tokens=True)["input_ids"]  # the reference's call
    ours = MixtureDataset([], tokenizer, CompImageProcessor(), model_max_length=4096)
    assert ours.alignment_text_ids(record, 0).tolist() == want
    longer = MixtureDataset([], tokenizer, CompImageProcessor(), model_max_length=4096, align_max_length=None)
    assert longer.alignment_text_ids(record, 0).tolist() == full[:4096]


# ------------------------------------------------------------------ 6: image root
def test_recipes_read_images_under_data_root_data(tmp_path):
    env = dict(os.environ, COMP_DATA_ROOT=str(tmp_path / "root"), COMP_WORKDIR=str(tmp_path / "w"), COMP_SMOKE="0")
    env.pop("COMP_IMAGE_FOLDER", None)
    script = f'source "{REPO}/scripts/comp/common.sh"; echo "$IMAGE_FOLDER"'
    got = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == str(tmp_path / "root" / "data")  # the reference's --image_folder data
    env["COMP_IMAGE_FOLDER"] = "/elsewhere"
    got = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "/elsewhere"


# ------------------------------------------------ 1 + acceptance: released checkpoint trains
def _reference_checkpoint(tiny_dir, out):
    """A CoMP-MM-1B-like checkpoint in the reference's exact layout: Qwen2-VL tokenizer length
    (the LLM tokenizer minus its tool tokens), ``vocab_dist`` [V, 1], ``visual.merger.*``."""
    torch.manual_seed(7)
    source = CompForConditionalGeneration.from_components(tiny_dir("qwen2"), tiny_dir("siglip"), use_rope=True)
    rows = source.num_prototypes - TOOL_TOKENS
    state = source.state_dict()
    names = (reference_vision_names("siglip", source.config.vision_config.num_hidden_layers)
             + reference_llm_names(source.config.text_config.num_hidden_layers))
    ckpt = {n: state[_ours(n)].clone() for n in names}
    ckpt["model.embed_tokens.weight"] = ckpt["model.embed_tokens.weight"][:rows].clone()
    counts = torch.randint(0, 50, (rows,)).float()
    ckpt["vocab_dist"] = (counts.clamp(min=1) / counts.sum()).unsqueeze(1)
    out.mkdir()
    save_file(ckpt, out / "model.safetensors")
    return ckpt, counts


def test_released_checkpoint_loads_continues_stage2_with_alignment_saves_reloads(tiny_dir, tmp_path):
    from comp.data.toyworld import write_toyworld
    from comp.train.args import parse_args
    from comp.train.run import train

    ckpt, counts = _reference_checkpoint(tiny_dir, tmp_path / "released")
    model = load_reference_checkpoint(tmp_path / "released", llm_dir=tiny_dir("qwen2"), vision_dir=tiny_dir("siglip"))
    tokens = model.num_prototypes
    rows = ckpt["model.embed_tokens.weight"].shape[0]
    assert model.get_input_embeddings().weight.shape[0] == tokens == rows + TOOL_TOKENS  # every id has a row
    assert torch.equal(model.get_input_embeddings().weight[:rows], ckpt["model.embed_tokens.weight"])
    assert torch.equal(model.visual.merger.mlp[0].weight, ckpt["visual.merger.mlp.0.weight"])
    processor = CompProcessor.from_components(tiny_dir("qwen2"), tiny_dir("siglip"), max_num_vistoken=64)
    with torch.no_grad():  # a tool-token id no longer indexes past the table
        model(torch.tensor([[1, tokens - 1]]))
    start = tmp_path / "start"
    model.save_pretrained(start)
    processor.save_pretrained(start)

    prior = tmp_path / "word_dist.pth"
    torch.save(counts, prior)  # the reference's 151,657-entry file, in miniature
    data = write_toyworld(tmp_path / "toyworld", seed=0, size="small")
    out = tmp_path / "stage2"
    train(*parse_args([
        "--model_name_or_path", str(start), "--data_path", str(data / "stage2.yaml"), "--output_dir", str(out),
        "--mm_tunable_parts", "mm_vision_tower,mm_mlp_adapter,mm_language_model,mm_lm_head",
        "--learning_rate", "1e-4", "--mm_vision_tower_lr", "1e-4", "--mm_projector_lr", "5e-3",
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_num_vistoken", "32",
        "--model_max_length", "512", "--use_rope", "1", "--use_alignment_loss", "1",
        "--word_dist_path", str(prior), "--word_dist_pad", "True", "--logging_steps", "1",
        "--report_to", "none", "--use_cpu", "True", "--dataloader_num_workers", "0", "--save_strategy", "no"]))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    aligned = [h["align_loss"] for h in history if "align_loss" in h]
    assert len(aligned) == 2 and all(a == a and a > 0 for a in aligned)
    reloaded = load_comp_mm(out)
    assert reloaded.get_input_embeddings().weight.shape[0] == tokens
    assert not torch.equal(reloaded.visual.merger.mlp[0].weight, ckpt["visual.merger.mlp.0.weight"])
    with torch.no_grad():
        assert torch.isfinite(reloaded(**_inputs(processor)).logits).all()
