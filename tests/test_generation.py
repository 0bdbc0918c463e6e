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
    a row with two images; text alone; a prompt whose last token is an image pad (its first new
token continues after the image's highest position, not its last one)."""
    p = processor
    images = _images()
    return {
        "one_image": p(_prompt(p, "What is shown?", 1), images=images[:1]),
        "padded_pair": p([_prompt(p, "What is shown?", 1), _prompt(p, "Colour?", 1)], images=images[:2]),
        "text_and_two_images": p([_prompt(p, "Say hello to the reader, please.", 0),
                                  _prompt(p, "Compare them.", 2)], images=images[1:]),
        "text_only": p(_prompt(p, "Hi", 0)),
        "ends_inside_an_image": p("<|im_start|>user\n<|vision_start|><|image_pad|>", images=images[:1]),
    }


@torch.no_grad()
def _greedy_oracle(model, inputs, max_new_tokens: int, eos: set[int], pad: int,
                   step_logits: list | None = None) -> torch.Tensor:
    """Greedy decoding by full recomputation: every step runs the whole sequence through
    forward (positions from the attention mask), no cache. Finished rows get ``pad``.
    Each step's next-token logits are appended to ``step_logits`` when given."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    done_B = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=inputs.get("pixel_values"),
                       image_grid_thw=inputs.get("image_grid_thw")).logits
        if step_logits is not None:
            step_logits.append(logits[:, -1].float())
        next_B = logits[:, -1].float().argmax(-1)
        next_B = torch.where(done_B, torch.full_like(next_B, pad), next_B)
        ids = torch.cat([ids, next_B[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        done_B |= torch.isin(next_B, torch.tensor(sorted(eos)))
        if done_B.all():
            break
    return ids


@pytest.mark.parametrize("case", ["one_image", "padded_pair", "text_and_two_images", "text_only",
                                  "ends_inside_an_image"])
def test_greedy_equals_full_recompute_oracle(loaded, case):
    model, processor = loaded
    inputs = _cases(processor)[case]
    pad = processor.tokenizer.pad_token_id
    never = {model.config.text_config.vocab_size + 7}  # an id no step can produce: all 10 steps run
    expected_logits: list[torch.Tensor] = []
    expected = _greedy_oracle(model, inputs, 10, never, pad, expected_logits)
    assert expected.shape[1] == inputs["input_ids"].shape[1] + 10
    for use_cache in (True, False):
        got = model.generate(**inputs, max_new_tokens=10, do_sample=False, use_cache=use_cache,
                             eos_token_id=sorted(never), pad_token_id=pad,
                             return_dict_in_generate=True, output_logits=True)
        assert torch.equal(got.sequences, expected), f"use_cache={use_cache}"
        # positions too: the same tokens could come from slightly different scores
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected_logits), atol=1e-4, rtol=0)


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



def test_default_generation_config_stops_at_end_of_turn(loaded):
    model, processor = loaded
    assert sorted(model.generation_config.eos_token_id) == stop_ids(processor.tokenizer)
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id
    assert not model.generation_config.do_sample


def test_generation_config_is_saved_and_reloaded(loaded, tmp_path):
    model, _ = loaded
    model.save_pretrained(tmp_path)
    assert (tmp_path / "generation_config.json").exists()
    again = CompForConditionalGeneration.from_pretrained(tmp_path)
    assert again.generation_config.eos_token_id == model.generation_config.eos_token_id
    assert again.generation_config.pad_token_id == model.generation_config.pad_token_id


def test_beam_search_scores_are_those_of_each_rows_own_images(loaded):
    """Beam search repeats every row with its own images: each returned beam's score equals
    the log-probability a plain forward of that row (its prompt and images only) gives the
    beam's tokens. Images repeated patch by patch, or handed to the wrong row, change it."""
    model, processor = loaded
    images = _images()
    prompts = [_prompt(processor, "What is shown?", 1), _prompt(processor, "Compare them.", 2)]
    row_images = (images[:1], images[1:])
    new = 5
    out = model.generate(**processor(prompts, images=images), max_new_tokens=new, num_beams=3,
                         num_return_sequences=2, length_penalty=0.0, return_dict_in_generate=True,
                         output_scores=True, eos_token_id=[model.config.text_config.vocab_size + 7],
                         pad_token_id=processor.tokenizer.pad_token_id)
    assert out.sequences.shape[0] == 4
    for i, (prompt, imgs) in enumerate(zip(prompts, row_images)):
        inputs = processor(prompt, images=imgs)
        for k in range(2):
            tokens = out.sequences[2 * i + k, -new:]
            ids = torch.cat([inputs["input_ids"][0], tokens])[None]
            with torch.no_grad():
                logits = model(input_ids=ids, pixel_values=inputs["pixel_values"],
                               image_grid_thw=inputs["image_grid_thw"]).logits[0, -new - 1:-1]
            logp = torch.log_softmax(logits.float(), -1).gather(1, tokens[:, None]).sum()
            torch.testing.assert_close(out.sequences_scores[2 * i + k], logp, atol=1e-4, rtol=0)


def test_streamer_stopping_criteria_and_logits_processors(loaded):
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    model, processor = loaded
    inputs = _cases(processor)["one_image"]
    length = inputs["input_ids"].shape[1]
    free = model.generate(**inputs, max_new_tokens=8, eos_token_id=[model.config.text_config.vocab_size + 7])

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= length + 3)

    class Ban(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, int(free[0, length])] = -float("inf")
            return scores

    recorder = Recorder()
    stopped = model.generate(**inputs, max_new_tokens=8, streamer=recorder,
                             stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert torch.equal(stopped, free[:, :length + 3])
    assert recorder.ended and recorder.puts[0] == inputs["input_ids"].tolist()
    assert [p[0] for p in recorder.puts[1:]] == free[0, length:length + 3].tolist()
    banned = model.generate(**inputs, max_new_tokens=1, logits_processor=LogitsProcessorList([Ban()]))
    assert banned[0, -1] != free[0, length]
