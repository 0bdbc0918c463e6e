"""comp chat: one-shot and interactive answers from a saved tiny CoMP-MM, streamed."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import skimage
import torch

from comp.data.image import load_image
from comp.eval import chat
from comp.tokens import IM_END, stop_ids

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
PHOTOS = [SKIMAGE_DATA / "chelsea.png", SKIMAGE_DATA / "page.png"]  # RGB 451x300, L 384x191


@pytest.fixture(scope="module")
def loaded(tiny_mm_dir):
    return chat.load_chat_model(tiny_mm_dir)


def _direct_answer(model, processor, messages, images, max_new_tokens):
    """The oracle: the model's own generate on the rendered prompt, decoded."""
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(prompt, images=images or None)
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=stop_ids(processor.tokenizer))
    return processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class Recorder:
    def __init__(self):
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


def test_stop_ids_are_end_of_turn_and_end_of_text(loaded):
    tok = loaded[1].tokenizer
    assert stop_ids(tok) == sorted({tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id})


def test_reply_streams_each_new_token(loaded):
    model, processor = loaded
    conversation = chat.Conversation()
    conversation.add_user("What is shown?", [load_image(p) for p in PHOTOS])
    recorder = Recorder()
    answer = chat.reply(model, processor, conversation, chat.GenerationSettings(max_new_tokens=6), recorder)
    prompt = processor.encode_messages([conversation.messages], images=conversation.images)["input_ids"]
    assert recorder.puts[0] == prompt.tolist()  # transformers' streamer protocol: the prompt first
    assert recorder.ended and 1 <= len(recorder.puts) - 1 <= 6
    streamed = [ids[0] for ids in recorder.puts[1:]]
    assert answer == processor.decode(streamed, skip_special_tokens=True)
    assert answer == _direct_answer(model, processor, conversation.messages, conversation.images, 6)


def test_comp_chat_prints_the_answer_for_photos(tiny_mm_dir, loaded, capsys):
    argv = [str(tiny_mm_dir), "--image", str(PHOTOS[0]), "--image", str(PHOTOS[1]),
            "--prompt", "Describe both images.", "--max_new_tokens", "8"]
    assert chat.main(argv) == 0
    printed = capsys.readouterr().out
    model, processor = loaded
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                             {"type": "text", "text": "Describe both images."}]}]
    expected = _direct_answer(model, processor, messages, [load_image(p) for p in PHOTOS], 8)
    assert printed == expected + "\n"


def test_sampling_is_repeatable_for_a_seed(tiny_mm_dir, capsys):
    argv = [str(tiny_mm_dir), "--image", str(PHOTOS[0]), "--prompt", "Hi", "--max_new_tokens", "8",
            "--temperature", "1.5", "--seed", "3"]
    outs = []
    for _ in range(2):
        assert chat.main(argv) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]


def test_interactive_mode_keeps_the_history(tiny_mm_dir, loaded, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is it?\n\nAnd the colour?\n/exit\nnever read\n"))
    assert chat.main([str(tiny_mm_dir), "--image", str(PHOTOS[0]), "--max_new_tokens", "5"]) == 0
    printed = capsys.readouterr().out
    model, processor = loaded
    image = load_image(PHOTOS[0])
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    answer1 = _direct_answer(model, processor, first, [image], 5)
    second = first + [{"role": "assistant", "content": answer1},
                      {"role": "user", "content": [{"type": "text", "text": "And the colour?"}]}]
    answer2 = _direct_answer(model, processor, second, [image], 5)
    assert printed == f"{answer1}\n{answer2}\n"
    # the check above sees the history: without it the model's next-token scores differ
    with_ids = processor(processor.apply_chat_template(second, add_generation_prompt=True), images=[image])
    without_ids = processor(processor.apply_chat_template(second[-1:], add_generation_prompt=True))
    assert not torch.allclose(model(**with_ids, logits_to_keep=1).logits,
                              model(**without_ids, logits_to_keep=1).logits)


def test_interactive_image_command_and_reset(tiny_mm_dir, loaded, monkeypatch, capsys):
    script = f"/image {PHOTOS[1]}\nRead it.\n/reset\nHello\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert chat.main([str(tiny_mm_dir), "--max_new_tokens", "4"]) == 0
    printed = capsys.readouterr().out
    model, processor = loaded
    read = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]}]
    hello = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    expected = (_direct_answer(model, processor, read, [load_image(PHOTOS[1])], 4) + "\n"
                + _direct_answer(model, processor, hello, [], 4) + "\n")
    assert printed == expected


def test_chat_errors_name_what_is_wrong(tiny_mm_dir, tmp_path, capsys):
    assert chat.main([str(tmp_path), "--prompt", "Hi"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert chat.main([str(tiny_mm_dir), "--image", str(tmp_path / "gone.jpg"), "--prompt", "Hi"]) == 2
    assert "gone.jpg" in capsys.readouterr().err


def test_an_empty_turn_is_announced(tiny_mm_dir, capsys):
    """A model whose first token ends the turn: the user sees a notice, not silence; a model
    that answers with a word gets none."""
    import torch

    from comp.models.mllm import CompLMHead

    model, processor = chat.load_chat_model(tiny_mm_dir, device="cpu")
    conversation = chat.Conversation()
    conversation.add_user("Hi", [load_image(PHOTOS[0])])
    settings = chat.GenerationSettings(max_new_tokens=4)

    def always(token_id: int) -> CompLMHead:  # logits: 1 for token_id, 0 elsewhere
        head = CompLMHead(model.lm_head.in_features, model.lm_head.out_features, bias=True)
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.bias[token_id] = 1.0
        return head

    word = processor.tokenizer("cat", add_special_tokens=False)["input_ids"][0]
    model.lm_head = always(word)
    assert chat.reply(model, processor, conversation, settings).strip()
    assert chat.EMPTY_TURN not in capsys.readouterr().err
    model.lm_head = always(processor.tokenizer.convert_tokens_to_ids(IM_END))
    assert chat.reply(model, processor, conversation, settings) == ""
    assert chat.EMPTY_TURN in capsys.readouterr().err
