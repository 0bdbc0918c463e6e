"""Chat rendering, image-pad expansion and exact label masks (tiny and real Qwen2 vocabularies)."""
from __future__ import annotations

import re

from pathlib import Path

import pytest
from transformers import AutoTokenizer

import comp
from comp.data.conversation import encode_conversation, load_tokenizer, render_text
from comp.tokens import IGNORE_INDEX
from comp.data.prompts import PROMPT_FORMATS, prompt_messages
from comp.data.records import SkipSample, parse_record

CHAT_TEMPLATE = Path(comp.__file__).parent / "chat_template.jinja"
VISION = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

CASES = {
    "multi_turn": ({"conversations": [
        {"from": "human", "value": "What is 3.14 + 2?"}, {"from": "gpt", "value": "5.14"},
        {"from": "human", "value": "And twice that?"}, {"from": "gpt", "value": "10.28, I'm fine!"}]}, []),
    "multi_image": ({"image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\nCompare with <image> please."},
        {"from": "gpt", "value": "The left one is red; the right one is blue."}]}, [4, 6]),
    "system_prompt": ({"image": "a.png", "conversations": [
        {"from": "system", "value": "You are a helpful assistant."},
        {"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": "A small green star."},
        {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "\nTop left corner."}]}, [3]),
}


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir("qwen2"))


@pytest.fixture(scope="module")
def qwen2_tokenizer(qwen2_tokenizer_dir):
    tok = load_tokenizer(qwen2_tokenizer_dir)  # appends the vision tokens the vocabulary lacks
    ids = tok.convert_tokens_to_ids(VISION)
    assert len(set(ids)) == 5 and min(ids) > 151_645  # after the BPE vocabulary and chat specials
    tok.chat_template = CHAT_TEMPLATE.read_text()  # the project's format: no default system prompt
    return tok


def expand_pads(text: str, counts: list[int]) -> str:
    parts = text.split("<|image_pad|>")
    return parts[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, parts[1:]))


def oracle(tokenizer, text: str):
    """Ids of the whole rendered string, and labels from its answer spans (found by regex)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(m.start(1), m.end(1)) for m in re.finditer(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, re.S)]
    labels = [t if any(a <= s < b for a, b in spans) else IGNORE_INDEX
              for t, (s, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    return enc["input_ids"], labels


def check_exact(tokenizer, name, prompt_format):
    obj, counts = CASES[name]
    messages = prompt_messages(parse_record(obj, 0).messages, prompt_format)
    assert render_text(messages) == tokenizer.apply_chat_template(
        messages, tokenize=False, default_system=prompt_format == "reference")
    ids, labels = encode_conversation(tokenizer, messages, counts, max_length=10_000)
    want_ids, want_labels = oracle(tokenizer, expand_pads(render_text(messages), counts))
    assert ids.tolist() == want_ids
    assert labels.tolist() == want_labels
    # Supervised runs decode to exactly each answer followed by <|im_end|>.
    runs, run = [], []
    for t, l in zip(ids.tolist(), labels.tolist()):
        if l == IGNORE_INDEX:
            if run:
                runs.append(run)
            run = []
        else:
            run.append(t)
    answers = [t["value"] for t in obj["conversations"] if t["from"] == "gpt"]
    if prompt_format == "reference":
        assert tokenizer.decode(ids).startswith("<|im_start|>system\nYou are a helpful")
    assert [tokenizer.decode(r) for r in runs] == [a.lstrip("\n") + "<|im_end|>" for a in answers] or \
        [tokenizer.decode(r) for r in runs] == [a + "<|im_end|>" for a in answers]
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ids.tolist().count(pad) == sum(counts)
    assert all(l == IGNORE_INDEX for t, l in zip(ids.tolist(), labels.tolist()) if t == pad)


@pytest.mark.parametrize("prompt_format", PROMPT_FORMATS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_masks_exact_tiny_tokenizer(tiny_tokenizer, name, prompt_format):
    check_exact(tiny_tokenizer, name, prompt_format)


@pytest.mark.parametrize("prompt_format", PROMPT_FORMATS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_masks_exact_qwen2_vocabulary(qwen2_tokenizer, name, prompt_format):
    check_exact(qwen2_tokenizer, name, prompt_format)


def test_literal_layout(tiny_tokenizer):  # the inplace format: parse_record's messages as they are
    messages = parse_record({"image": "a", "conversations": [
        {"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "ok"}]}, 0).messages
    ids, labels = encode_conversation(tiny_tokenizer, messages, [2], max_length=100)
    text = tiny_tokenizer.decode(ids)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>hi<|im_end|>\n"
                    "<|im_start|>assistant\nok<|im_end|>\n")
    supervised = [t for t, l in zip(ids.tolist(), labels.tolist()) if l != IGNORE_INDEX]
    assert tiny_tokenizer.decode(supervised) == "ok<|im_end|>"
    assert labels[-1] == IGNORE_INDEX  # the newline after <|im_end|>


def test_truncation_cuts_trailing_text(tiny_tokenizer):
    messages = parse_record({"image": "a", "conversations": [
        {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "red green blue " * 20}]}, 0).messages
    full_ids, full_labels = encode_conversation(tiny_tokenizer, messages, [4], max_length=10_000)
    ids, labels = encode_conversation(tiny_tokenizer, messages, [4], max_length=20)
    assert ids.tolist() == full_ids[:20].tolist() and labels.tolist() == full_labels[:20].tolist()


def test_truncation_never_cuts_an_image(tiny_tokenizer):
    messages = parse_record({"image": ["a", "b"], "conversations": [
        {"from": "human", "value": "<image>q<image>"}, {"from": "gpt", "value": "ok"}]}, 0).messages
    full, _ = encode_conversation(tiny_tokenizer, messages, [5, 5], max_length=10_000)
    vision_end = tiny_tokenizer.convert_tokens_to_ids("<|vision_end|>")
    image_end = max(i for i, t in enumerate(full.tolist()) if t == vision_end) + 1
    with pytest.raises(SkipSample) as info:
        encode_conversation(tiny_tokenizer, messages, [5, 5], max_length=image_end - 1)
    assert info.value.reason == "too_long"
    with pytest.raises(SkipSample) as info:  # image kept, but no answer token left
        encode_conversation(tiny_tokenizer, messages, [5, 5], max_length=image_end + 1)
    assert info.value.reason == "no_supervised_tokens"


def test_no_assistant_turn_is_unsupervised(tiny_tokenizer):
    messages = parse_record({"conversations": [{"from": "human", "value": "q"}]}, 0).messages
    with pytest.raises(SkipSample, match="no_supervised_tokens"):
        encode_conversation(tiny_tokenizer, messages, [], max_length=100)


def test_tokenizer_without_vision_tokens_is_refused(qwen2_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    messages = parse_record({"conversations": [{"from": "gpt", "value": "x"}]}, 0).messages
    with pytest.raises(ValueError, match="lacks <\\|vision_start\\|>"):
        encode_conversation(tok, messages, [], max_length=100)
