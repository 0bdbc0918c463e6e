"""CoMP-MM: parity with Qwen2 on text, checkpoints, generation, losses, token handling."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoTokenizer, Qwen2ForCausalLM

from comp import CompForConditionalGeneration, CompProcessor
from comp.tokens import ensure_vision_tokens


@pytest.fixture(scope="module")
def parts(tiny_dir):
    return tiny_dir("qwen2"), tiny_dir("siglip")


@pytest.fixture(scope="module")
def model(parts):
    torch.manual_seed(0)
    return CompForConditionalGeneration.from_components(*parts, use_rope=True).eval()


@pytest.fixture(scope="module")
def processor(parts):
    return CompProcessor.from_components(*parts, max_num_vistoken=16)


def _images():
    g = torch.Generator().manual_seed(1)
    arrays = [torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
              for h, w in ((56, 84), (112, 56))]
    return [Image.fromarray(a) for a in arrays]


def _prompt(processor, question="What is shown?", n_images=1):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def test_text_only_logits_equal_qwen2(model, parts):
    reference = Qwen2ForCausalLM.from_pretrained(parts[0]).eval()
    ids = torch.randint(0, 500, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = reference(input_ids=ids).logits
    # the table is resized to the tokenizer (as the reference does): its rows are Qwen2's first rows
    assert ours.shape[-1] == len(AutoTokenizer.from_pretrained(parts[0])) < theirs.shape[-1]
    assert (ours - theirs[..., :ours.shape[-1]]).abs().max() <= 1e-4


def test_save_load_round_trip_is_exact(model, processor, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = CompForConditionalGeneration.from_pretrained(tmp_path).eval()
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    inputs = processor(_prompt(processor), images=_images()[:1])
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_cached_generation_equals_no_cache_greedy(model, processor):
    prompts = [_prompt(processor, "What is shown?"), _prompt(processor, "Colour?", n_images=1)]
    inputs = processor(prompts, images=_images())  # different sizes -> left padding differs
    assert (inputs["attention_mask"] == 0).any()
    kwargs = dict(max_new_tokens=8, eos_token_id=-1)  # never stop early: compare all 8 steps
    cached = model.generate(**inputs, use_cache=True, **kwargs)
    uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert cached.shape == (2, inputs["input_ids"].shape[1] + 8)
    assert torch.equal(cached, uncached)


def test_image_token_mismatch_names_the_sample(model, processor):
    inputs = processor(_prompt(processor), images=_images()[:1])
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == model.config.image_token_id).nonzero()[0]] = 0  # drop one pad
    with pytest.raises(ValueError, match="sample-7"):
        model(input_ids=ids, pixel_values=inputs["pixel_values"],
              image_grid_thw=inputs["image_grid_thw"], record_ids=["sample-7"])


def _training_batch(processor, model):
    prompts = [_prompt(processor) + "A red square.<|im_end|>\n", _prompt(processor, "Hi", 0) + "Hello.<|im_end|>\n"]
    batch = processor(prompts, images=_images()[:1], padding_side="right")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[labels == model.config.image_token_id] = -100
    answers = processor.tokenizer(["A red square.", "Hello."], add_special_tokens=False, padding=True,
                                  return_tensors="pt")
    return dict(batch, labels=labels, align_input_ids=answers["input_ids"],
                align_attention_mask=answers["attention_mask"])


def test_training_forward_returns_both_losses_and_alignment_grads_stay_in_vision(parts, processor):
    torch.manual_seed(0)
    model = CompForConditionalGeneration.from_components(*parts, use_rope=True, use_alignment_loss=True,
                                                         loss_weight=1.0)
    model.set_word_prior("uniform")
    model.train()
    batch = _training_batch(processor, model)

    def grads(use_alignment: bool) -> dict[str, torch.Tensor]:
        model.config.use_alignment_loss = use_alignment
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out, with_align = grads(True)
    assert out.lm_loss is not None and out.align_loss is not None and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.lm_loss + out.align_loss)
    _, without = grads(False)
    for name, g in with_align.items():
        if name.startswith("visual."):
            continue
        torch.testing.assert_close(g, without[name], rtol=0, atol=1e-6, msg=f"alignment grad leaked into {name}")
    changed = [n for n in with_align if n.startswith("visual.") and not torch.allclose(with_align[n], without[n])]
    assert any(n.startswith("visual.merger.") for n in changed)
    assert any(n.startswith("visual.encoder.") for n in changed)


def test_batch_without_images_still_touches_the_encoder(parts, processor):
    model = CompForConditionalGeneration.from_components(*parts, use_alignment_loss=True).train()
    model.set_word_prior("uniform")
    prompts = [_prompt(processor, "Hi", 0) + "Hello.<|im_end|>\n"]
    batch = processor(prompts, padding_side="right")
    answers = processor.tokenizer(["Hello."], add_special_tokens=False, return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"], align_input_ids=answers["input_ids"],
                align_attention_mask=answers["attention_mask"])
    out.loss.backward()
    assert out.align_loss == 0
    assert all(p.grad is not None for p in model.visual.parameters())


def test_vision_tokens_appended_to_real_qwen2_vocabulary(qwen2_tokenizer_dir, processor):
    tok = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    before = len(tok)
    added = ensure_vision_tokens(tok)
    CompProcessor(tok, processor.image_processor)  # installs the CoMP chat template
    assert added == ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    assert [tok.convert_tokens_to_ids(t) for t in added] == list(range(before, before + 5))
    text = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]},
         {"role": "assistant", "content": "A cat."}], tokenize=False)
    assert text.endswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n"
                         "<|im_start|>assistant\nA cat.<|im_end|>\n")
    ids = tok("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [before, before + 3, before + 1]


def test_image_pad_expansion_matches_grid(processor):
    images = _images()
    inputs = processor([_prompt(processor, n_images=2)], images=images)
    grid = inputs["image_grid_thw"]
    n_pads = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert n_pads == int((grid.prod(-1) // 4).sum())
    assert inputs["pixel_values"].shape[0] == int(grid.prod(-1).sum())


def test_packed_rows_give_the_same_logits_as_unpacked(model, processor, tiny_dir):
    """Three samples (two with images of different sizes, one text-only) packed into one row
    by the collator give, token for token, the logits of each sample in its own row."""
    from comp.data.collator import DataCollator

    images = _images()
    texts = [(_prompt(processor, "What?"), images[:1]), (_prompt(processor, "Hi", 0), None),
             (_prompt(processor, "Colour?"), images[1:])]
    samples = []
    for text, imgs in texts:
        enc = processor(text + "An answer.<|im_end|>\n", images=imgs)
        ids = enc["input_ids"][0]
        samples.append({"input_ids": ids, "labels": ids.clone(), "has_image": imgs is not None,
                        "pixel_values": enc.get("pixel_values"), "image_grid_thw": enc.get("image_grid_thw")})
    pad = processor.tokenizer.pad_token_id
    packed = DataCollator(pad_token_id=pad, pack_length=4096)(samples).inputs
    assert packed["input_ids"].shape[0] == 1
    unpacked = DataCollator(pad_token_id=pad)(samples).inputs
    keep = ("input_ids", "pixel_values", "image_grid_thw")
    with torch.no_grad():
        logits_packed = model(**{k: packed[k] for k in keep}, cu_seqlens=packed["cu_seqlens"]).logits[0]
        logits_rows = model(**{k: unpacked[k] for k in keep}, attention_mask=unpacked["attention_mask"]).logits
    at = 0
    for row, sample in enumerate(samples):
        n = len(sample["input_ids"])
        torch.testing.assert_close(logits_packed[at:at + n], logits_rows[row, :n], atol=1e-4, rtol=0)
        at += n


def test_frozen_encoder_trunk_runs_without_autograd(parts, processor):
    from comp.train.trainer import set_tunable_parts

    model = CompForConditionalGeneration.from_components(*parts).train()
    set_tunable_parts(model, ["mm_mlp_adapter"])
    seen = {}
    model.visual.encoder.blocks[-1].register_forward_hook(lambda m, i, o: seen.update(trunk=o.requires_grad))
    model.visual.merger.register_forward_hook(lambda m, i, o: seen.update(merger=o.requires_grad))
    batch = _training_batch(processor, model)
    model(**batch).loss.backward()
    assert seen == {"trunk": False, "merger": True}
    assert all(p.grad is None for n, p in model.visual.named_parameters() if not n.startswith("merger."))
    assert all(p.grad is not None for p in model.visual.merger.parameters())


def test_llm_without_vision_tokens_gets_them_and_resized_embeddings(qwen2_tokenizer_dir, tiny_dir, tmp_path):
    """A Qwen2 LLM whose tokenizer (the real vocabulary, 151,936 entries) has no vision tokens:
    they are appended after the existing ids and the embedding table grows to match."""
    from transformers import Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = CompForConditionalGeneration.from_components(tmp_path, tiny_dir("siglip"))
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == len(tokenizer) + 5 == model.config.text_config.vocab_size
    assert model.config.image_token_id == len(tokenizer) + 3
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    original = load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.get_input_embeddings().weight[:len(tokenizer)], original)
