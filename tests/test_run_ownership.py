"""Issue 20 (A): an output directory belongs to one run, and checkpoints verify by content.

A second run into a directory holding another run's checkpoints is refused (the first run's
files stay byte for byte), ``auto`` resumes only the same run, a lock keeps two starts apart
(a stale one is taken over), and a checkpoint whose bytes changed after saving is named and
skipped for the previous one. Faults are injected into real checkpoints of tiny runs.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comp.train.ownership import LOCK_FILE, RUN_FILE, OutputLock, marker_run
from comp.train.trainer import COMPLETE_MARKER, _rotate, checkpoint_problem, last_complete_checkpoint
from test_faults import _cli, _one_line_error


def _flags(assets, out, *extra, steps=2):
    """A Stage-I smoke step that saves every step and keeps two checkpoints."""
    return ["--model_name_or_path", assets["llm"], "--custom_visual_model", assets["vision"],
            "--data_path", assets["data"] / "stage1.yaml", "--output_dir", out,
            "--mm_tunable_parts", "mm_mlp_adapter", "--learning_rate", "1e-3",
            "--max_steps", str(steps), "--per_device_train_batch_size", "2", "--logging_steps", "1",
            "--max_num_vistoken", "16", "--model_max_length", "512", "--use_alignment_loss", "1",
            "--word_dist_path", "uniform", "--report_to", "none", "--use_cpu", "True",
            "--seed", "3", "--dataloader_num_workers", "0", "--save_strategy", "steps",
            "--save_steps", "1", "--save_total_limit", "2", *extra]


@pytest.fixture(scope="module")
def first_run(assets, tmp_path_factory):
    """A finished run with checkpoint-1 and checkpoint-2."""
    out = tmp_path_factory.mktemp("first") / "run"
    proc = _cli("train", *_flags(assets, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ one run per directory

def test_the_run_is_recorded_and_its_checkpoints_name_it(first_run):
    record = json.loads((first_run / RUN_FILE).read_text())
    assert record["identity"]["seed"] == 3 and record["identity"]["data"]["sha256"]
    for step in (1, 2):
        assert marker_run(first_run / f"checkpoint-{step}") == record["run"]
    assert not (first_run / LOCK_FILE).exists()  # released at the end


def test_the_checkpoints_record_the_runs_own_arguments(first_run):
    """training_args.bin holds the limit the run was given (the Trainer itself runs without one,
    so that only CoMP's rotation deletes checkpoints)."""
    for path in (first_run / "checkpoint-2", first_run):
        recorded = torch.load(path / "training_args.bin", weights_only=False)
        assert recorded.save_total_limit == 2 and recorded.seed == 3, path


def test_a_second_run_into_a_used_directory_is_refused_and_leaves_it_untouched(first_run, assets, tmp_path):
    run = _copy(first_run, tmp_path)
    before = _snapshot(run)
    for extra in ((), ("--resume_from_checkpoint", "auto")):
        proc = _cli("train", *_flags(assets, run, "--seed", "9", *extra))
        line = _one_line_error(proc, "comp train")
        assert "checkpoints of another run" in line and "checkpoint-2" in line and "seed 3 -> 9" in line
        assert "--overwrite_output_dir" in line and "'loss'" not in proc.stdout
    assert _snapshot(run) == before  # byte for byte, the run record included


def test_overwrite_replaces_the_other_runs_checkpoints_and_rotation_keeps_this_runs(first_run, assets, tmp_path):
    run = _copy(first_run, tmp_path)
    first_id = json.loads((run / RUN_FILE).read_text())["run"]
    proc = _cli("train", *_flags(assets, run, "--seed", "9", "--overwrite_output_dir", "1", steps=3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deleting 2 checkpoint(s) of another run" in proc.stdout
    second_id = json.loads((run / RUN_FILE).read_text())["run"]
    assert second_id != first_id
    # before, rotation saw the other run's checkpoint-2 as newest and deleted this run's
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert {marker_run(p) for p in run.glob("checkpoint-*")} == {second_id}


def test_auto_resume_and_rotation_only_see_the_same_runs_checkpoints(first_run, tmp_path):
    run = _copy(first_run, tmp_path)
    own = marker_run(run / "checkpoint-2")
    assert last_complete_checkpoint(run, runs={"another"}) is None
    assert last_complete_checkpoint(run, runs={own}) == run / "checkpoint-2"
    _rotate(run, 1, runs={"another"})  # nothing of that run: the other run's stay
    assert (run / "checkpoint-1").is_dir() and (run / "checkpoint-2").is_dir()
    _rotate(run, 1, runs={own})
    assert not (run / "checkpoint-1").exists() and (run / "checkpoint-2").is_dir()


def test_a_named_checkpoint_continues_with_new_settings_and_auto_follows(first_run, assets, tmp_path):
    """After a stop (NaN) the fix is a lower learning rate from the last checkpoint: naming it
    continues that run as a new one, whose own later `auto` resumes see both."""
    run = _copy(first_run, tmp_path)
    first_id = marker_run(run / "checkpoint-1")
    lower = ("--learning_rate", "1e-4")
    proc = _cli("train", *_flags(assets, run, *lower, "--resume_from_checkpoint", run / "checkpoint-1", steps=3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"continuing {run / 'checkpoint-1'} (run {first_id})" in proc.stdout
    record = json.loads((run / RUN_FILE).read_text())
    assert record["continues"] == [first_id] and record["identity"]["learning_rate"] == 1e-4
    assert marker_run(run / "checkpoint-3") == record["run"]
    assert checkpoint_problem(run / "checkpoint-2") is None  # rewritten by the new run, verifies


# ------------------------------------------------------------------ lock

def test_a_start_into_a_directory_another_run_holds_is_refused(first_run, assets, tmp_path):
    run = _copy(first_run, tmp_path)
    with OutputLock(run) as lock:
        proc = _cli("train", *_flags(assets, run, "--resume_from_checkpoint", "auto"))
        line = _one_line_error(proc, "comp train")
        assert "another comp train" in line and str(run) in line and lock.path.exists()
        with pytest.raises(Exception, match="another comp train"):  # and in one process
            OutputLock(run).acquire()
    assert not (run / LOCK_FILE).exists()


def test_a_stale_lock_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    import socket

    lock_file = tmp_path / LOCK_FILE
    lock_file.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "start": "1"}))
    with OutputLock(tmp_path):
        holder = json.loads(lock_file.read_text())
    import os

    assert holder["pid"] == os.getpid() and not lock_file.exists()
    lock_file.write_text(json.dumps({"pid": 1, "host": "elsewhere", "start": None}))
    with pytest.raises(Exception, match="process 1 on elsewhere"):
        OutputLock(tmp_path).acquire()


# ------------------------------------------------------------------ checksums

def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("name,offset", [("optimizer.pt", 1000), ("rng_state.pth", 100),
                                         ("model.safetensors", 8), ("scheduler.pt", 64)])
def test_a_checkpoint_altered_after_saving_is_named_and_skipped(first_run, tmp_path, name, offset):
    run = _copy(first_run, tmp_path)
    ckpt = run / "checkpoint-2"
    size = (ckpt / name).stat().st_size
    _overwrite(ckpt / name, offset, bytes(32 * [0xFF]))  # 32 bytes, size unchanged
    assert (ckpt / name).stat().st_size == size
    reasons = []
    assert last_complete_checkpoint(run, report=lambda p, why: reasons.append((p, why))) == run / "checkpoint-1"
    assert reasons == [(ckpt, f"{name} does not match the checksum its marker recorded (damaged after saving)")]


def test_resume_from_an_altered_checkpoint_falls_back_and_trains_finite(first_run, assets, tmp_path):
    run = _copy(first_run, tmp_path)
    _overwrite(run / "checkpoint-2" / "optimizer.pt", 1000, bytes(32 * [0xFF]))
    proc = _cli("train", *_flags(assets, run, "--resume_from_checkpoint", "auto", steps=3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not resuming from" in proc.stdout and "optimizer.pt does not match the checksum" in proc.stdout
    history = json.loads((run / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "loss" in h][-2:] == [2, 3]  # resumed after step 1
    from safetensors.torch import load_file
    import torch

    assert all(torch.isfinite(t).all() for t in load_file(run / "model.safetensors").values())


def test_a_marker_without_checksums_does_not_verify(first_run, tmp_path):
    run = _copy(first_run, tmp_path)
    marker = run / "checkpoint-2" / COMPLETE_MARKER
    info = json.loads(marker.read_text())
    del info["sha256"]
    marker.write_text(json.dumps(info))
    assert "lists no files and checksums" in checkpoint_problem(run / "checkpoint-2")


def test_fuzz_byte_flipped_checkpoints_never_verify(first_run, tmp_path):
    """Seeded fuzz: one flipped byte anywhere in any file of a checkpoint is found and named."""
    run = _copy(first_run, tmp_path)
    ckpt = run / "checkpoint-2"
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER)
    rng = random.Random(20)
    for _ in range(24):
        path = rng.choice(files)
        original = path.read_bytes()
        offset = rng.randrange(len(original))
        _overwrite(path, offset, bytes([original[offset] ^ (1 << rng.randrange(8))]))
        why = checkpoint_problem(ckpt)
        assert why is not None and why.startswith(str(path.relative_to(ckpt))), (path.name, offset, why)
        path.write_bytes(original)
    assert checkpoint_problem(ckpt) is None
