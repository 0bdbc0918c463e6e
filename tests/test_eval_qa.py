"""comp.eval.qa on the tiny random CoMP-MM and a small toyworld: the answer normaliser, the
per-type breakdown, teacher-forced NLL against the model's own training loss, and the image
swap that tests whether the model uses its image."""
from __future__ import annotations

import json
import math

import pytest
import torch

from comp.data import toyworld as tw
from comp.eval import qa
from comp.tokens import IGNORE_INDEX

N_QUESTIONS = 12  # two per type


@pytest.fixture(scope="module")
def qa_dir(tmp_path_factory):
    """qa_eval/ as toyworld writes it, two questions per type."""
    out, counts = tmp_path_factory.mktemp("qa"), {}
    tw._write_qa_eval(out, seed=0, per_type=2, counts=counts)
    return out / "qa_eval"


@pytest.fixture(scope="module")
def questions(qa_dir):
    return qa.load_questions(qa_dir)


@pytest.mark.parametrize("raw, clean", [(" Red.", "red"), ("TOP  left\n", "top left"), ("42", "42"),
                                        ("the circle..", "the circle"), ("", ""), ("a. b", "a. b")])
def test_normalise_answer(raw, clean):
    assert qa.normalise_answer(raw) == clean


def test_exact_match_by_type_with_majority_baseline():
    questions = [{"type": "colour", "answer": "red"}, {"type": "colour", "answer": "red"},
                 {"type": "colour", "answer": "blue"}, {"type": "count", "answer": "2"}]
    result = qa.exact_match(["Red.", "blue", "blue", " 2 "], questions)
    assert result["accuracy"] == 0.75 and result["n"] == 4
    assert result["by_type"] == {"colour": {"accuracy": 2 / 3, "n": 3, "majority": 2 / 3},
                                 "count": {"accuracy": 1.0, "n": 1, "majority": 1.0}}
    with pytest.raises(ValueError, match="1 predictions for 4 questions"):
        qa.exact_match(["red"], questions)


def test_load_questions_names_file_record_and_field(qa_dir, tmp_path):
    import shutil

    assert len(qa.load_questions(qa_dir)) == N_QUESTIONS
    copy = shutil.copytree(qa_dir, tmp_path / "qa_eval")
    entries = json.loads((copy / "questions.json").read_text())
    del entries[3]["answer"]
    (copy / "questions.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"qa_eval/questions.json: record 3 \(tw-qa-shape-0001\) lacks answer"):
        qa.load_questions(copy)
    (copy / "val" / "00000.png").unlink()
    del entries[3]
    (copy / "questions.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"record 0 \(tw-qa-colour-0000\): image .*00000.png does not exist"):
        qa.load_questions(copy)


def test_derangement_and_other_images():
    for n in (2, 3, 10):
        perm = qa.derangement(n, seed=1)
        assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
    assert qa.derangement(10, 1) == qa.derangement(10, 1) != qa.derangement(10, 2)
    images = ["a", "b", "a", "c"]  # repeated images never come back to their question
    swapped = qa.other_images(images, seed=0)
    assert all(s != i for s, i in zip(swapped, images)) and swapped[0] == swapped[2]
    with pytest.raises(ValueError, match="at least 2"):
        qa.derangement(1, 0)


def test_teacher_forced_sequence_is_the_training_rendering(mm, questions):
    """Prompt + answer ids equal what training renders for the Stage III record, up to the
    supervised answer (before its <|im_end|>)."""
    from comp.data.conversation import encode_conversation
    from comp.data.prompts import prompt_messages
    from comp.data.records import parse_record

    processor = mm[1]
    for q in questions[::3]:
        inputs = processor.encode_messages([qa.question_messages(q["question"])], images=[q["image"]])
        tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
        record = parse_record({"id": q["id"], "image": "x.png", "conversations": [
            {"from": "human", "value": "<image>\n" + q["question"]}, {"from": "gpt", "value": q["answer"]}]}, 0)
        ids, labels = encode_conversation(processor.tokenizer, prompt_messages(record.messages), [tokens],
                                          max_length=4096)
        ours = inputs["input_ids"][0].tolist() + qa.answer_ids(processor.tokenizer, q["answer"])
        assert ids[: len(ours)].tolist() == ours, q["id"]
        supervised = labels[labels != IGNORE_INDEX].tolist()
        assert supervised[:-1] == qa.answer_ids(processor.tokenizer, q["answer"])  # + <|im_end|>


def test_answer_nll_is_the_models_own_loss_and_batch_invariant(mm, questions):
    """Oracle: the model's training loss with labels on the answer tokens only; a question's
    NLL does not depend on the other (differently long, differently sized) rows of its batch."""
    model, processor = mm
    images = [q["image"] for q in questions]
    batched = qa.answer_nll(model, processor, questions, images, batch_size=5)
    alone = qa.answer_nll(model, processor, questions, images, batch_size=1)
    assert batched.shape == (N_QUESTIONS,) and bool((batched > 0).all())
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    for i in (0, 7):
        q = questions[i]
        inputs = processor.encode_messages([qa.question_messages(q["question"])], images=[q["image"]])
        answer = qa.answer_ids(processor.tokenizer, q["answer"])
        ids = torch.cat([inputs["input_ids"], torch.tensor([answer])], 1)
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[0, -len(answer):] = ids[0, -len(answer):]
        with torch.no_grad():
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                         image_grid_thw=inputs["image_grid_thw"], labels=labels).lm_loss
        torch.testing.assert_close(batched[i], loss, rtol=1e-4, atol=1e-4)


def test_image_use_compares_the_same_prompts_with_swapped_images(mm, questions):
    model, processor = mm
    images = [q["image"] for q in questions]
    result = qa.image_use(model, processor, questions, images, seed=0, batch_size=6)
    right = qa.answer_nll(model, processor, questions, images, batch_size=6)
    wrong = qa.answer_nll(model, processor, questions, qa.other_images(images, 0), batch_size=6)
    assert result["nll_right"] == pytest.approx(float(right.mean()))
    assert result["nll_wrong"] == pytest.approx(float(wrong.mean()))
    assert result["difference"] == pytest.approx(float((wrong - right).mean()))
    assert result["difference_std"] == pytest.approx(float((wrong - right).std()))
    assert not torch.equal(right, wrong)  # the image reaches the answer's likelihood
    assert result["n"] == N_QUESTIONS and 0 <= result["right_better"] <= 1
    assert qa.image_use(model, processor, questions, images, seed=0, batch_size=6) == result


def test_evaluate_qa_per_variant_and_type_and_deterministic(mm, tiny_mm_dir, qa_dir):
    model, _ = mm
    first = qa.evaluate_qa(model, tiny_mm_dir, qa_dir, fixed_size=64, native_tokens=256, max_new_tokens=4)
    assert list(first) == ["fixed 64px", "native", "native 2x"]
    for result in first.values():
        assert list(result["by_type"]) == list(tw.QA_TYPES)
        assert all(r["n"] == 2 for r in result["by_type"].values())
        assert 0 <= result["accuracy"] <= 1 and result["n"] == N_QUESTIONS
        assert all(isinstance(e["predicted"], str) for e in result["examples"])
        assert math.isfinite(result["image_use"]["difference"])
    assert qa.evaluate_qa(model, tiny_mm_dir, qa_dir, fixed_size=64, native_tokens=256,
                          max_new_tokens=4) == first
    native = qa.evaluate_qa(model, tiny_mm_dir, qa_dir, fixed_size=64, native_tokens=256, max_new_tokens=4,
                            variants=["native"])
    assert native == {"native": first["native"]}  # one variant alone: the same numbers
    with pytest.raises(ValueError, match="unknown QA variants"):
        qa.evaluate_qa(model, tiny_mm_dir, qa_dir, fixed_size=64, variants=["fixed 112px"])
