"""Issue 20 (D): bounded resources and one line for every known failure.

YAML alias bombs, JSON nested past the parser, a list where a path belongs, a 10 MB record
(text cut before tokenising), huge --resolution / budgets, bad word-prior files, chat with
stdin closed or a NaN temperature, and Ctrl-C (exit 130 with how to resume).
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from comp.cli import run_command
from comp.data.mixture import MAX_YAML_NODES, MixtureError, load_mixture
from comp.errors import UserError
from runs import run_script
from test_faults import _cli, _one_line_error
from test_run_ownership import _flags

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ data files

def _alias_bomb(path: Path, depth: int = 9, width: int = 9) -> Path:
    lines = ["a0: &a0 [" + ", ".join(["x"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, depth + 1)]
    path.write_text("\n".join(lines) + f"\ndatasets:\n- json_path: *a{depth}\n  sampling_strategy: all\n")
    return path


def test_yaml_alias_expansion_is_refused_before_it_is_built(tmp_path):
    with pytest.raises(MixtureError, match=f"aliases expand to more than {MAX_YAML_NODES} YAML nodes"):
        load_mixture(_alias_bomb(tmp_path / "bomb.yaml"))  # before: 21 GB, then OOM-killed
    small = _alias_bomb(tmp_path / "small.yaml", depth=1, width=2)  # a few aliases are fine YAML ...
    with pytest.raises(MixtureError, match="json_path must be a path, got a list"):  # ... but no path
        load_mixture(small)
    assert isinstance(MixtureError("x"), UserError)


def test_a_list_where_a_path_belongs_is_named(tmp_path):
    data = tmp_path / "m.yaml"
    data.write_text("datasets:\n- json_path: [d.json]\n")
    with pytest.raises(MixtureError, match=r"datasets entry 0: json_path must be a path, got a list \(\['d.json'\]\)"):
        load_mixture(data)  # before: "y/['d.json'] not found"


def test_json_nested_past_the_parser_is_one_line(assets, tmp_path):  # noqa: F811
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000)
    flags = _flags(assets, tmp_path / "out")
    flags[flags.index("--data_path") + 1] = deep
    line = _one_line_error(_cli("train", *flags), "comp train")
    assert f"{deep}:1:1: JSON syntax error: nested deeper than Python's parser allows" in line


def test_text_is_cut_before_tokenising(tiny_dir, monkeypatch):
    """A 1 MB answer: only text_char_cap characters reach the tokenizer, and the ids are those
    of the whole text cut at model_max_length."""
    from comp.data import conversation
    from comp.data.conversation import (_encode_pieces, _pieces, encode_conversation, load_tokenizer,
                                        text_char_cap)
    from comp.tokens import special_ids

    tokenizer = load_tokenizer(tiny_dir("qwen2"))
    messages = [{"role": "user", "content": [{"type": "text", "text": "Describe it."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "red square, " * 90000}]}]
    whole, _, _ = _encode_pieces(tokenizer, _pieces(messages, [], special_ids(tokenizer)), special_ids(tokenizer))
    seen = []
    real = conversation.encode_plain_text
    monkeypatch.setattr(conversation, "encode_plain_text",
                        lambda tok, texts, **kw: seen.append(sum(map(len, texts))) or real(tok, texts, **kw))
    ids, labels = encode_conversation(tokenizer, messages, [], max_length=512)
    assert seen == [text_char_cap(tokenizer, 512)]  # one batch of runs, cut at the cap (before: 1 MB)
    assert ids.tolist() == whole[:512] and len(whole) > 100000


# ------------------------------------------------------------------ flags and files

def test_encode_resolution_and_budget_are_capped(tiny_dir, tmp_path):
    image = tmp_path / "i.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    line = _one_line_error(_cli("encode", tiny_dir("siglip"), image, "--out", tmp_path / "f", "--resolution",
                                "100000"), "comp encode")
    assert "above the limit of 134217728; use at most 11585" in line
    line = _one_line_error(_cli("encode", tiny_dir("siglip"), image, "--out", tmp_path / "f",
                                "--max_num_vistoken", "100000000"), "comp encode")
    assert "--max_num_vistoken 100000000 allows" in line and "use at most" in line
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("case", ["empty", "truncated", "text", "nan", "negative", "2-D"])
def test_bad_word_prior_files_are_one_line(assets, tmp_path, case):  # noqa: F811
    path = tmp_path / "prior.pt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        torch.save(list(range(526)), path)
        path.write_bytes(path.read_bytes()[:500])
    elif case == "text":
        path.write_text("the, 12\nof, 9\n")
    else:
        value = {"nan": [float("nan")] * 526, "negative": [-1.0] * 526, "2-D": torch.ones(2, 263)}[case]
        torch.save(value, path)
    flags = _flags(assets, tmp_path / "out")
    flags[flags.index("--word_dist_path") + 1] = path
    line = _one_line_error(_cli("train", *flags), "comp train")
    assert "the word prior cannot be used" in line and str(path) in line and "comp data prior" in line


def test_chat_with_stdin_closed_is_one_line(tiny_mm_dir):
    code = ("import os, sys; os.close(0); sys.stdin = None; from comp.cli import main; "
            f"sys.exit(main(['chat', {str(tiny_mm_dir)!r}, '--device', 'cpu']))")
    closed = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "stdin is closed" in _one_line_error(closed, "comp chat")  # before: AttributeError


@pytest.mark.parametrize("flag,value", [("--temperature", "-1"), ("--temperature", "nan"),
                                        ("--temperature", "inf"), ("--top_p", "0"), ("--max_new_tokens", "0")])
def test_chat_sampling_flags_are_finite_and_in_range(flag, value, capsys):
    from comp.eval.chat import build_parser

    with pytest.raises(SystemExit) as exit_:  # before: a negative or NaN temperature silently meant greedy
        build_parser().parse_args(["model", "--prompt", "hi", flag, value])
    assert exit_.value.code == 2 and f"argument {flag}: must be" in capsys.readouterr().err


# ------------------------------------------------------------------ Ctrl-C

def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    assert run_command("comp encode", interrupted, []) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "comp encode: interrupted; run it again to redo the work"


# `python INTERRUPT.py FLAGS` = comp train that gets SIGINT (Ctrl-C) at the end of step 2.
INTERRUPTER = textwrap.dedent("""
    import os, signal, sys, time
    from transformers import TrainerCallback
    from comp.cli import run_command
    from comp.train import run

    # a terminal's Ctrl-C: Python ignores SIGINT when it starts with SIGINT ignored, and in the
    # full suite this script's parent process has been seen to hand it down ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)

    class CtrlCAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler interrupts this wait: the run stops in step 2

    original = run.CompTrainer.__init__
    def init(self, *a, **kw):
        original(self, *a, **kw)
        self.add_callback(CtrlCAt())
    run.CompTrainer.__init__ = init
    sys.exit(run_command("comp train", run.main, sys.argv[1:]))
""")


def test_ctrl_c_in_training_says_how_to_resume(assets, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = run_script(INTERRUPTER, tmp_path / "interrupt.py", _flags(assets, out, steps=3))
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "comp train: interrupted; resume with the same flags and --resume_from_checkpoint auto "
        f"(newest checkpoint: {out / 'checkpoint-1'})")
    assert not (out / ".comp-train.lock").exists() and not (out / "model.safetensors").exists()
    # the resume the line asks for works
    resumed = _cli("train", *_flags(assets, out, "--resume_from_checkpoint", "auto", steps=3))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "model.safetensors").exists()


# ------------------------------------------------------------------ damaged weights

def _damage(directory: Path, how: str) -> None:
    weights = directory / "model.safetensors"
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "bad_header":
        with open(weights, "r+b") as f:
            f.write(b"\xff" * 8)  # the header length: far past the end of the file
    else:  # one tensor of another shape than config.json builds
        from safetensors.torch import load_file, save_file

        state = load_file(weights)
        name = next(k for k in state if k.endswith("encoder.layers.0.mlp.fc1.weight") and "vis" in k)
        state[name] = torch.zeros(3, 5)
        save_file(state, weights, metadata={"format": "pt"})


@pytest.mark.parametrize("how", ["truncated", "bad_header", "shape"])
def test_damaged_encoder_weights_are_one_line_in_encode_and_probe(tiny_dir, tmp_path, how):
    import shutil

    from PIL import Image

    vfm = tmp_path / "vfm"
    shutil.copytree(tiny_dir("siglip"), vfm)
    _damage(vfm, how)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(tmp_path / split / label / "x.png")
    expected = "do not fit config.json" if how == "shape" else "the weight file is truncated or corrupt"
    line = _one_line_error(_cli("encode", vfm, tmp_path / "val" / "a" / "x.png", "--out", tmp_path / "f"),
                           "comp encode")
    assert expected in line and str(vfm) in line
    if how != "shape":  # probe loads the encoder the same way
        line = _one_line_error(_cli("probe", vfm, "--train", tmp_path / "train", "--val", tmp_path / "val"),
                               "comp probe")
        assert expected in line


def test_a_comp_mm_tensor_of_another_shape_is_named(tiny_mm_dir, tmp_path):
    import shutil

    mm = tmp_path / "mm"
    shutil.copytree(tiny_mm_dir, mm)
    _damage(mm, "shape")
    for args, prog in ((["export-vfm", mm, "--out", tmp_path / "vfm"], "comp export-vfm"),
                       (["chat", mm, "--prompt", "hi", "--device", "cpu"], "comp chat")):
        line = _one_line_error(_cli(*args), prog)
        assert "the tensor visual.encoder.layers.0.mlp.fc1.weight has shape [3, 5] but config.json builds" in line
