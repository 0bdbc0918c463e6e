"""Issue 20 (C, and item 6): outputs never over inputs, written atomically, a full disk in one
line, and no command reads garbage weights into garbage outputs.

A full disk is injected where each command writes (the library call raises what it raised on
a 64 KiB tmpfs, after writing part of the file), so the test needs no mount.
"""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from comp.cli import run_command
from comp.train.trainer import checkpoint_problem, last_complete_checkpoint
from runs import run_script
from test_faults import _cli, _one_line_error
from test_run_ownership import _flags, _snapshot

# What the libraries raised on a full 64 KiB tmpfs (see comp.files).
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
TORCH_SAVE_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (220, 20, 20)).save(path)
    return path


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ outputs over inputs

@pytest.mark.parametrize("cmd", ["export-vfm", "encode", "data prior", "train"])
def test_no_command_writes_over_its_own_input(tiny_mm_dir, tiny_dir, image, assets, tmp_path, cmd):  # noqa: F811
    if cmd == "export-vfm":
        guarded = _copy(tiny_mm_dir, tmp_path / "mm")
        args = ["export-vfm", guarded, "--out", guarded]
    elif cmd == "encode":
        guarded = _copy(tiny_dir("siglip"), tmp_path / "vfm")
        args = ["encode", guarded, image, "--out", guarded / "model.safetensors"]
    elif cmd == "data prior":
        guarded = _copy(assets["data"] / "data", tmp_path / "data")
        data = guarded / "stage1_captions.json"
        args = ["data", "prior", data, "--tokenizer", tiny_dir("qwen2"), "--out", data]
    else:
        guarded = _copy(tiny_mm_dir, tmp_path / "mm")
        args = ["train", *_flags(assets, guarded), "--model_name_or_path", guarded]
    before = _snapshot(guarded)
    line = _one_line_error(_cli(*args), f"comp {cmd}")
    assert "would write over this command's own input" in line, line
    assert _snapshot(guarded) == before


def test_tiny_writes_over_nothing_but_the_same_tiny_checkpoint(tiny_mm_dir, tmp_path):
    mm = _copy(tiny_mm_dir, tmp_path / "mm")
    before = _snapshot(mm)
    line = _one_line_error(_cli("tiny", "--kind", "qwen2", "--out", mm), "comp tiny")
    assert "already holds something else" in line and _snapshot(mm) == before
    for _ in range(2):  # writing the same tiny checkpoint again (a rerun script) is fine
        assert _cli("tiny", "--kind", "qwen2", "--out", tmp_path / "q").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mm", "q"]  # no temporary left


# ------------------------------------------------------------------ full disk

def _full_after_partial(message, exc=RuntimeError):
    """A save function that writes part of its file, then fails as on a full disk."""
    def save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04")
        raise exc(message)
    return save


def test_full_disk_in_export_vfm_leaves_no_half_directory(tiny_mm_dir, tmp_path, monkeypatch, capsys):
    from comp.train import export

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file",
                        _full_after_partial(SAFETENSORS_FULL, SafetensorError))
    out = tmp_path / "vfm"
    assert run_command("comp export-vfm", export.main, [str(tiny_mm_dir), "--out", str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"comp export-vfm: the disk is full (no space left while writing) ({out}): free some space and run it again"
    assert list(tmp_path.iterdir()) == []  # before: a folder with only config.json


def test_full_disk_in_data_prior_leaves_no_empty_file(assets, tiny_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    from comp.data import prior

    monkeypatch.setattr(torch, "save", _full_after_partial(TORCH_SAVE_FULL))
    out = tmp_path / "word_dist.pt"
    argv = [str(assets["data"] / "stage1.yaml"), "--tokenizer", str(tiny_dir("qwen2")), "--out", str(out)]
    assert run_command("comp data prior", prior.main, argv) == 2
    assert "comp data prior: the disk is full" in capsys.readouterr().err.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # before: a 0-byte file


def test_full_disk_in_encode_keeps_the_previous_output(tiny_dir, image, tmp_path, monkeypatch, capsys):
    from comp.eval import encode

    out = tmp_path / "features.safetensors"
    out.write_bytes(b"the previous features")
    monkeypatch.setattr("comp.models.weights._save_file", _full_after_partial(SAFETENSORS_FULL, SafetensorError))
    assert run_command("comp encode", encode.main, [str(tiny_dir("siglip")), str(image), "--out", str(out),
                                                   "--device", "cpu"]) == 2
    assert "comp encode: the disk is full" in capsys.readouterr().err.strip().splitlines()[-1]
    assert out.read_bytes() == b"the previous features" and set(tmp_path.iterdir()) == {image, out}


# `python FILLER.py FLAGS` = comp train whose disk fills while checkpoint-2's optimizer.pt is written.
FILLER = textwrap.dedent(f"""
    import sys, torch
    from pathlib import Path
    from comp.cli import run_command
    from comp.train import run

    real_save = torch.save
    def save(obj, path, *args, **kwargs):
        if str(path).endswith("checkpoint-2/optimizer.pt"):
            Path(path).write_bytes(b"PK")
            raise RuntimeError({TORCH_SAVE_FULL!r})
        return real_save(obj, path, *args, **kwargs)
    torch.save = save
    sys.exit(run_command("comp train", run.main, sys.argv[1:]))
""")


def test_full_disk_while_checkpointing_is_one_line_and_the_last_checkpoint_stays(assets, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = run_script(FILLER, tmp_path / "filler.py", _flags(assets, out, steps=3))
    line = _one_line_error(proc, "comp train")
    assert line.startswith("comp train: the disk is full (no space left while writing) "
                           f"({out / 'checkpoint-2'}): free space, then resume with --resume_from_checkpoint "
                           f"{out / 'checkpoint-1'}"), line
    assert not (out / "checkpoint-2").exists() and checkpoint_problem(out / "checkpoint-1") is None
    assert last_complete_checkpoint(out) == out / "checkpoint-1"


# ------------------------------------------------------------------ garbage weights in

def _poison(directory: Path) -> str:
    weights = directory / "model.safetensors"
    state = load_file(weights)
    name = next(k for k, v in state.items() if v.is_floating_point() and "visual" in k or "vision" in k)
    state[name].view(-1)[0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    return name


def test_non_finite_weights_are_refused_by_encode_chat_and_export(tiny_mm_dir, tiny_dir, image, tmp_path):
    mm = _copy(tiny_mm_dir, tmp_path / "mm")
    bad = _poison(mm)
    for args, prog in ((["export-vfm", mm, "--out", tmp_path / "vfm"], "comp export-vfm"),
                       (["chat", mm, "--prompt", "hi", "--device", "cpu"], "comp chat")):
        line = _one_line_error(_cli(*args), prog)
        assert f"the weight {bad} holds NaN or inf" in line and str(mm) in line
    assert not (tmp_path / "vfm").exists()
    vfm = _copy(tiny_dir("siglip"), tmp_path / "siglip")
    bad = _poison(vfm)
    line = _one_line_error(_cli("encode", vfm, image, "--out", tmp_path / "f.safetensors"), "comp encode")
    assert "holds NaN or inf" in line and bad.split(".", 1)[1] in line
    assert not (tmp_path / "f.safetensors").exists()


def test_a_config_without_layers_is_refused(tiny_dir, image, tmp_path):
    vfm = _copy(tiny_dir("siglip"), tmp_path / "siglip")
    config = json.loads((vfm / "config.json").read_text())
    section = config["vision_config"] if "vision_config" in config else config
    section["num_hidden_layers"] = -1
    (vfm / "config.json").write_text(json.dumps(config))
    line = _one_line_error(_cli("encode", vfm, image, "--out", tmp_path / "f.safetensors"), "comp encode")
    assert "num_hidden_layers = -1" in line and "without layers" in line
