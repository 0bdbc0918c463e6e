"""Fuzz: random mutations of valid LLaVA records (types, unicode, special tokens, empty and
huge fields, path tricks) through ``comp data check`` and a short ``comp train``.

Every mutated record is either kept or skipped with a reason, nothing crashes or blocks, and
the check and training agree record by record (the check's scanner against the dataset
training reads) and in total (the check's error counts against the trainer's skip counts).
The mutations come from seeded generators: every run tests the same records.
"""
from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from comp.data.check import CheckJob, check
from comp.data.dataset import MixtureDataset, Skipped, Source
from comp.data.image import CompImageProcessor
from comp.data.mixture import load_mixture
from comp.data.records import SKIP_REASONS

MAX_LEN = 384
VISTOKENS = 16
SPECIALS = ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>", "<|im_start|>",
            "<|endoftext|>", "<image>"]
UNICODE = ["\u00e9t\u00e9", "\u202eevil", "\u200b", "e\u0301", "\U0001F600", "\ufeff", "\x00", "\ud800",
           "\udc00x", "\u4e2d\u6587", "\r\n", "\t"]
PATHS = ["../red.png", "/etc/hostname", "x" * 300 + ".png", "pipe.png", "sub", "gone.png", "./red.png",
         "sub//../red.png", "red.png\u0000", "", "red.png/", "\udcff.png", "tall.jpg", "cut.jpg",
         "tiny.png"]


def _base(k: int) -> dict:
    """A valid record: an image record (two layouts) or a text-only one."""
    if k % 3 == 0:
        return {"id": f"r{k}", "conversations": [{"from": "human", "value": "Say hi."},
                                                  {"from": "gpt", "value": "hi there"}]}
    image = "red.png" if k % 3 == 1 else ["red.png", "tall.jpg"]
    question = "<image>\nWhat is it?" if k % 3 == 1 else "<image> and <image>: compare."
    return {"id": f"r{k}", "image": image,
            "conversations": [{"from": "human", "value": question},
                              {"from": "gpt", "value": "a red square and more"},
                              {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "yes"}]}


def _mutate(rec: dict, rng: random.Random) -> dict:
    kind = rng.choice(["type", "unicode", "special", "empty", "huge", "path", "structure", "none"])
    turns = rec["conversations"]
    t = rng.randrange(len(turns))
    if kind == "type":
        target = rng.choice(["conversations", "value", "from", "image", "id", "turn"])
        junk = rng.choice([None, 3, 2.5, True, [], {}, ["a"], {"x": 1}])
        if target == "conversations":
            rec["conversations"] = junk
        elif target == "value":
            turns[t]["value"] = junk
        elif target == "from":
            turns[t]["from"] = rng.choice([junk, "robot", "GPT", ""])
        elif target == "image":
            rec["image"] = rng.choice([junk, [1, 2], [""], ["red.png", None]])
        elif target == "id":
            rec["id"] = junk
        else:
            turns[t] = junk
    elif kind == "unicode":
        s = rng.choice(UNICODE)
        turns[t]["value"] = s + turns[t]["value"] + s
    elif kind == "special":
        turns[t]["value"] = rng.choice(SPECIALS).join([turns[t]["value"], rng.choice(["", " x "])]) \
            + rng.choice(SPECIALS)
    elif kind == "empty":
        choice = rng.choice(["answer", "question", "conversations", "image", "all_answers"])
        if choice == "answer":
            turns[-1]["value"] = ""
        elif choice == "question":
            turns[0]["value"] = ""
        elif choice == "conversations":
            rec["conversations"] = []
        elif choice == "image":
            rec["image"] = []
        else:
            for turn in turns:
                if turn["from"] == "gpt":
                    turn["value"] = ""
    elif kind == "huge":
        choice = rng.choice(["answer", "question", "images"])
        if choice == "answer":
            turns[-1]["value"] = "word " * rng.choice([200, 5000])
        elif choice == "question":
            turns[0]["value"] = "long " * 3000 + turns[0]["value"]
        else:
            rec["image"] = ["red.png"] * 30
            turns[0]["value"] = "<image>" * rng.choice([30, 29])
    elif kind == "path":
        path = rng.choice(PATHS)
        if isinstance(rec.get("image"), list):
            rec["image"][rng.randrange(len(rec["image"]))] = path
        else:
            rec["image"] = path
            if "<image>" not in turns[0]["value"]:
                turns[0]["value"] = "<image>" + turns[0]["value"]
    elif kind == "structure":
        choice = rng.choice(["no_answer", "image_in_answer", "system", "only_system", "swap"])
        if choice == "no_answer":
            rec["conversations"] = [x for x in turns if x["from"] != "gpt"]
        elif choice == "image_in_answer":
            turns[-1]["value"] += "<image>"
        elif choice == "system":
            turns.insert(0, {"from": "system", "value": "Be brief."})
        elif choice == "only_system":
            rec["conversations"] = [{"from": "system", "value": "x"}]
        else:
            turns.reverse()
    return rec


def _images(root: Path) -> Path:
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (64, 48), (220, 20, 20)).save(images / "red.png")
    Image.new("RGB", (40, 100), 128).save(images / "tall.jpg")
    Image.new("RGB", (3, 3)).save(images / "tiny.png")
    Image.effect_noise((96, 96), 50).convert("RGB").save(images / "cut.jpg", quality=95)
    raw = (images / "cut.jpg").read_bytes()
    (images / "cut.jpg").write_bytes(raw[:len(raw) * 9 // 10])
    os.mkfifo(images / "pipe.png")
    return images


def _fuzzed(root: Path, seed: int, n: int) -> tuple[Path, Path]:
    rng = random.Random(seed)
    records = [_mutate(_base(k), rng) if rng.random() < 0.8 else _base(k) for k in range(n)]
    data = root / f"fuzz{seed}.json"
    # ensure_ascii writes lone surrogates as \ud800 escapes, as a careless exporter would
    data.write_text(json.dumps(records, ensure_ascii=True))
    return data, _images(root)


def _check_reasons(data: Path, images: Path, tokenizer_dir) -> list[str | None]:
    """Per record, the reason ``comp data check`` gives (its scanner, one record at a time)."""
    specs = load_mixture(str(data), image_folder=str(images))
    source = Source(specs[0], 0, 0)
    job = CheckJob([source], {"max_num_vistoken": VISTOKENS}, str(tokenizer_dir), MAX_LEN)
    job.setup()
    reasons = []
    for i in range(len(source.selected)):
        tally = job.run(0, i, i + 1)
        assert sum(tally.errors.values()) <= 1
        reasons.append(next(iter(tally.errors), None))
    return reasons


def _train_reasons(data: Path, images: Path, tokenizer, processor) -> list[str | None]:
    ds = MixtureDataset(load_mixture(str(data), image_folder=str(images)), tokenizer, processor,
                        model_max_length=MAX_LEN)
    ds.modality_lengths  # the length pass reads every header (pipes included) without blocking
    out = []
    for i in range(len(ds)):
        item = ds[i]
        out.append(item.reason if isinstance(item, Skipped) else None)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_check_and_training_data_agree_on_every_mutation(seed, tmp_path, tiny_dir):
    from comp.data.conversation import load_tokenizer

    data, images = _fuzzed(tmp_path, seed, n=60)
    by_check = _check_reasons(data, images, tiny_dir("qwen2"))
    by_train = _train_reasons(data, images, load_tokenizer(tiny_dir("qwen2")),
                              CompImageProcessor(max_num_vistoken=VISTOKENS))
    assert by_check == by_train
    assert all(r is None or r in SKIP_REASONS for r in by_check)
    assert by_check.count(None) >= 5 and len(set(by_check)) >= 5  # the fuzz exercises both sides
    summary = check(str(data), image_folder=str(images), processor_kwargs={"max_num_vistoken": VISTOKENS},
                    tokenizer_dir=str(tiny_dir("qwen2")), model_max_length=MAX_LEN)
    assert {k: v["count"] for k, v in summary["errors"].items()} == dict(Counter(r for r in by_check if r))


def test_short_training_run_skips_exactly_what_check_reports(tmp_path, tiny_dir):
    from comp.train.args import parse_args
    from comp.train.run import train

    data, images = _fuzzed(tmp_path, seed=7, n=24)
    by_check = _check_reasons(data, images, tiny_dir("qwen2"))
    batch = 4
    flags = ["--model_name_or_path", str(tiny_dir("qwen2")), "--custom_visual_model", str(tiny_dir("siglip")),
             "--data_path", str(data), "--image_folder", str(images), "--output_dir", str(tmp_path / "out"),
             "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model", "--learning_rate", "1e-3",
             "--max_steps", str(math.ceil(len(by_check) / batch)), "--per_device_train_batch_size", str(batch),
             "--max_num_vistoken", str(VISTOKENS), "--model_max_length", str(MAX_LEN),
             "--use_alignment_loss", "1", "--word_dist_path", "uniform", "--max_skip_fraction", "1", "--group_by_modality_length", "True",
             "--report_to", "none", "--use_cpu", "True", "--seed", "0", "--logging_steps", "1",
             "--dataloader_num_workers", "0", "--save_strategy", "no"]
    trainer = train(*parse_args(flags))
    stats = trainer.skip_stats
    assert stats.kept == by_check.count(None)
    assert dict(stats.counts) == dict(Counter(r for r in by_check if r))
    assert (tmp_path / "out" / "model.safetensors").exists()
