"""The engines the recipes run: DeepSpeed ZeRO-3 (their default) and ZeRO-2 with 2 processes
on CPU (gloo), equal to one plain process with the same global batch; resume, the next stage
and export from a ZeRO-3 run; two "nodes" on the loopback.

The runs share one small Stage II mixture (encoder + merger + LLM trainable, alignment loss
on, images of mixed sizes, length-grouped batches, gradient checkpointing, 2 accumulation
steps) whose last step puts only text-only micro-batches on one rank (see ``mixture``).
Runs are module-scoped and reused by several tests, so the module costs about ten launches.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comp.data.sampler import ModalityLengthGroupedSampler
from comp.data.toyworld import write_toyworld
from comp.train.trainer import last_complete_checkpoint
from runs import KILLER, REPO, free_port, losses, run, run_env, run_script, torchrun

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 4
IMAGE_RECORDS, TEXT_RECORDS = 13, 3  # 16 samples = 4 steps of 4; see mixture()
ZERO3, ZERO2 = REPO / "scripts" / "zero3.json", REPO / "scripts" / "zero2.json"


@pytest.fixture(scope="module")
def assets(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_assets")
    toy = write_toyworld(root / "toyworld", seed=0, size="small")
    run(["comp", "data", "prior", str(toy / "stage2.yaml"), "--tokenizer", str(tiny_dir("qwen2")),
         "--out", str(root / "word_dist.pt")])
    return {"llm": tiny_dir("qwen2"), "vision": tiny_dir("siglip"), "toy": toy,
            "data": mixture(toy, root / "mixed.json"), "prior": root / "word_dist.pt"}


def mixture(toy: Path, out: Path) -> Path:
    """13 image + 3 text-only records. With 4 samples per optimizer step, the length-grouped
    sampler fills three image-only steps; the last step mixes the image left over with the three
    text-only samples, so whichever rank does not get the image sees only text-only
    micro-batches (the encoder then runs on its dummy image, in step with the other rank)."""
    dense = json.loads((toy / "data" / "stage2_dense.json").read_text())[:IMAGE_RECORDS]
    qa = json.loads((toy / "data" / "stage3_qa.json").read_text())
    text_only = [r for r in qa if "image" not in r][:TEXT_RECORDS]
    for r in dense:
        r["image"] = str(toy / "images" / r["image"])
    out.write_text(json.dumps(dense + text_only))
    return out


def flags(assets, out: Path, *extra: str, per_device: int = 1, steps: int = STEPS,
          tunable: str = "mm_vision_tower,mm_mlp_adapter,mm_language_model,mm_lm_head") -> list[str]:
    """Stage II-a's switches on tiny models; global batch = processes x per_device x 2."""
    return ["comp.train", "--model_name_or_path", str(assets["llm"]),
            "--custom_visual_model", str(assets["vision"]), "--data_path", str(assets["data"]),
            "--output_dir", str(out), "--mm_tunable_parts", tunable,
            "--learning_rate", "2e-4", "--mm_vision_tower_lr", "1e-3", "--mm_projector_lr", "5e-3",
            "--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps", "2",
            "--max_steps", str(steps), "--logging_steps", "1", "--max_num_vistoken", "32",
            "--model_max_length", "512", "--use_rope", "1", "--use_alignment_loss", "1",
            "--word_dist_path", str(assets["prior"]), "--group_by_modality_length", "True",
            "--gradient_checkpointing", "True", "--lr_scheduler_type", "cosine",
            "--report_to", "none", "--use_cpu", "True", "--seed", "3",
            "--dataloader_num_workers", "0", "--save_strategy", "steps", "--save_steps", "2",
            "--resume_from_checkpoint", "auto", *extra]


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """Output directories of the same 4 steps of 4 samples: one process (2 per micro-batch),
    and 2 processes (1 per micro-batch) under ZeRO-3 and ZeRO-2."""
    root = tmp_path_factory.mktemp("dist_runs")
    out = {"one": root / "one", "zero3": root / "zero3", "zero2": root / "zero2"}
    run(flags(assets, out["one"], per_device=2))
    run(flags(assets, out["zero3"], "--deepspeed", str(ZERO3), "--save_total_limit", "2"), launcher=torchrun(2))
    run(flags(assets, out["zero2"], "--deepspeed", str(ZERO2)), launcher=torchrun(2))
    return out


def test_the_last_step_gives_one_rank_only_text_only_micro_batches():
    """The premise of the mixture, from the sampler the 2-process runs use. The data loader
    deals a step's samples to ranks in turn, one micro-batch (1 sample) at a time."""
    with_image = [True] * IMAGE_RECORDS + [False] * TEXT_RECORDS
    lengths = [(50 + i) if img else -(20 + i) for i, img in enumerate(with_image)]
    order = list(ModalityLengthGroupedSampler(lengths, batch_size=2, world_size=2, seed=3))
    last_step = order[-4:]
    images_per_rank = [sum(with_image[i] for i in last_step[rank::2]) for rank in (0, 1)]
    assert sorted(images_per_rank) == [0, 1], (last_step, images_per_rank)


@pytest.mark.parametrize("engine", ["zero3", "zero2"])
def test_sharded_runs_equal_one_process(runs, engine):
    # align_loss divides cosine scores by embed_temp = 0.005, so its rounding differences
    # are 200x those of the features: compared relative to its size (~10-90 here).
    tolerance = {"loss": 1e-4, "lm_loss": 1e-4, "align_loss": 1e-5}
    for key, tol in tolerance.items():
        one, sharded = losses(runs["one"], key), losses(runs[engine], key)
        assert one.keys() == sharded.keys() == set(range(1, STEPS + 1)), (key, one, sharded)
        for step in one:
            allowed = tol * max(1.0, abs(one[step])) if key == "align_loss" else tol
            assert abs(one[step] - sharded[step]) <= allowed, (engine, key, step, one[step], sharded[step])
    # Adam divides each gradient by its running RMS, so a rounding difference in a near-zero
    # gradient component becomes an update difference of up to the learning rate (1e-3 for the
    # vision tower): 1.3e-5 after 4 steps on one CPU. A sharding fault (a micro-batch lost,
    # gradients not reduced) moves weights by about a learning rate per step: 1e-3 .. 5e-3.
    expected, saved = load_file(runs["one"] / "model.safetensors"), load_file(runs[engine] / "model.safetensors")
    assert expected.keys() == saved.keys()
    for name, tensor in expected.items():
        assert torch.allclose(saved[name], tensor, rtol=0, atol=1e-4), \
            (engine, name, float((saved[name] - tensor).abs().max()))


def test_zero3_checkpoints_record_the_runs_arguments(runs):
    """training_args.bin of the ZeRO-3 run holds its own --save_total_limit (the Trainer runs
    on a copy without one, so that only CoMP's rotation deletes checkpoints)."""
    for path in (runs["zero3"] / "checkpoint-4", runs["zero3"]):
        recorded = torch.load(path / "training_args.bin", weights_only=False)
        assert recorded.save_total_limit == 2 and recorded.deepspeed == str(ZERO3), path


def test_zero3_sigkill_and_resume_reproduce_the_run(assets, runs, tmp_path):
    broken = tmp_path / "broken"
    proc = run_script(KILLER, tmp_path / "killer.py", flags(assets, broken, "--deepspeed", str(ZERO3))[1:],
                      launcher=torchrun(2)[:-1], KILL_AT_STEP="3")  # torchrun runs the script, not -m
    assert proc.returncode != 0 and "(SIGKILL)" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert last_complete_checkpoint(broken) == broken / "checkpoint-2"
    run(flags(assets, broken, "--deepspeed", str(ZERO3)), launcher=torchrun(2))
    whole, resumed = losses(runs["zero3"]), losses(broken)
    for step in (3, 4):
        assert abs(whole[step] - resumed[step]) <= 1e-6, (step, whole[step], resumed[step])
    final, again = load_file(runs["zero3"] / "model.safetensors"), load_file(broken / "model.safetensors")
    for name, tensor in final.items():
        assert torch.allclose(again[name], tensor, rtol=0, atol=1e-6), name


def test_next_stage_and_export_read_the_zero3_checkpoint(assets, runs, tmp_path):
    """Stage I-like step (merger only) from the ZeRO-3 output under ZeRO-3: the model loads
    with sharded initialisation, frozen parts come out bit-identical, the merger trains."""
    before = load_file(runs["zero3"] / "model.safetensors")
    nxt = tmp_path / "next"
    step_flags = flags(assets, nxt, "--deepspeed", str(ZERO3), steps=2, tunable="mm_mlp_adapter")
    step_flags[step_flags.index("--model_name_or_path") + 1] = str(runs["zero3"])
    run(step_flags, launcher=torchrun(2))
    after = load_file(nxt / "model.safetensors")
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        if name.startswith("visual.merger."):
            assert not torch.equal(after[name], tensor), f"{name} did not train"
        else:
            assert torch.equal(after[name], tensor), f"frozen {name} changed"

    from comp import CompVisionModel

    run(["comp", "export-vfm", str(runs["zero3"]), "--out", str(tmp_path / "vfm")])
    vfm = CompVisionModel.from_pretrained(tmp_path / "vfm")
    for name, tensor in vfm.state_dict().items():
        assert torch.equal(tensor, before["visual." + name]), name


def test_two_nodes_on_the_loopback_equal_one_process(assets, runs, tmp_path):
    """The README's multi-node command line, 2 nodes x 1 process, ZeRO-3."""
    port, out = free_port(), tmp_path / "nodes"
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    for rank, log in enumerate(logs):
        with open(log, "w") as sink:  # files, not pipes: a full pipe would stall its node
            nodes.append(subprocess.Popen(
                [*torchrun(1, nnodes=2, node_rank=rank, port=port),
                 *flags(assets, out, "--deepspeed", str(ZERO3))],
                cwd=REPO, env=run_env(), stdout=sink, stderr=subprocess.STDOUT))
    codes = [node.wait(timeout=300) for node in nodes]
    assert codes == [0, 0], "".join(log.read_text()[-3000:] for log in logs)
    one, two = losses(runs["one"]), losses(out)
    assert one.keys() == two.keys() == set(range(1, STEPS + 1))
    assert all(abs(one[s] - two[s]) <= 1e-4 for s in one), (one, two)
