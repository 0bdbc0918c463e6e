"""A CoMP-MM on toyworld's held-out questions (``qa_eval/questions.json``): does it answer,
and does it look at the image to do so?

- Exact match: greedy answers to the prompts ``comp chat`` builds (CompProcessor's
  ``encode_messages``: the training renderer, the default system turn, the image before the
  question as Stage III records hold it), stopped at the chat's stop ids, compared after
  ``normalise_answer``; by question type and overall, with the majority answer of each type
  as the baseline a model that ignores images can reach.
- Image use: the answer's negative log-likelihood, teacher-forced after the same prompt, in
  mean nats per answer token (the answer's own tokens: not ``<|im_end|>``), once with the
  question's image and once with another question's image (a fixed derangement over the
  distinct images, drawn from a seed). A model that reads its image has the second clearly
  higher; the difference comes with its per-item std and standard error.
- Resolutions (``evaluate_qa``): "fixed S px" (every image squeezed into S x S first, as a
  VFM pre-trained at one square size sees it), "native" (each image at its own size within a
  token budget) and "native 2x" (the scenes re-rendered at twice the size).

Shape legend: B questions of a batch, L tokens, V vocabulary, A answer tokens.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from comp.data.image import PROCESSOR_MAX_NUM_VISTOKEN

QUESTION_FIELDS = ("id", "image", "image_hires", "type", "question", "answer")


def normalise_answer(text: str) -> str:
    """Whitespace-trimmed, lower-case, runs of whitespace as one space, no trailing period."""
    text = " ".join(text.strip().lower().split())
    return text.rstrip(".").rstrip()


def load_questions(qa_dir: str | Path) -> list[dict]:
    """The records of ``qa_dir/questions.json`` with their image paths made absolute; an
    error names the file, the record and the missing field or image."""
    qa_dir = Path(qa_dir)
    path = qa_dir / "questions.json"
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the questions ({err}); write them with "
                         "`comp data toyworld`") from None
    out = []
    for k, r in enumerate(records):
        missing = [f for f in QUESTION_FIELDS if not isinstance(r.get(f), str) or not r[f]]
        if missing:
            raise ValueError(f"{path}: record {k} ({r.get('id', '?')}) lacks {', '.join(missing)}")
        paths = {f: qa_dir / r[f] for f in ("image", "image_hires")}
        for field, p in paths.items():
            if not p.is_file():
                raise ValueError(f"{path}: record {k} ({r['id']}): {field} {p} does not exist")
        out.append({**r, **paths})
    return out


def question_messages(question: str) -> list[dict]:
    """One user turn: the image, then the question (``comp chat``'s layout)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def _batches(n: int, size: int) -> list[range]:
    return [range(lo, min(n, lo + size)) for lo in range(0, n, size)]


@torch.no_grad()
def generate_answers(model, processor, questions: Sequence[dict], images: Sequence[Path], *,
                     batch_size: int = 16, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers (decoded, special tokens dropped) to each question about its image."""
    from comp.tokens import stop_ids

    model.eval()
    stops, answers = stop_ids(processor.tokenizer), []
    for batch in _batches(len(questions), batch_size):
        inputs = processor.encode_messages([question_messages(questions[i]["question"]) for i in batch],
                                           images=[images[i] for i in batch], padding_side="left")
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        ids_BL = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=stops, pad_token_id=processor.tokenizer.pad_token_id)
        answers += processor.batch_decode(ids_BL[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def exact_match(predictions: Sequence[str], questions: Sequence[dict]) -> dict:
    """Accuracy overall and per question type, after ``normalise_answer``; each type with
    its count and majority baseline (the share of its most frequent true answer)."""
    if len(predictions) != len(questions):
        raise ValueError(f"{len(predictions)} predictions for {len(questions)} questions")
    hits = [normalise_answer(p) == normalise_answer(q["answer"]) for p, q in zip(predictions, questions)]
    by_type: dict[str, dict] = {}
    for qtype in dict.fromkeys(q["type"] for q in questions):
        index = [i for i, q in enumerate(questions) if q["type"] == qtype]
        truth = Counter(normalise_answer(questions[i]["answer"]) for i in index)
        by_type[qtype] = {"accuracy": sum(hits[i] for i in index) / len(index), "n": len(index),
                          "majority": truth.most_common(1)[0][1] / len(index)}
    return {"accuracy": sum(hits) / max(1, len(hits)), "n": len(hits), "by_type": by_type}


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The answer's tokens as training tokenises assistant text (special-token strings stay text)."""
    return tokenizer(answer, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@torch.no_grad()
def answer_nll(model, processor, questions: Sequence[dict], images: Sequence[Path], *,
               batch_size: int = 16) -> torch.Tensor:
    """[N] mean nats per answer token of each question's true answer, teacher-forced after
    its generation prompt with ``images[i]``. Rows are left-padded; the answer ends each row."""
    from comp.data.collator import pad_rows

    model.eval()
    tokenizer, out = processor.tokenizer, []
    for batch in _batches(len(questions), batch_size):
        inputs = processor.encode_messages([question_messages(questions[i]["question"]) for i in batch],
                                           images=[images[i] for i in batch], padding_side="right")
        answers = [answer_ids(tokenizer, questions[i]["answer"]) for i in batch]
        if not all(answers):
            raise ValueError(f"an answer has no tokens: {[questions[i]['id'] for i in batch]}")
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        rows = pad_rows([p + a for p, a in zip(prompts, answers)], tokenizer.pad_token_id,
                        "input_ids", "attention_mask", side="left")
        longest = max(len(a) for a in answers)
        logits_BAV = model(input_ids=rows["input_ids"].to(model.device),
                           attention_mask=rows["attention_mask"].to(model.device),
                           pixel_values=inputs["pixel_values"].to(model.device),
                           image_grid_thw=inputs["image_grid_thw"].to(model.device),
                           logits_to_keep=longest + 1).logits.float()
        log_p_BAV = torch.log_softmax(logits_BAV[:, :-1], dim=-1)  # position t predicts t + 1
        for b, ans in enumerate(answers):
            target_A = torch.tensor(ans, device=log_p_BAV.device)
            picked_A = log_p_BAV[b, log_p_BAV.shape[1] - len(ans):].gather(-1, target_A[:, None])[:, 0]
            out.append(-picked_A.mean().cpu())
    return torch.stack(out) if out else torch.zeros(0)


def derangement(n: int, seed: int) -> list[int]:
    """A permutation of range(n) without fixed points (Sattolo's single cycle), from ``seed``."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    gen = torch.Generator().manual_seed(seed)
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = int(torch.randint(i, (1,), generator=gen))
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def other_images(images: Sequence[Path], seed: int = 0) -> list[Path]:
    """For each question, the image of another question: the distinct images deranged, so
    no question gets its own image back even when images repeat."""
    distinct = list(dict.fromkeys(images))
    swap = dict(zip(distinct, (distinct[j] for j in derangement(len(distinct), seed))))
    return [swap[p] for p in images]


def image_use(model, processor, questions: Sequence[dict], images: Sequence[Path], *,
              seed: int = 0, batch_size: int = 16) -> dict:
    """Mean answer NLL with the right image and with another question's image (same prompts,
    same answers), their difference (wrong - right) with per-item std and standard error,
    and the share of questions whose answer the right image makes more likely."""
    right_N = answer_nll(model, processor, questions, images, batch_size=batch_size)
    wrong_N = answer_nll(model, processor, questions, other_images(images, seed), batch_size=batch_size)
    diff_N = wrong_N - right_N
    std = float(diff_N.std()) if len(diff_N) > 1 else 0.0
    return {"nll_right": float(right_N.mean()), "nll_wrong": float(wrong_N.mean()),
            "difference": float(diff_N.mean()), "difference_std": std,
            "difference_se": std / math.sqrt(max(1, len(diff_N))),
            "right_better": float((diff_N > 0).float().mean()), "n": len(diff_N)}


def resolution_names(fixed_size: int) -> tuple[str, str, str]:
    """The resolution variants' names, in ``resolution_processors``' order."""
    return f"fixed {fixed_size}px", "native", "native 2x"


def resolution_processors(model_dir: str | Path, fixed_size: int, native_tokens: int) -> dict:
    """Variant name -> (CompProcessor, the question field holding its image)."""
    from comp.data.processor import CompProcessor

    native = CompProcessor.from_pretrained(model_dir, max_num_vistoken=native_tokens)
    fixed = CompProcessor.from_pretrained(model_dir, force_resize=fixed_size, max_num_vistoken=native_tokens)
    return dict(zip(resolution_names(fixed_size), ((fixed, "image"), (native, "image"), (native, "image_hires"))))


def evaluate_qa(model, model_dir: str | Path, qa_dir: str | Path, *, fixed_size: int = 64,
                native_tokens: int = PROCESSOR_MAX_NUM_VISTOKEN, limit: int | None = None, seed: int = 0,
                batch_size: int = 16, max_new_tokens: int = 8, variants: Sequence[str] | None = None) -> dict:
    """Exact match and image use of ``model`` (saved with its processor in ``model_dir``) on
    the first ``limit`` questions of ``qa_dir`` (None: all), per resolution variant (those
    named in ``variants``; None: every one of ``resolution_processors``)."""
    questions = load_questions(qa_dir)[:limit]
    processors = resolution_processors(model_dir, fixed_size, native_tokens)
    unknown = sorted(set(variants or ()) - set(processors))
    if unknown:
        raise ValueError(f"unknown QA variants {unknown}; choose from {list(processors)}")
    results = {}
    for name, (processor, field) in processors.items():
        if variants is not None and name not in variants:
            continue
        images = [q[field] for q in questions]
        answers = generate_answers(model, processor, questions, images, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens)
        results[name] = {**exact_match(answers, questions),
                         "image_use": image_use(model, processor, questions, images, seed=seed,
                                                batch_size=batch_size),
                         "examples": [{"question": q["question"], "answer": q["answer"], "predicted": a}
                                      for q, a in list(zip(questions, answers))[:3]]}
    return results
