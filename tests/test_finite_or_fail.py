"""Issue 20 (B): finite or fail, and a step that trains nothing is an error.

Float flags are finite and in range at parse time; a weight that turns NaN stops the run
with its name before anything is saved (the last good checkpoint stays the newest); zero
records, zero optimizer steps or every sample skipped end with the reason, exit 2, and no
untrained model written as the step's output. Faults are injected into tiny real runs.
"""
from __future__ import annotations

import json
import textwrap

import pytest

from comp.train.trainer import checkpoint_problem, last_complete_checkpoint
from runs import run_script
from test_faults import _cli, _one_line_error
from test_run_ownership import _flags


# `python POISONER.py FLAGS` = comp train whose weight $POISON turns NaN at step $POISON_AT_STEP
# (after that step's update, before its checkpoint is written).
POISONER = textwrap.dedent("""
    import os, sys, torch
    from transformers import TrainerCallback
    from comp.cli import run_command
    from comp.train import run

    class PoisonAt(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == int(os.environ["POISON_AT_STEP"]):
                with torch.no_grad():
                    dict(model.named_parameters())[os.environ["POISON"]].view(-1)[0] = float("nan")

    original = run.CompTrainer.__init__
    def init(self, *a, **kw):
        original(self, *a, **kw)
        self.add_callback(PoisonAt())
    run.CompTrainer.__init__ = init
    sys.exit(run_command("comp train", run.main, sys.argv[1:]))
""")


@pytest.mark.parametrize("flag,value,message", [
    ("--learning_rate", "inf", "--learning_rate must be a finite number, got inf"),
    ("--weight_decay", "inf", "--weight_decay must be a finite number, got inf"),
    ("--adam_beta1", "nan", "--adam_beta1 must be a finite number, got nan"),
    ("--adam_beta2", "1.5", "--adam_beta2 must be in [0, 1)"),
    ("--warmup_ratio", "nan", "--warmup_ratio must be in [0, 1), got nan"),
    ("--embed_temp", "inf", "--embed_temp must be a finite number"),
    ("--max_steps", "-5", "--max_steps must be > 0, or -1 to train --num_train_epochs, got -5"),
    ("--max_steps", "0", "--max_steps must be > 0, or -1"),
    ("--num_train_epochs", "0", "--num_train_epochs must be > 0"),
    ("--logging_steps", "0", "requires non-zero --logging_steps"),
    ("--dataloader_num_workers", "-1", "--dataloader_num_workers must be >= 0"),
    ("--seed", "-1", "--seed must be in [0, 2**32)"),
    ("--bogus_flag", "1", "unknown flag(s) ['--bogus_flag', '1']"),
])
def test_flags_are_finite_and_in_range_at_parse_time(flag, value, message, capsys):
    from comp.train.args import parse_args

    argv = ["--model_name_or_path", "x", "--data_path", "y", "--output_dir", "z", flag, value]
    if flag == "--num_train_epochs":
        argv += ["--max_steps", "-1"]
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [
    (["--k", "0"], "argument --k: must be at least 1, got 0"),
    (["--k", "-5"], "argument --k: must be at least 1, got -5"),
    (["--threads", "0"], "argument --threads: must be at least 1, got 0"),
])
def test_probe_counts_must_be_positive(argv, message, tmp_path):
    line = _one_line_error(_cli("probe", tmp_path, "--train", tmp_path, "--val", tmp_path, *argv), "comp probe")
    assert message in line


def test_a_weight_that_turns_nan_stops_the_run_before_it_is_saved(assets, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = run_script(POISONER, tmp_path / "poisoner.py", _flags(assets, out, steps=3),
                      POISON_AT_STEP="2", POISON="visual.merger.ln_q.weight")
    line = _one_line_error(proc, "comp train")
    assert "step 2: the weight visual.merger.ln_q.weight holds NaN or inf; checkpoint-2 was not written" in line
    assert f"--resume_from_checkpoint {out / 'checkpoint-1'}" in line
    assert last_complete_checkpoint(out) == out / "checkpoint-1" and checkpoint_problem(out / "checkpoint-1") is None
    assert not (out / "checkpoint-2" / "COMPLETE").exists() and not (out / "model.safetensors").exists()


def _records(assets, n):
    records = json.loads((assets["data"] / "data" / "stage1_captions.json").read_text())[:n]
    for r in records:
        r["image"] = str(assets["data"] / "images" / r["image"])
    return records


@pytest.mark.parametrize("case", ["first:0", "[]", "batch_larger_than_data", "model_max_length_1"])
def test_a_step_that_trains_nothing_is_an_error(assets, tmp_path, case):  # noqa: F811
    extra, expected = [], None
    if case == "first:0":
        data = tmp_path / "zero.yaml"
        data.write_text(f"datasets:\n- json_path: {assets['data'] / 'data' / 'stage1_captions.json'}\n"
                        "  sampling_strategy: 'first:0'\n")
        expected = "the data selects no records"
    elif case == "[]":
        data = tmp_path / "empty.json"
        data.write_text("[]")
        expected = "the data selects no records"
    elif case == "batch_larger_than_data":
        data = tmp_path / "three.json"
        data.write_text(json.dumps(_records(assets, 3)))
        extra = ["--per_device_train_batch_size", "8", "--dataloader_drop_last", "True"]
        expected = "the run trained nothing: 0 optimizer steps: 3 samples give no step"
    else:
        data = assets["data"] / "stage1.yaml"
        extra = ["--model_max_length", "1"]
        expected = "too many bad samples"
    out = tmp_path / "out"
    flags = _flags(assets, out, *extra)
    flags[flags.index("--data_path") + 1] = data
    line = _one_line_error(_cli("train", *flags), "comp train")
    assert expected in line, line
    if case == "model_max_length_1":  # judged within the first steps, not after 1000 samples
        assert "4 of 4 samples skipped" in line and "too_long: 4" in line
    assert not (out / "model.safetensors").exists()
