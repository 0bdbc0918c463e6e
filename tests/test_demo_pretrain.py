"""Toy pre-trained originals (comp.demo.pretrain): quality, loading through the recipe's own
loaders against transformers, the cache, and the one-token-per-word tokenizer in the chat
encoding."""
from __future__ import annotations

import pytest
import torch
import transformers as tf

from comp import CompVisionModel
from comp.data import toyworld as tw
from comp.data.conversation import encode_conversation, load_tokenizer
from comp.tokens import IGNORE_INDEX
from comp.data.prompts import prompt_messages
from comp.data.records import parse_record
from comp.demo import pretrain
from comp.models.vision.packing import merge_window_perm, patchify


@pytest.fixture(scope="session")
def toys(private_cache):
    """Built once per session under $COMP_CACHE/toy-pretrained (the default cache_dir), where
    any other test of the session asking for the same seed and settings finds them."""
    return pretrain.pretrained_toys(0, pretrain.QUICK, log=lambda *_: None)


def test_quality_beats_chance_and_unigram(toys):
    siglip, lm = toys.quality["siglip"], toys.quality["lm"]
    assert siglip["colour_chance"] == 1 / 8
    # QUICK trains for seconds on varied captions: its loss falls, its zero-shot accuracy is
    # near chance (the full toy's is in docs/results/demo-claims.md)
    assert siglip["last_loss"] < 0.75 * siglip["first_loss"]
    assert lm["perplexity"] < 0.5 * lm["unigram_perplexity"]
    # reading is measured (large glyphs and small ones in large scenes), not required of QUICK
    for name in ("digit_large", "word_large", "digit_small", "word_small"):
        assert 0 <= siglip[f"{name}_accuracy"] <= 1 and siglip[f"{name}_images"] > 0, name
    assert siglip["truncated_captions"] == 0


def test_siglip_groups_are_hard_negatives_with_one_phrasing():
    """A reading scene and its text siblings: the same scene but for the text (same kind and
    length, distinct, same position), and captions that differ only in the text."""
    scenes, captions = pretrain.siglip_groups(0, 16, "reading", 8)
    assert len(scenes) == len(captions) == 16
    for lo in (0, 8):
        group, texts = scenes[lo:lo + 8], captions[lo:lo + 8]
        (first,) = group[0].texts
        assert len({s.texts[0].text for s in group}) == 8
        for scene, caption in zip(group, texts):
            (t,) = scene.texts
            assert scene.objects == group[0].objects and (scene.width, scene.height) == (group[0].width, group[0].height)
            assert (t.kind, len(t.text), t.position, t.font_size) == (first.kind, len(first.text), first.position,
                                                                      first.font_size)
            diff = [(x, y) for x, y in zip(caption.split(), texts[0].split(), strict=True) if x != y]
            assert all(t.text in x and first.text in y for x, y in diff) and len(diff) <= 1
    pool, pool_captions = pretrain.siglip_groups(0, 4, "pool", 2)
    assert [o.colour for o in pool[0].objects] == [o.colour for o in pool[1].objects]
    assert pool_captions[0] != pool_captions[1]
    prompts = pretrain.class_prompts("digit", "7")
    assert "the number 7." in prompts and all("7" in p for p in prompts)


def test_distinguishing_words_are_what_tells_a_group_apart(toys):
    """The reading toy's image-tower labels: a reading sibling's own digits or word, a shape
    twin's shape words; never a word its whole group shares."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toys.siglip)
    scenes, captions = pretrain.siglip_groups(0, 8, "reading", 8)
    pool, pool_captions = pretrain.siglip_groups(0, 2, "pool", 2)
    ids, _ = pretrain._caption_ids(tokenizer, captions + pool_captions, 64)
    targets = pretrain.distinguishing_words(ids, [8, 2], len(tokenizer))
    assert torch.allclose(targets.sum(-1), torch.ones(10))
    for scene, row in zip(scenes + pool, targets):
        named = {t.lstrip("Ġ") for t in tokenizer.convert_ids_to_tokens(row.nonzero().flatten().tolist())}
        assert named
        if scene in scenes:
            assert named <= set(scene.texts[0].text) | {scene.texts[0].text}, named
        else:
            assert named <= {o.shape for o in scene.objects}, named
    assert not pretrain.distinguishing_words(ids[:1], [1], len(tokenizer)).any()  # alone: nothing to tell apart


def test_reading_toy_sets_its_reading_material_in_large_type():
    """READING is FULL but for the typeset, the reading share and the label; its reading
    groups (and the zero-shot probes it is judged on) are set in that large type."""
    changed = {k for k, v in vars(pretrain.READING).items() if getattr(pretrain.FULL, k) != v}
    assert changed == {"typeset", "reading_share", "caption_classification"}
    scenes, _ = pretrain.siglip_groups(0, 8, "reading", 8, pretrain.READING.typeset)
    assert {s.texts[0].font_size for s in scenes} <= set(tw.TYPESETS["large"].reading)
    default, _ = pretrain.siglip_groups(0, 8, "reading", 8)
    assert {s.texts[0].font_size for s in default} <= set(tw.TYPESETS["small"].reading)


def test_saved_tokenizers_reload_unchanged(toys):
    """The recipe's loader (AutoTokenizer -> Qwen2Tokenizer for model_type qwen2) and SigLIP's
    directory give back the tokenizer the toys were trained with: same vocabulary, same ids on
    held-out toyworld text in the chat format, lossless decoding."""
    built = pretrain.train_tokenizer(pretrain.text_documents(0, "train", pretrain.QUICK.text_scenes))
    texts = [pretrain.render_chat(built, d) for d in pretrain.text_documents(0, "heldout", 20)]
    texts += [tw.short_caption(tw.pool_scene(tw.rng_for(0, "test-captions", i))) for i in range(20)]
    expected = built(texts, add_special_tokens=False)["input_ids"]
    qwen2 = load_tokenizer(toys.qwen2)
    assert type(qwen2).__name__ == "Qwen2Tokenizer"
    for tokenizer in (qwen2, tf.AutoTokenizer.from_pretrained(toys.siglip)):
        assert tokenizer.get_vocab() == built.get_vocab()
        got = tokenizer(texts, add_special_tokens=False)["input_ids"]
        assert got == expected
        assert [tokenizer.decode(ids) for ids in got] == texts


def test_second_call_hits_the_cache(toys):
    stamp = (toys.siglip.parent / pretrain.QUALITY_FILE).stat().st_mtime_ns
    again = pretrain.pretrained_toys(0, pretrain.QUICK, cache_dir=toys.siglip.parent.parent)
    assert again == toys
    assert (toys.siglip.parent / pretrain.QUALITY_FILE).stat().st_mtime_ns == stamp
    assert pretrain.cache_key(1, pretrain.QUICK) != pretrain.cache_key(0, pretrain.QUICK)


def test_siglip_loads_as_comp_vision_model_with_transformers_features(toys):
    ours = CompVisionModel.from_pretrained(toys.siglip, use_rope=False)
    hf = tf.SiglipVisionModel.from_pretrained(toys.siglip).eval()
    size = pretrain.QUICK.image_size
    image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(0))
    g = size // 14
    with torch.no_grad():
        x_TD = ours(patchify(image, 14), torch.tensor([[1, g, g]]))
        ref_LD = hf(pixel_values=image[None], output_hidden_states=True).hidden_states[-1][0]
    # float32 features of magnitude up to ~30 after training: equal to within 1e-5 of the
    # largest |feature| (a relative tolerance; reordered sums differ in the last bits)
    diff = (x_TD - ref_LD[merge_window_perm(g, g)]).abs().max()
    assert diff <= 1e-5 * ref_LD.abs().max(), diff
    assert ours.preprocessor_config["size"] == {"height": size, "width": size}


def test_lm_loads_with_comp_tokenizer(toys):
    tokenizer = load_tokenizer(toys.qwen2)
    model = tf.AutoModelForCausalLM.from_pretrained(toys.qwen2).eval()
    assert model.config.tie_word_embeddings and model.config.vocab_size >= len(tokenizer)
    assert model.config.vocab_size % 64 == 0
    # a held-out scene's description and a colour question, as the LM's QA documents pose them
    scene = tw.pool_scene(tw.rng_for(0, "test-lm", 0))
    question = f"{tw.dense_caption(scene)}\nWhat colour is the {scene.objects[0].shape}?"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() in tw.COLOURS, answer  # the LM learned the answer form of toyworld QA


def test_word_tokens(toys):
    tokenizer = load_tokenizer(toys.qwen2)
    vocab = tokenizer.get_vocab()
    for word in (*tw.COLOURS, *tw.SHAPES, "top", "left", "bottom", "center", "yes", "no"):
        assert len(tokenizer(f"a {word}", add_special_tokens=False)["input_ids"]) == 2, word
    text = "the number 472."
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert tokens[-4:] == ["4", "7", "2", "."] and all(t in vocab for t in tokens)
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_conversation_encoding_with_word_tokenizer(toys):
    """A toyworld Stage III record through the recipe's encoder: answers (and their
    <|im_end|>) supervised, everything else masked; ids equal tokenizer(rendered text)."""
    tokenizer = load_tokenizer(toys.qwen2)
    rng = tw.rng_for(0, "test", 0)
    scene = tw.pool_scene(rng)
    record = tw.qa_record(rng, "r0", "pool/000000.png", scene)
    messages = prompt_messages(parse_record(record, 0).messages)
    input_ids, labels = encode_conversation(tokenizer, messages, [4], max_length=512)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    supervised = tokenizer.decode([t for t in labels.tolist() if t != IGNORE_INDEX and t != im_end])
    answers = "".join(t["value"] for t in record["conversations"] if t["from"] == "gpt")
    assert supervised.replace(" ", "") == answers.replace(" ", "")
    assert (labels == im_end).sum() == len(record["conversations"]) // 2
