"""Generation of a saved tiny CoMP-MM: greedy decoding against a full-recompute oracle (the
hand-written loop this model had before it generated through transformers' GenerationMixin),
cached == uncached, stopping, beam search and streamers."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from comp import CompForConditionalGeneration, CompProcessor
from comp.tokens import stop_ids


@pytest.fixture(scope="module")
def loaded(tiny_mm_dir):
    model = CompForConditionalGeneration.from_pretrained(tiny_mm_dir).eval()
    return model, CompProcessor.from_pretrained(tiny_mm_dir, max_num_vistoken=16)


def _images():
    g = torch.Generator().manual_seed(1)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
            for h, w in ((56, 84), (112, 56), (84, 84))]


def _prompt(processor, question: str, n_images: int) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _cases(processor) -> dict[str, dict]:
    """One image; two left-padded rows with images of different sizes; a text-only row beside
    a row with two images; text alone."""
    p = processor
    images = _images()
    return {
        "one_image": p(_prompt(p, "What is shown?", 1), images=images[:1]),
        "padded_pair": p([_prompt(p, "What is shown?", 1), _prompt(p, "Colour?", 1)], images=images[:2]),
        "text_and_two_images": p([_prompt(p, "Say hello to the reader, please.", 0),
                                  _prompt(p, "Compare them.", 2)], images=images[1:]),
        "text_only": p(_prompt(p, "Hi", 0)),
    }


@torch.no_grad()
def _greedy_oracle(model, inputs, max_new_tokens: int, eos: set[int], pad: int) -> torch.Tensor:
    """Greedy decoding by full recomputation: every step runs the whole sequence through
    forward (positions from the attention mask), no cache. Finished rows get ``pad``."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    done_B = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs.get("pixel_values"),
                       image_grid_thw=inputs.get("image_grid_thw")).logits
        next_B = logits[:, -1].float().argmax(-1)
        next_B = torch.where(done_B, torch.full_like(next_B, pad), next_B)
        ids = torch.cat([ids, next_B[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        done_B |= torch.isin(next_B, torch.tensor(sorted(eos)))
        if done_B.all():
            break
    return ids


@pytest.mark.parametrize("case", ["one_image", "padded_pair", "text_and_two_images", "text_only"])
def test_greedy_equals_full_recompute_oracle(loaded, case):
    model, processor = loaded
    inputs = _cases(processor)[case]
    pad = processor.tokenizer.pad_token_id
    never = {model.config.text_config.vocab_size + 7}  # an id no step can produce: all 10 steps run
    expected = _greedy_oracle(model, inputs, 10, never, pad)
    assert expected.shape[1] == inputs["input_ids"].shape[1] + 10
    for use_cache in (True, False):
        got = model.generate(**inputs, max_new_tokens=10, do_sample=False, use_cache=use_cache,
                             eos_token_id=sorted(never), pad_token_id=pad)
        assert torch.equal(got, expected), f"use_cache={use_cache}"


def test_eos_stops_rows_and_pads_finished_ones(loaded):
    """The stop ids end a row (later steps pad it); generation ends when every row has."""
    model, processor = loaded
    inputs = _cases(processor)["padded_pair"]
    pad, length = processor.tokenizer.pad_token_id, inputs["input_ids"].shape[1]
    free = _greedy_oracle(model, inputs, 12, {-1}, pad)
    eos = {int(free[0, length + 2])}  # row 0 stops after its third token
    expected = _greedy_oracle(model, inputs, 12, eos, pad)
    got = model.generate(**inputs, max_new_tokens=12, eos_token_id=sorted(eos), pad_token_id=pad)
    assert torch.equal(got, expected)
    assert got[0, length + 3:].eq(pad).all() or got.shape[1] == length + 3

