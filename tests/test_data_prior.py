"""``comp data prior``: assistant-answer token counts over the vocabulary, in the reference's file kind."""
from __future__ import annotations

import json
from collections import Counter

import torch

from comp.cli import data_main
from comp.data.conversation import load_tokenizer

ANSWERS = ["a red circle", "two blue squares, left", "Hello, world! 3.14", "a red circle"]


def write_data(tmp_path):
    records = [{"id": i, "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the picture please."}, {"from": "gpt", "value": a}]}
        for i, a in enumerate(ANSWERS[:3])]
    records.append({"id": 3, "conversations": [
        {"role": "system", "content": "system words"}, {"role": "user", "content": "q"},
        {"role": "assistant", "content": ANSWERS[3]}]})
    records.append({"id": 4, "conversations": "broken"})  # skipped, not counted
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    yml = tmp_path / "mix.yaml"
    yml.write_text("datasets:\n  - {json_path: d.jsonl, sampling_strategy: all}\n")
    return yml


def test_prior_counts_answer_tokens(tmp_path, tiny_dir, word_dist_fixture):
    yml = write_data(tmp_path)
    out = tmp_path / "out" / "word_dist.pth"
    assert data_main(["prior", str(yml), "--tokenizer", str(tiny_dir("qwen2")), "--out", str(out)]) == 0
    counts = torch.load(out, weights_only=True)
    reference = torch.load(word_dist_fixture, weights_only=True)
    assert type(counts) is type(reference) is list and all(type(c) is int for c in counts[:10])
    tokenizer = load_tokenizer(tiny_dir("qwen2"))
    assert len(counts) == len(tokenizer)
    want = Counter(t for a in ANSWERS for t in tokenizer.encode(a, add_special_tokens=False))
    assert {i: c for i, c in enumerate(counts) if c} == dict(want)
    # Two workers agree.
    out2 = tmp_path / "w2.pth"
    assert data_main(["prior", str(yml), "--tokenizer", str(tiny_dir("qwen2")), "--out", str(out2),
                      "--workers", "2"]) == 0
    assert torch.load(out2, weights_only=True) == counts


def test_prior_over_the_real_vocabulary(tmp_path, qwen2_tokenizer_dir):
    yml = write_data(tmp_path)
    out = tmp_path / "p.pth"
    assert data_main(["prior", str(yml), "--tokenizer", str(qwen2_tokenizer_dir), "--out", str(out)]) == 0
    counts = torch.load(out, weights_only=True)
    tokenizer = load_tokenizer(qwen2_tokenizer_dir)
    assert len(counts) == len(tokenizer) > 151_646  # the vocabulary plus the appended vision tokens
    (red,) = tokenizer.encode(" red", add_special_tokens=False)
    assert counts[red] == 2
    assert sum(counts) == sum(len(tokenizer.encode(a, add_special_tokens=False)) for a in ANSWERS)
