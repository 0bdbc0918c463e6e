"""comp train: tunable parts, distributed equivalence, crash-safe exact resume, export."""
from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from comp.train.trainer import COMPLETE_MARKER, last_complete_checkpoint
from runs import KILLER, losses as _losses, run as _run, run_script, torchrun


def _flags(assets, out, *extra, steps=4, batch=4, tunable="mm_vision_tower,mm_mlp_adapter,mm_language_model"):
    return ["--model_name_or_path", str(assets["llm"]), "--custom_visual_model", str(assets["vision"]),
            "--data_path", str(assets["data"] / "stage2.yaml"), "--output_dir", str(out),
            "--mm_tunable_parts", tunable, "--learning_rate", "1e-3", "--max_steps", str(steps),
            "--per_device_train_batch_size", str(batch), "--logging_steps", "1",
            "--max_num_vistoken", "32", "--model_max_length", "512", "--use_rope", "1",
            "--use_alignment_loss", "1", "--word_dist_path", "uniform",
            "--report_to", "none", "--use_cpu", "True", "--seed", "3",
            "--dataloader_num_workers", "0", "--save_strategy", "no", *extra]


def test_only_tunable_parts_change(assets, tmp_path):
    from comp.train.run import train
    from comp.train.args import parse_args

    stage1 = tmp_path / "stage1"
    train(*parse_args(_flags(assets, stage1, steps=2, tunable="mm_mlp_adapter")))
    after1 = load_file(stage1 / "model.safetensors")
    llm = load_file(assets["llm"] / "model.safetensors")
    for name, tensor in llm.items():  # the word table was cut to the tokenizer's rows, as the reference
        assert torch.equal(after1[name], tensor[:after1[name].shape[0]]), f"{name} changed in a merger-only step"
    vision_keys = [k for k in after1 if k.startswith("visual.") and not k.startswith("visual.merger.")]
    from comp.models.weights import load_state_dict
    original_vision = load_state_dict(assets["vision"])
    for key in vision_keys:
        assert torch.equal(after1[key], original_vision["vision_model." + key[len("visual."):]]), key

    stage2 = tmp_path / "stage2"
    flags = _flags(assets, stage2, steps=2, tunable="mm_vision_tower,mm_mlp_adapter")
    flags[flags.index("--model_name_or_path") + 1] = str(stage1)
    train(*parse_args(flags))
    after2 = load_file(stage2 / "model.safetensors")
    for name in after2:
        if name.startswith("visual."):
            if name == "visual.embeddings.position_embedding.weight" or "merger" in name or "encoder" in name:
                assert not torch.equal(after2[name], after1[name]), f"{name} did not train"
        else:
            assert torch.equal(after2[name], after1[name]), f"frozen {name} changed"


def test_two_processes_match_one_with_the_same_global_batch(assets, tmp_path):
    pytest.importorskip("torch.distributed")
    _run(["comp.train", *_flags(assets, tmp_path / "one", batch=4)])
    _run(["comp.train", *_flags(assets, tmp_path / "two", "--ddp_backend", "gloo", batch=2)],
         launcher=torchrun(2))
    for key in ("loss", "lm_loss", "align_loss"):
        one, two = _losses(tmp_path / "one", key), _losses(tmp_path / "two", key)
        assert one.keys() == two.keys() == {1, 2, 3, 4}
        for step in one:
            assert abs(one[step] - two[step]) <= 1e-4, (key, step, one[step], two[step])




def test_sigkill_and_resume_reproduce_the_uninterrupted_run(assets, tmp_path):
    save = ["--save_strategy", "steps", "--save_steps", "2", "--resume_from_checkpoint", "auto"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _run(["comp.train", *_flags(assets, whole, *save, steps=6)])

    proc = run_script(KILLER, tmp_path / "killer.py", _flags(assets, broken, *save, steps=6), KILL_AT_STEP="3")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert last_complete_checkpoint(broken) == broken / "checkpoint-2"
    # a checkpoint whose writing never finished (no marker) must not be resumed from
    shutil.copytree(broken / "checkpoint-2", broken / "checkpoint-4")
    (broken / "checkpoint-4" / COMPLETE_MARKER).unlink()
    (broken / "checkpoint-4" / "model.safetensors").write_bytes(b"half a file")

    _run(["comp.train", *_flags(assets, broken, *save, steps=6)])
    expected, resumed = _losses(whole), _losses(broken)
    assert set(resumed) >= {3, 4, 5, 6}
    for step in (3, 4, 5, 6):
        assert abs(expected[step] - resumed[step]) <= 1e-6, (step, expected[step], resumed[step])
    final_whole = load_file(whole / "model.safetensors")
    final_resumed = load_file(broken / "model.safetensors")
    assert all(torch.allclose(final_whole[k], final_resumed[k], atol=1e-6) for k in final_whole)


def test_export_vfm_loads_as_encoder_and_as_custom_visual_model(assets, tmp_path):
    from comp import CompImageProcessor, CompVisionModel
    from comp.train.args import parse_args
    from comp.train.export import export_vfm
    from comp.train.run import train

    step = tmp_path / "step"
    train(*parse_args(_flags(assets, step, steps=1)))
    vfm = export_vfm(step, tmp_path / "vfm")
    encoder = CompVisionModel.from_pretrained(vfm)
    assert encoder.merger is None and encoder.config.use_rope
    trained = load_file(step / "model.safetensors")
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, trained["visual." + name]), name
    processor = CompImageProcessor.from_pretrained(vfm)
    assert list(processor.image_mean) == [0.5, 0.5, 0.5]
    again = tmp_path / "again"
    flags = _flags(assets, again, steps=1, tunable="mm_mlp_adapter")
    flags[flags.index("--custom_visual_model") + 1] = str(vfm)
    train(*parse_args(flags))
    assert (again / "model.safetensors").exists()


def test_training_stops_with_a_summary_when_too_many_samples_are_bad(assets, tmp_path):
    from comp.data.dataset import TooManySkips
    from comp.train.args import parse_args
    from comp.train.run import train

    records = json.loads((assets["data"] / "data" / "stage1_captions.json").read_text())[:12]
    for record in records[::2]:
        record["image"] = "does/not/exist.png"
    data = tmp_path / "half_bad.json"
    data.write_text(json.dumps(records))
    flags = _flags(assets, tmp_path / "out", "--image_folder", str(assets["data"] / "images"), steps=3)
    flags[flags.index("--data_path") + 1] = str(data)
    with pytest.raises(TooManySkips, match="missing_image: "):
        train(*parse_args(flags))
