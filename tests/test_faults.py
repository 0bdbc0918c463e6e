"""Fault injection (issue 11): every bad record, file, directory or flag a user can supply is
named and skipped or refused up front; no crash, hang, runaway memory or silent NaN.

Each test builds its case on the tiny checkpoints and asserts the named outcome (error text,
exit status, skip reason and count, weights unchanged). Nothing here depends on timing: the
subprocess timeouts only keep a regression (a hang) from blocking the suite.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from comp.data.check import check
from comp.data.collator import DataCollator
from comp.data.conversation import encode_conversation, load_tokenizer
from comp.data.dataset import MixtureDataset, Skipped
from comp.data.image import CompImageProcessor
from comp.data.mixture import load_mixture
from comp.train.trainer import COMPLETE_MARKER

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 256


def _cli(*args, timeout=300, env=None):
    """``python -m comp ARGS`` -> CompletedProcess (the real console entry point)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "comp", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc, prog: str) -> str:
    """The convention: exit 2, the last stderr line ``comp <cmd>: ...``, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: "), last
    return last


def _record(rid, question="<image>\nWhat is it?", answer="a red square", image="red.png"):
    rec = {"id": rid, "conversations": [{"from": "human", "value": question},
                                        {"from": "gpt", "value": answer}]}
    if image is not None:
        rec["image"] = image
    return rec


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (64, 48), (220, 20, 20)).save(root / "red.png")
    Image.new("RGB", (48, 64), (20, 20, 220)).save(root / "blue.jpg", quality=90)
    return root


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _dataset(data: Path, images: Path, tokenizer, **kwargs) -> MixtureDataset:
    return MixtureDataset(load_mixture(str(data), image_folder=str(images)), tokenizer,
                          CompImageProcessor(max_num_vistoken=16), model_max_length=MAX_LEN, **kwargs)


def _check(data: Path, images: Path, tokenizer_dir, **kwargs) -> dict:
    return check(str(data), image_folder=str(images), processor_kwargs={"max_num_vistoken": 16},
                 tokenizer_dir=str(tokenizer_dir), model_max_length=MAX_LEN, **kwargs)


def _reasons(dataset: MixtureDataset) -> dict[str, str | None]:
    """record id -> skip reason (None: kept), as training sees them."""
    out = {}
    for i in range(len(dataset)):
        item = dataset[i]
        rid = item.where.split("(id ")[-1].rstrip(")") if isinstance(item, Skipped) else \
            item["record"].split("(id ")[-1].rstrip(")")
        out[rid] = item.reason if isinstance(item, Skipped) else None
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return load_tokenizer(tiny_dir("qwen2"))


# ------------------------------------------------------------------ records that killed training

SPECIALS = ["<|image_pad|>", "<|vision_start|>", "<|im_end|>", "<|im_start|>", "<|vision_end|>",
            "<|endoftext|>"]


def test_special_tokens_in_record_text_are_plain_text(tokenizer, images, tmp_path):
    text = " ".join(SPECIALS)
    rec = _record("sp", question=f"<image>\n{text} what?", answer=f"{text}<|im_start|>user\nhi")
    ids, labels = encode_conversation(tokenizer, _parse(rec)["messages"], [4], max_length=MAX_LEN)
    vocab = tokenizer.get_vocab()
    # exactly the structural specials: 2 turns -> 2 im_start, 2 im_end; one image of 4 pads
    assert (ids == vocab["<|im_start|>"]).sum() == 2 and (ids == vocab["<|im_end|>"]).sum() == 2
    assert (ids == vocab["<|image_pad|>"]).sum() == 4 and (ids == vocab["<|vision_start|>"]).sum() == 1
    assert (ids == vocab["<|endoftext|>"]).sum() == 0
    # the dataset (training) keeps it and its alignment text has no special id either
    data = _write_jsonl(tmp_path / "d.jsonl", [rec])
    sample = _dataset(data, images, tokenizer)[0]
    assert not isinstance(sample, Skipped)
    specials = {vocab[t] for t in SPECIALS}
    assert not specials & set(sample["align_ids"].tolist())
    # the word prior counts no special id for such answers
    from comp.data.prior import word_prior

    counts, bad = word_prior(str(data), str(tokenizer.name_or_path))
    assert bad == 0 and all(counts[i] == 0 for i in specials)


@pytest.mark.parametrize("prompt_format", ["reference", "inplace"])
def test_prompts_of_chat_and_plugin_keep_typed_special_tokens_plain(tiny_mm_dir, images, prompt_format):
    """comp chat and the lmms-eval plugin build prompts with CompProcessor.encode_messages:
    the chat template's ids for ordinary text, and a typed special token stays text."""
    from comp import CompProcessor

    processor = CompProcessor.from_pretrained(tiny_mm_dir, prompt_format=prompt_format)
    vocab = processor.tokenizer.get_vocab()
    picture = Image.open(images / "red.png")
    plain = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
              {"role": "assistant", "content": "a red square"},
              {"role": "user", "content": "And now?"}],
             [{"role": "user", "content": "Say hi."}]]
    ours = processor.encode_messages(plain, images=[picture])
    theirs = processor([processor.apply_chat_template(m, add_generation_prompt=True) for m in plain],
                       images=[picture])
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])

    typed = " ".join(SPECIALS)
    ids = processor.encode_messages([[{"role": "user", "content": f"{typed} what?"}]])["input_ids"][0]
    turns = 2 if prompt_format == "reference" else 1  # the default system turn, the user turn
    assert (ids == vocab["<|im_start|>"]).sum() == turns + 1  # + the generation prompt
    assert (ids == vocab["<|im_end|>"]).sum() == turns
    for token in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>"):
        assert (ids == vocab[token]).sum() == 0, token
    assert processor.decode(ids).count(typed) == 1  # and it reads back as the text typed


def _parse(rec):
    from comp.data.records import parse_record

    r = parse_record(rec, 0)
    return {"messages": r.messages, "images": r.images}


def test_empty_answers_with_alignment_loss_train(tiny_mm_dir, tmp_path, images):
    from comp import CompForConditionalGeneration
    from comp.data.processor import CompProcessor

    processor = CompProcessor.from_pretrained(tiny_mm_dir)
    model = CompForConditionalGeneration.from_pretrained(tiny_mm_dir)
    model.config.use_alignment_loss = True
    model.set_word_prior("uniform")
    data = _write_jsonl(tmp_path / "d.jsonl", [_record("e1", answer=""), _record("e2", answer="")])
    ds = MixtureDataset(load_mixture(str(data), image_folder=str(images)), processor.tokenizer,
                        processor.image_processor, model_max_length=MAX_LEN)
    batch = DataCollator(processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch.inputs["align_input_ids"].shape == (2, 1) and batch.inputs["align_attention_mask"].sum() == 0
    out = model(**batch.inputs)
    assert torch.isfinite(out.loss) and float(out.align_loss) == 0.0


def test_lone_surrogates_are_named_malformed_records(tokenizer, images, tmp_path, tiny_dir):
    data = tmp_path / "d.jsonl"
    good = json.dumps(_record("good"))
    data.write_text(good + "\n" + '{"id": "sur", "image": "red.png", "conversations": [{"from": '
                    '"human", "value": "<image>\\ud800 hi"}, {"from": "gpt", "value": "x"}]}\n'
                    + '{"id": "\\udfff", "conversations": [{"from": "human", "value": "a"}, '
                    '{"from": "gpt", "value": "b\\udc80"}]}\n')
    reasons = _reasons(_dataset(data, images, tokenizer))
    assert reasons["good"] is None and reasons["sur"] == "malformed_record"
    assert list(reasons.values()).count("malformed_record") == 2
    summary = _check(data, images, tiny_dir("qwen2"))
    assert summary["errors"]["malformed_record"]["count"] == 2
    assert any("id sur" in ex and "surrogate" in ex for ex in summary["errors"]["malformed_record"]["examples"])
    json.dumps(summary, ensure_ascii=False).encode("utf-8")  # the report itself is printable
    from comp.data.prior import word_prior

    _, bad = word_prior(str(data), str(tiny_dir("qwen2")))
    assert bad == 2


def test_overlong_path_components_and_non_files_are_skipped(tokenizer, images, tmp_path, tiny_dir):
    os.mkfifo(images / "pipe.png")
    (images / "dir.png").mkdir()
    records = [_record("long", image="x" * 300 + ".png"), _record("fifo", image="pipe.png"),
               _record("dir", image="dir.png"), _record("devnull", image="../" * 12 + "dev/null"),
               _record("ok")]
    data = _write_jsonl(tmp_path / "d.jsonl", records)
    reasons = _reasons(_dataset(data, images, tokenizer))
    assert reasons == {"long": "bad_image_path", "fifo": "bad_image_path", "dir": "bad_image_path",
                       "devnull": "path_escape", "ok": None}
    summary = _check(data, images, tiny_dir("qwen2"))
    assert summary["errors"]["bad_image_path"]["count"] == 3
    assert any("File name too long" in ex for ex in summary["errors"]["bad_image_path"]["examples"])
    assert any("named pipe" in ex for ex in summary["errors"]["bad_image_path"]["examples"])


def test_length_grouping_never_opens_a_pipe(tmp_path, images, tiny_dir):
    """modality_lengths reads image headers; a FIFO among the images must not block it (a
    regression would hang: run it in a child process the suite can give up on)."""
    os.mkfifo(images / "pipe.png")
    data = _write_jsonl(tmp_path / "d.jsonl", [_record("fifo", image="pipe.png"), _record("ok")])
    code = ("import sys; from comp.data.conversation import load_tokenizer;"
            "from comp.data.dataset import MixtureDataset; from comp.data.image import CompImageProcessor;"
            "from comp.data.mixture import load_mixture;"
            f"ds = MixtureDataset(load_mixture({str(data)!r}, image_folder={str(images)!r}),"
            f" load_tokenizer({str(tiny_dir('qwen2'))!r}), CompImageProcessor(max_num_vistoken=16),"
            " model_max_length=64); print(ds.modality_lengths.tolist())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lengths = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(lengths) == 2 and 0 < lengths[0] < lengths[1]  # the pipe counts 1 visual token


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_check_finds_truncated_images_without_decode_as_training_does(tokenizer, images, tmp_path, tiny_dir):
    Image.effect_noise((96, 96), 60).convert("RGB").save(images / "cut.jpg", quality=95)
    Image.effect_noise((96, 96), 60).convert("RGB").save(images / "cut.png")
    Image.new("RGB", (64, 48)).save(images / "noend.jpg")
    _truncate(images / "cut.jpg", 0.97)
    _truncate(images / "cut.png", 0.97)
    raw = (images / "noend.jpg").read_bytes()
    assert raw.endswith(b"\xff\xd9")
    (images / "noend.jpg").write_bytes(raw[:-2])  # every byte but the end-of-image marker
    records = [_record("jpg", image="cut.jpg"), _record("png", image="cut.png"),
               _record("noend", image="noend.jpg"), _record("ok", image="blue.jpg")]
    data = _write_jsonl(tmp_path / "d.jsonl", records)
    summary = _check(data, images, tiny_dir("qwen2"))  # no --decode
    assert summary["errors"]["undecodable_image"]["count"] == 3 and summary["num_errors"] == 3
    assert all("truncated" in ex for ex in summary["errors"]["undecodable_image"]["examples"])
    reasons = _reasons(_dataset(data, images, tokenizer))
    assert reasons == {"jpg": "undecodable_image", "png": "undecodable_image",
                       "noend": "undecodable_image", "ok": None}


def _huge_png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (the data is a few bytes)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("decode", [False, True])
def test_over_budget_images_are_refused_from_the_header(images, tmp_path, tiny_dir, monkeypatch, decode):
    from PIL import ImageFile

    _huge_png_header(images / "huge.png", 12000, 12000)  # 144 M pixels > 2**27
    data = _write_jsonl(tmp_path / "d.jsonl", [_record("huge", image="huge.png"), _record("ok")])

    def no_decoding(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    summary = _check(data, images, tiny_dir("qwen2"), decode=decode)
    examples = summary["errors"]["undecodable_image"]["examples"]
    assert summary["errors"]["undecodable_image"]["count"] >= 1
    assert any("id huge" in ex and "above the limit" in ex for ex in examples), examples


# ------------------------------------------------------------------ memory and wrong directories

def test_default_config_is_tiny():
    from comp import CompConfig

    config = CompConfig()
    assert config.text_config.hidden_size <= 256 and config.text_config.num_hidden_layers <= 4
    assert config.vision_config.hidden_size <= 256


@pytest.mark.parametrize("cmd", ["chat", "export-vfm"])
def test_commands_check_the_directory_kind(cmd, tiny_dir, tmp_path):
    for wrong, kind in ((tiny_dir("qwen2"), "LLM"), (tiny_dir("siglip"), "original vision encoder"),
                        (tmp_path, "no config.json")):
        args = [cmd, wrong, "--prompt", "hi"] if cmd == "chat" else [cmd, wrong, "--out", tmp_path / "out"]
        line = _one_line_error(_cli(*args), f"comp {cmd}")
        assert kind in line and (kind == "no config.json" or "CoMP-MM" in line), line
    assert not (tmp_path / "out").exists()


def test_encode_and_train_check_directory_kinds(tiny_dir, tiny_mm_dir, tmp_path, images):
    line = _one_line_error(_cli("encode", tiny_mm_dir, images / "red.png", "--out", tmp_path / "f.st"),
                           "comp encode")
    assert "CoMP-MM" in line and "CoMP-VFM" in line
    line = _one_line_error(_cli("train", "--model_name_or_path", tiny_dir("siglip"), "--data_path",
                                tmp_path / "x.json", "--output_dir", tmp_path / "o"), "comp train")
    assert "original vision encoder" in line and "LLM" in line


def _copy_mm(tiny_mm_dir, tmp_path) -> Path:
    out = tmp_path / "mm"
    shutil.copytree(tiny_mm_dir, out)
    return out


def test_missing_tensors_are_an_error_not_random_weights(tiny_mm_dir, tmp_path):
    mm = _copy_mm(tiny_mm_dir, tmp_path)
    state = load_file(mm / "model.safetensors")
    del state["visual.merger.ln_q.weight"]
    save_file(state, mm / "model.safetensors", metadata={"format": "pt"})
    for args, prog in ((["export-vfm", mm, "--out", tmp_path / "vfm"], "comp export-vfm"),
                       (["chat", mm, "--prompt", "hi"], "comp chat")):
        line = _one_line_error(_cli(*args), prog)
        assert "visual.merger.ln_q.weight" in line and "random" in line
    assert not (tmp_path / "vfm").exists()


def test_corrupt_weights_and_escaping_shard_index_are_named(tiny_mm_dir, tmp_path):
    mm = _copy_mm(tiny_mm_dir, tmp_path)
    _truncate(mm / "model.safetensors", 0.5)
    line = _one_line_error(_cli("export-vfm", mm, "--out", tmp_path / "vfm"), "comp export-vfm")
    assert str(mm / "model.safetensors") in line and "truncated or corrupt" in line

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_mm_dir, sharded)
    (sharded / "model.safetensors").rename(tmp_path / "outside.safetensors")
    names = list(load_file(tmp_path / "outside.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "../outside.safetensors" for n in names}}))
    line = _one_line_error(_cli("export-vfm", sharded, "--out", tmp_path / "vfm"), "comp export-vfm")
    assert "outside the checkpoint directory" in line and "model.safetensors.index.json" in line


# ------------------------------------------------------------------ resume

def _flags(assets, out, *extra, steps=2, vision=None, data=None):
    return ["--model_name_or_path", assets["llm"], "--custom_visual_model", vision or assets["vision"],
            "--data_path", data or assets["data"] / "stage2.yaml", "--output_dir", out,
            "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model", "--learning_rate", "1e-3",
            "--max_steps", str(steps), "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--max_num_vistoken", "16", "--model_max_length", "512", "--use_alignment_loss", "1",
            "--word_dist_path", "uniform",
            "--report_to", "none", "--use_cpu", "True", "--seed", "3", "--dataloader_num_workers", "0",
            "--save_strategy", "no", *extra]


@pytest.fixture(scope="module")
def checkpointed(assets, tmp_path_factory):
    """A run that saved checkpoint-1 and checkpoint-2."""
    out = tmp_path_factory.mktemp("checkpointed") / "run"
    proc = _cli("train", *_flags(assets, out, "--save_strategy", "steps", "--save_steps", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def test_complete_marker_lists_files_and_sizes(checkpointed):
    info = json.loads((checkpointed / "checkpoint-2" / COMPLETE_MARKER).read_text())
    files = info["files"]
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "model.safetensors"} <= set(files)
    assert files["optimizer.pt"] == (checkpointed / "checkpoint-2" / "optimizer.pt").stat().st_size
    assert info["model"] and info["global_step"] == 2


@pytest.mark.parametrize("damage", ["no_optimizer", "no_scheduler", "truncated_weights", "bad_state"])
def test_auto_resume_skips_a_checkpoint_that_does_not_verify(checkpointed, tmp_path, damage):
    from comp.train.trainer import checkpoint_problem, last_complete_checkpoint

    run = _copy_run(checkpointed, tmp_path)
    ckpt = run / "checkpoint-2"
    if damage == "no_optimizer":
        (ckpt / "optimizer.pt").unlink()
    elif damage == "no_scheduler":
        (ckpt / "scheduler.pt").unlink()
    elif damage == "truncated_weights":
        _truncate(ckpt / "model.safetensors", 0.5)
    else:
        (ckpt / "trainer_state.json").write_text("{")
    reasons = []
    assert last_complete_checkpoint(run, report=lambda p, why: reasons.append((p, why))) == run / "checkpoint-1"
    assert reasons and reasons[0][0] == ckpt and checkpoint_problem(ckpt) == reasons[0][1]
    assert checkpoint_problem(run / "checkpoint-1") is None


def test_named_checkpoint_that_does_not_verify_is_refused(checkpointed, tmp_path, assets):
    run = _copy_run(checkpointed, tmp_path)
    (run / "checkpoint-2" / "optimizer.pt").unlink()
    proc = _cli("train", *_flags(assets, run, "--resume_from_checkpoint", run / "checkpoint-2", steps=3))
    line = _one_line_error(proc, "comp train")
    assert "optimizer.pt is missing" in line and "checkpoint-2" in line


def test_resuming_another_models_checkpoints_is_refused(checkpointed, tmp_path, assets, tiny_dir):
    run = _copy_run(checkpointed, tmp_path)
    # auto: another encoder makes another run, whose start into this directory is refused
    proc = _cli("train", *_flags(assets, run, "--resume_from_checkpoint", "auto", steps=3,
                                 vision=tiny_dir("dinov2")))
    line = _one_line_error(proc, "comp train")
    assert "checkpoints of another run" in line and "custom_visual_model" in line
    # a named checkpoint is continued with new settings, but not by another architecture
    proc = _cli("train", *_flags(assets, run, "--resume_from_checkpoint", run / "checkpoint-2", steps=3,
                                 vision=tiny_dir("dinov2")))
    line = _one_line_error(proc, "comp train")
    assert "another model" in line and "checkpoint-2" in line
    assert "'loss'" not in proc.stdout  # refused before any step


def test_all_skipped_steps_do_not_move_the_weights(assets, tmp_path):
    """Allowed to skip everything (--max_skip_fraction 1), the steps leave weights and schedule
    as they were (the checkpoints show it), and the run ends as having trained nothing."""
    records = json.loads((assets["data"] / "data" / "stage1_captions.json").read_text())[:4]
    for r in records:
        r["image"] = "gone.png"
    data = tmp_path / "all_bad.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    proc = _cli("train", *_flags(assets, out, "--image_folder", assets["data"] / "images",
                                 "--max_skip_fraction", "1", "--weight_decay", "0.1",
                                 "--save_strategy", "steps", "--save_steps", "1", data=data))
    line = _one_line_error(proc, "comp train")
    assert "trained nothing: every sample of its 2 step(s) was skipped" in line and "missing_image: 4" in line
    assert "every sample was skipped" in proc.stdout + proc.stderr
    assert not (out / "model.safetensors").exists()  # the untrained model is no step's output
    from comp.models.weights import load_state_dict

    trained = load_file(out / "checkpoint-2" / "model.safetensors")
    llm = load_state_dict(assets["llm"])
    for name, tensor in llm.items():  # the word table cut to the tokenizer's rows at build time
        if name in trained:
            assert torch.equal(trained[name], tensor[:trained[name].shape[0]]), f"{name} moved in an all-skipped step"
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    lrs = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]
    assert lrs and len(set(lrs)) == 1  # the schedule did not advance



def test_unwritable_output_dir_is_found_before_step_one(assets, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = _cli("train", *_flags(assets, blocker / "out"))
    line = _one_line_error(proc, "comp train")
    assert "not writable" in line and str(blocker / "out") in line
    assert "'loss'" not in proc.stdout


# ------------------------------------------------------------------ numbers

def test_non_finite_loss_stops_with_step_parts_and_records(assets, tmp_path):
    out = tmp_path / "out"
    proc = _cli("train", *_flags(assets, out, "--embed_temp", "1e-45", "--save_strategy", "steps",
                                 "--save_steps", "1", steps=3))
    line = _one_line_error(proc, "comp train")
    assert "step 1" in line and "not finite" in line and "align_loss" in line and "record" in line
    assert not (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize("flag,value,message", [
    ("--embed_temp", "0", "--embed_temp must be > 0"),
    ("--word_temp", "-1", "--word_temp must be > 0"),
    ("--loss_weight", "-0.1", "--loss_weight must be >= 0"),
    ("--max_skip_fraction", "1.5", "--max_skip_fraction must be in [0, 1]"),
    ("--lm_loss_chunk_size", "0", "--lm_loss_chunk_size must be > 0"),
    ("--pos_interp_mode", "cubic", "--pos_interp_mode/--pos-interp-mode: invalid choice: 'cubic'"),
    ("--mm_tunable_parts", ",", "--mm_tunable_parts is empty"),
    ("--sinkhorn_iters", "0", "--sinkhorn_iters must be >= 1"),
])
def test_numeric_flags_are_validated_at_parse_time(flag, value, message, capsys):
    from comp.train.args import parse_args

    argv = ["--model_name_or_path", "x", "--data_path", "y", "--output_dir", "z", flag, value]
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ interactive use

def test_chat_repl_survives_bad_images(tiny_mm_dir, tmp_path, images, monkeypatch, capsys):
    from comp.eval import chat

    Image.new("RGB", (402, 2)).save(images / "sliver.png")  # aspect ratio 201
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nope")
    script = "".join(f"/image {p}\n" for p in (images / "sliver.png", images / "broken.png", images,
                                               images / "gone.png"))
    script += f"/image\n/image {images / 'red.png'}\nWhat is it?\n/exit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    assert chat.main([str(tiny_mm_dir), "--max_new_tokens", "3", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "aspect ratio" in err and "broken.png" in err and "directory" in err and "gone.png" in err
    assert err.count("the conversation goes on without it") == 5


def test_one_shot_chat_refuses_an_unprocessable_image_and_an_overlong_prompt(tiny_mm_dir, images, capsys):
    from comp.eval import chat

    Image.new("RGB", (402, 2)).save(images / "sliver.png")
    assert chat.main([str(tiny_mm_dir), "--image", str(images / "sliver.png"), "--prompt", "hi"]) == 2
    assert "aspect ratio" in capsys.readouterr().err
    assert chat.main([str(tiny_mm_dir), "--prompt", "word " * 5000, "--device", "cpu"]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err


def test_chat_drops_the_oldest_exchanges_to_fit_the_context(tiny_mm_dir, images, capsys):
    from comp.eval import chat

    model, processor = chat.load_chat_model(tiny_mm_dir, "cpu")
    conv = chat.Conversation()
    red = chat.attach_image(processor, images / "red.png")
    conv.add_user("first " * 30, [red])
    conv.add_assistant("one")
    conv.add_user("second " * 30)
    conv.add_assistant("two")
    conv.add_user("third?")
    settings = chat.GenerationSettings(max_new_tokens=8)
    full = processor(processor.apply_chat_template(conv.messages, add_generation_prompt=True),
                     images=conv.images)["input_ids"].shape[1]
    model.config.text_config.max_position_embeddings = full  # too small by max_new_tokens
    inputs = chat.fit_to_context(model, processor, conv, settings)
    assert inputs["input_ids"].shape[1] + 8 <= full
    assert conv.messages[0]["content"][0]["text"].startswith("second") and conv.images == []
    assert "dropped the 1 oldest exchange" in capsys.readouterr().err


def test_encode_skips_and_names_bad_files(tiny_dir, images, tmp_path):
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nope")
    Image.new("RGB", (402, 2)).save(images / "sliver.png")
    out = tmp_path / "f.safetensors"
    proc = _cli("encode", tiny_dir("siglip"), images / "red.png", images / "broken.png",
                images / "sliver.png", images / "gone.png", images / "blue.jpg", "--out", out,
                "--device", "cpu")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert all(n in proc.stderr for n in ("broken.png", "sliver.png", "gone.png"))
    keys = load_file(out).keys()
    assert {"0/red/pooled", "1/blue/pooled"} <= set(keys) and len(keys) == 6
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _one_line_error(_cli("encode", tiny_dir("siglip"), images / "red.png", "--out",
                                blocker / "f.safetensors"), "comp encode")
    assert "not writable" in line


def test_debug_shows_the_traceback(tiny_dir, tmp_path):
    quiet = _cli("export-vfm", tiny_dir("qwen2"), "--out", tmp_path / "o")
    _one_line_error(quiet, "comp export-vfm")
    loud = _cli("--debug", "export-vfm", tiny_dir("qwen2"), "--out", tmp_path / "o")
    assert loud.returncode == 2 and "Traceback" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip().splitlines()[-1]
