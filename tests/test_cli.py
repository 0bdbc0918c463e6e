"""One grammar for every command: --out, switches, dashed spellings, help on every flag."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect

import pytest

from transformers import TrainingArguments

from comp.cli import main as comp_main

# command -> (module with build_parser, minimal valid argv, writes output?)
COMMANDS = {
    "tiny": ("comp.models.tiny", ["--out", "o", "--kind", "siglip"], True),
    "data toyworld": ("comp.data.toyworld", ["--out", "o"], True),
    "data check": ("comp.data.check", ["d.yaml"], False),
    "data prior": ("comp.data.prior", ["d.yaml", "--tokenizer", "t", "--out", "o"], True),
    "data show": ("comp.data.show", ["d.yaml"], False),
    "export-vfm": ("comp.train.export", ["ckpt", "--out", "o"], True),
    "demo": ("comp.demo.run", [], True),
    "chat": ("comp.eval.chat", ["mm"], False),
    "encode": ("comp.eval.encode", ["vfm", "a.png", "--out", "o"], True),
    "probe": ("comp.eval.probe", ["vfm", "--train", "t", "--val", "v"], True),
}
EVAL = ("chat", "encode", "probe")


def parser_of(command: str) -> argparse.ArgumentParser:
    return importlib.import_module(COMMANDS[command][0]).build_parser()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_has_help_and_outputs_are_out(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # argparse wraps to the terminal; render as on an 80-column one
    parser = parser_of(command)
    flags = {s: a for a in parser._actions for s in a.option_strings}
    assert all((a.help or "").strip() for a in parser._actions), command
    assert ("--out" in flags) == COMMANDS[command][2], command
    assert ("--threads" in flags) == (command in EVAL or command == "demo"), command
    assert parser.prog == f"comp {command}"
    text = parser.format_help()
    assert max(len(line) for line in text.splitlines()) <= 100, command


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_dashed_and_underscored_spellings_parse_alike(command):
    parser = parser_of(command)
    base = COMMANDS[command][1]
    for action in parser._actions:
        name = next((s for s in action.option_strings if s.startswith("--") and "_" in s), None)
        if name is None or action.nargs == 0:
            continue
        value = action.choices[0] if action.choices else "1"
        if action.type is not None and action.type.__name__ in ("_probe_list",):
            value = "knn"
        if action.type is not None and action.type.__name__ == "_resolution":
            value = "native"
        under = vars(parser.parse_args(base + [name, str(value)]))
        dashed = vars(parser.parse_args(base + [name.replace("_", "-") + "=" + str(value)]))
        assert under == dashed, (command, name)


@pytest.mark.parametrize("command,flag", [("encode", "--use_rope"), ("probe", "--use_rope"),
                                          ("export-vfm", "--keep_merger"), ("demo", "--quick"),
                                          ("data check", "--json")])
def test_switches_take_values_like_comp_train(command, flag):
    parser = parser_of(command)
    dest = flag[2:]
    base = COMMANDS[command][1]
    for value, expected in (("1", True), ("True", True), ("yes", True), ("0", False), ("False", False)):
        assert getattr(parser.parse_args(base + [flag, value]), dest) is expected
    assert getattr(parser.parse_args(base + [flag]), dest) is True
    with pytest.raises(SystemExit):
        parser.parse_args(base + [flag, "maybe"])


def test_threads_flag_and_environment(monkeypatch):
    import torch

    from comp.cliargs import apply_threads

    before = torch.get_num_threads()
    try:
        apply_threads(1)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        apply_threads(None)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="--threads"):
            apply_threads(0)
    finally:
        torch.set_num_threads(before)


def test_train_accepts_reference_values_and_both_spellings():
    from comp.train.args import parse_args

    base = ["--model_name_or_path", "m", "--data_path", "d.yaml", "--output_dir", "o", "--report_to", "none"]
    m, d, t = parse_args(base + ["--use_rope", "False", "--use_alignment_loss", "True", "--max-num-vistoken", "64",
                                 "--per-device-train-batch-size", "3", "--resume_from_checkpoint", "auto"])
    assert (m.use_rope, m.use_alignment_loss, d.max_num_vistoken) == (False, True, 64)
    assert (t.per_device_train_batch_size, t.resume_from_checkpoint) == (3, "auto")
    m, _, _ = parse_args(base + ["--use-rope", "0", "--use_alignment_loss"])
    assert (m.use_rope, m.use_alignment_loss) == (False, True)


TRAIN_BASE = ["--model_name_or_path", "m", "--data_path", "d.yaml", "--output_dir", "o", "--report_to", "none"]


def test_train_choice_flags_are_argparse_choices(capsys):
    from comp.train.args import (CompTrainingArguments, DataArguments, ModelArguments, build_parser,
                                 choice_fields, flag_problems, parse_args)

    own = {f.name for f in dataclasses.fields(CompTrainingArguments)} - {
        f.name for f in dataclasses.fields(TrainingArguments)}
    literal = {**choice_fields(ModelArguments), **choice_fields(DataArguments),
               **{k: v for k, v in choice_fields(CompTrainingArguments).items() if k in own}}
    assert {"pos_interp_mode", "prior_mode", "pos_order", "vocab_rows", "prompt_format",
            "lm_loss_normalization"} <= set(literal)
    actions = {a.dest: a for a in build_parser()._actions}
    for name, choices in literal.items():
        assert tuple(actions[name].choices) == tuple(c for c in choices if c is not None), name
        parsed = parse_args(TRAIN_BASE + [f"--{name}", str(choices[-2 if choices[-1] is None else -1])])
        assert any(getattr(a, name, None) == actions[name].choices[-1] for a in parsed), name
        with pytest.raises(SystemExit) as exit_:
            parse_args(TRAIN_BASE + [f"--{name}", "bogus"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"--{name}/--{name.replace('_', '-')}: invalid choice: 'bogus'" in err, err
        assert len(err.splitlines()) == 3, err  # the short usage, then the error line
    # arguments built in code (not through argparse) are checked too
    m, d, t = parse_args(TRAIN_BASE)
    bad = dataclasses.replace(m, pos_order="diagonal")
    assert flag_problems(bad, dataclasses.replace(d, prompt_format="raw"), t) == [
        "--pos_order must be one of ['merge', 'raster'], got 'diagonal'",
        "--prompt_format must be one of ['reference', 'inplace'], got 'raw'"]


def test_train_defaults_are_the_configs_defaults():
    from comp.data.dataset import MixtureDataset
    from comp.data.image import CompImageProcessor
    from comp.data.prompts import DEFAULT_PROMPT_FORMAT
    from comp.models.configuration import CompConfig
    from comp.models.vision.configuration import CompVisionConfig
    from comp.train.args import parse_args

    m, d, _ = parse_args(TRAIN_BASE)
    config, vision = CompConfig(), CompVisionConfig()
    shared = 0
    for f in dataclasses.fields(m):
        if f.default is None:  # None: keep what the checkpoint holds (pos_order)
            continue
        for source in (config, vision):
            if f.name in source.to_dict():
                assert getattr(m, f.name) == getattr(source, f.name), f.name
                shared += 1
    assert shared >= 9  # use_rope, pos_interp_mode, the alignment settings, lm_loss_chunk_size
    token_pixels = 14 * 14 * 2 * 2
    assert d.min_num_vistoken * token_pixels == CompImageProcessor().min_pixels
    assert d.prompt_format == DEFAULT_PROMPT_FORMAT
    assert d.align_max_length == inspect.signature(MixtureDataset).parameters["align_max_length"].default


def test_train_help_is_short_and_puts_comp_first(capsys):
    from comp.train.args import build_parser

    with pytest.raises(SystemExit) as exit_:
        comp_main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: comp train")
    titles = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert titles[:3] == ["CoMP model:", "data:", "CoMP training:"]
    assert "'auto'" in text.split("--resume_from_checkpoint", 1)[1].splitlines()[0]
    listed = {line.split()[0] for line in text.splitlines() if line.startswith("  --")}
    every = {a.option_strings[0] for a in build_parser()._actions
             if a.option_strings and a.dest != "help" and not a.option_strings[0].startswith("--no_")}
    assert listed == every  # nothing dropped, each once
    assert len(text.splitlines()) < 250 and max(map(len, text.splitlines())) <= 120


@pytest.mark.parametrize("argv", [["encode", "--help"], ["probe", "--help"], ["chat", "--help"],
                                  ["tiny", "--help"], ["export-vfm", "--help"], ["demo", "--help"]])
def test_help_renders(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        comp_main(argv)
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith(f"usage: comp {argv[0]}")
