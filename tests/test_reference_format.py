"""The default prompt format equals the reference's: Qwen2-VL's chat template applied to the
reference's conversion of LLaVA records (both written here from their published rules)."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from comp.data.conversation import encode_conversation, load_tokenizer, render_text
from comp.tokens import IGNORE_INDEX
from comp.data.processor import CompProcessor
from comp.data.prompts import prompt_messages
from comp.data.records import parse_record
from comp.data.show import SUPERVISED_CLOSE, SUPERVISED_OPEN
from comp.data.show import main as show_main

# Qwen2-VL-*-Instruct's chat_template (tokenizer_config.json / chat_template.json), verbatim.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

RECORDS = {
    "image_first": {"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "A red circle."}]},
    "image_last": {"image": "a.png", "conversations": [
        {"from": "human", "value": "What is shown?\n<image>"}, {"from": "gpt", "value": "A star."}]},
    "image_middle": {"image": "a.png", "conversations": [
        {"from": "human", "value": "Look at <image> and count."}, {"from": "gpt", "value": "Three."},
        {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "\nBlue."}]},
    "image_twice": {"image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nCompare <image>them."},
        {"from": "gpt", "value": "Left is bigger."}]},
    "system_turn": {"image": "a.png", "conversations": [
        {"from": "system", "value": "Answer briefly."},
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Green."}]},
    "leading_gpt_turn": {"conversations": [
        {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
}
# image_twice has three placeholders for two images in one turn: make it consistent.
RECORDS["image_twice"]["image"] = ["a.png", "b.png", "c.png"]


def reference_conversion(record: dict) -> list[dict]:
    """The reference's LLaVA record -> Qwen2-VL messages: roles human/gpt -> user/assistant, a
    leading non-human turn dropped (a system turn is kept), every turn's images first, then
    its text with "<image>\\n" and "<image>" removed."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    turns = record["conversations"]
    system = [t for t in turns[:1] if t["from"] == "system"]
    rest = turns[len(system):]
    if rest and rest[0]["from"] != "human":
        rest = rest[1:]
    messages = []
    for turn in system + rest:
        text = turn["value"]
        content = [{"type": "image"} for _ in range(text.count("<image>"))]
        content.append({"type": "text", "text": text.replace("<image>\n", "").replace("<image>", "")})
        messages.append({"role": roles[turn["from"]], "content": content})
    return messages


@pytest.fixture(scope="module")
def qwen2_tokenizer(qwen2_tokenizer_dir):
    return load_tokenizer(qwen2_tokenizer_dir)


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_training_text_equals_qwen2_vl_template_of_the_reference_conversion(qwen2_tokenizer, name):
    record = RECORDS[name]
    ours = render_text(prompt_messages(parse_record(record, 0).messages))
    want = qwen2_tokenizer.apply_chat_template(reference_conversion(record), chat_template=QWEN2_VL_TEMPLATE,
                                               tokenize=False)
    assert ours == want
    # ids: the rendered text with each image's pads expanded, tokenised as one string
    counts = [3 + k for k in range(len(parse_record(record, 0).images))]
    ids, labels = encode_conversation(qwen2_tokenizer, prompt_messages(parse_record(record, 0).messages),
                                      counts, max_length=10_000)
    parts = want.split("<|image_pad|>")
    expanded = parts[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, parts[1:]))
    assert ids.tolist() == qwen2_tokenizer(expanded, add_special_tokens=False)["input_ids"]
    # supervised: exactly the answers (of the kept turns) and their <|im_end|>; never the system turn
    supervised = qwen2_tokenizer.decode([t for t, l in zip(ids.tolist(), labels.tolist()) if l != IGNORE_INDEX])
    answers = [m["content"][-1]["text"] for m in reference_conversion(record) if m["role"] == "assistant"]
    assert supervised.replace("\n", "") == "".join(a.replace("\n", "") + "<|im_end|>" for a in answers)
    assert "You are a helpful assistant." not in supervised and "Answer briefly." not in supervised


def test_inplace_format_keeps_placeholders_in_place_without_system(qwen2_tokenizer):
    messages = prompt_messages(parse_record(RECORDS["image_middle"], 0).messages, "inplace")
    assert render_text(messages).startswith(
        "<|im_start|>user\nLook at <|vision_start|><|image_pad|><|vision_end|> and count.<|im_end|>")


def test_processor_renders_prompts_as_qwen2_vl(tiny_dir):
    processor = CompProcessor.from_components(tiny_dir("qwen2"), tiny_dir("siglip"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "Which is larger?"}]}]
    want = processor.tokenizer.apply_chat_template(messages, chat_template=QWEN2_VL_TEMPLATE,
                                                   tokenize=False, add_generation_prompt=True)
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == want
    inplace = CompProcessor.from_components(tiny_dir("qwen2"), tiny_dir("siglip"), prompt_format="inplace")
    assert inplace.apply_chat_template(messages, add_generation_prompt=True) == \
        want.replace("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", "")


def test_plugin_user_turn_as_the_reference_evaluates():
    pytest.importorskip("lmms_eval")
    from comp.eval.lmms_plugin import user_content

    context = "<image>\nWhat is in <image> the picture?"
    assert user_content(context, 2) == [{"type": "image"}, {"type": "image"},
                                        {"type": "text", "text": "\nWhat is in  the picture?"}]
    assert user_content(context, 2, "inplace")[:2] == [{"type": "image"}, {"type": "text", "text": "\nWhat is in "}]


def test_literal_special_token_text_in_a_record_stays_text(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir("qwen2"))
    messages = prompt_messages(parse_record({"conversations": [
        {"from": "human", "value": "What does <|image_pad|> mean?"}, {"from": "gpt", "value": "A token."}]}, 0).messages)
    ids, _ = encode_conversation(tok, messages, [], max_length=1000)
    assert tok.convert_tokens_to_ids("<|image_pad|>") not in ids.tolist()
    assert "What does <|image_pad|> mean?" in tok.decode(ids)


def test_data_show_prints_the_record_with_supervised_spans(tmp_path, tiny_dir, capsys):
    from PIL import Image

    Image.new("RGB", (56, 84), (200, 10, 10)).save(tmp_path / "a.png")
    (tmp_path / "d.json").write_text(json.dumps([RECORDS["image_first"], RECORDS["system_turn"]]))
    assert show_main([str(tmp_path / "d.json"), "--image_folder", str(tmp_path), "--index", "1"]) == 0
    out = capsys.readouterr().out
    assert (f"<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n"
            f"<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
            f"<|im_start|>assistant\n{SUPERVISED_OPEN}Green.<|im_end|>{SUPERVISED_CLOSE}") in out
    assert show_main([str(tmp_path / "d.json"), "--image_folder", str(tmp_path), "--tokenizer",
                      str(tiny_dir("qwen2")), "--vision", str(tiny_dir("siglip"))]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>system\nYou are a helpful assistant.<|im_end|>" in out
    assert f"{SUPERVISED_OPEN}A red circle.<|im_end|>{SUPERVISED_CLOSE}" in out
    assert "<|vision_start|><|image_pad|>x" in out and "supervised" in out and "tokens:" in out
    # a record whose image is missing shows the skip reason
    (tmp_path / "a.png").unlink()
    assert show_main([str(tmp_path / "d.json"), "--image_folder", str(tmp_path), "--tokenizer",
                      str(tiny_dir("qwen2"))]) == 0
    assert "skipped: missing_image" in capsys.readouterr().out
