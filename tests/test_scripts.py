"""The three seed scripts: they launch the stages of the package's recipe files as
``python -m comp.recipes plan`` lists them, and run end to end in smoke mode (tiny
checkpoints, toyworld) with the GPU recipe's engine: DeepSpeed ZeRO-3, 2 processes under
torchrun, on the CPU."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runs import REPO, torchrun

from comp.recipes.__main__ import plan_fields
STAGE_YAML = {"stage1": "stage1.yaml", "stage2a": "stage2.yaml", "stage2b": "stage2.yaml", "stage3": "stage3.yaml"}
STEPS = {"comp_1b_siglip": ["stage1", "stage2a", "stage2b", "stage3"],
         "comp_1b_dinov2": ["stage1", "stage2a", "stage2b", "stage3"],
         "comp_1b_comp_siglip": ["stage1", "stage2", "stage3"]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke")


@pytest.fixture(scope="module")
def prepared_root(tmp_path_factory) -> Path:
    """The seed's stage files as ``comp data prepare`` writes them from the published layouts
    (a miniature of every source in an offline Hugging Face cache, with its defects)."""
    from hubmini import build_offline_hub

    cache, data_root = tmp_path_factory.mktemp("hf_cache"), tmp_path_factory.mktemp("prepared")
    build_offline_hub(cache, defects=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    for stage in (1, 2, 3):
        subprocess.run([sys.executable, "-m", "comp", "data", "prepare",
                        str(REPO / "scripts" / "data" / f"stage{stage}.yaml"), "--data_root", str(data_root)],
                       env=env, check=True, capture_output=True, timeout=120)
    return data_root


def _pairs(argv: list[str]) -> dict[str, str]:
    assert len(argv) % 2 == 0 and all(a.startswith("--") for a in argv[::2]), argv
    pairs = dict(zip(argv[::2], argv[1::2]))
    assert len(pairs) == len(argv) // 2, f"a flag is given twice: {argv}"
    return pairs


def test_script_launches_the_recipe_stages(tmp_path):
    """The GPU run of comp_1b_comp_siglip.sh with a launcher that prints each comp.train argv:
    every stage of the recipe file, in order, with exactly its flags, its mixture from
    scripts/data, the previous stage's output (the originals for Stage I) and the paths."""
    run = "comp_1b_comp_siglip"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("COMP_") and k not in ("LLM_VERSION", "WORD_DIST", "DEEPSPEED_CONFIG")}
    env |= dict(COMP_WORKDIR=str(tmp_path), COMP_DATA_ROOT="/data/comp", COMP_LAUNCHER="printf %s\\0",
                COMP_SIGLIP="org/comp-siglip", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "comp" / f"{run}.sh")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    blocks = re.split(rf"== {run}/(\w+)\n", proc.stdout)[1:]
    launched = {name: block.split("\0")[:-1] for name, block in zip(blocks[::2], blocks[1::2])}
    fields, expected, i = plan_fields(run, "gpu"), {}, 0
    while i < len(fields):
        name, data, start, n = fields[i + 1:i + 5]
        model = ({"--model_name_or_path": str(tmp_path / run / start)} if start else
                 {"--model_name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "--custom_visual_model": "org/comp-siglip"})
        expected[name] = {"--data_path": str(REPO / "scripts" / "data" / data), "--data_root": "/data/comp",
                          "--image_folder": "/data/comp/data", "--output_dir": str(tmp_path / run / name),
                          "--deepspeed": str(REPO / "scripts" / "zero3.json"), **model,
                          **_pairs(fields[i + 5:i + 5 + int(n)])}
        i += 5 + int(n)
    assert list(launched) == list(expected) == ["stage1", "stage2", "stage3"]
    for name, argv in launched.items():
        assert argv[0] == "comp.train"
        pairs = _pairs(argv[1:])
        assert pairs.pop("--report_to") in ("tensorboard", "none")
        assert pairs == expected[name], name


def _run_script(name: str, workdir: Path, **extra_env: str) -> str:
    launcher = " ".join(torchrun(2))
    env = dict(os.environ, **extra_env, COMP_SMOKE="1", COMP_WORKDIR=str(workdir), PYTHON=sys.executable,
               SMOKE_STEPS="2", OMP_NUM_THREADS="1", COMP_LAUNCHER=launcher,
               DEEPSPEED_CONFIG=str(REPO / "scripts" / "zero3.json"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "comp" / f"{name}.sh")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _state(step_dir: Path) -> dict:
    return json.loads((step_dir / "trainer_state.json").read_text())


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", list(STEPS))  # in this order: the third needs the first's export
def test_seed_script_smoke(name, workdir, request):
    """The SigLIP recipe trains on the seed's own stage YAMLs, their files prepared from the
    published layouts (zip in place, tar shards); the other two on toyworld."""
    from comp import CompForConditionalGeneration, CompVisionModel

    seed_data = name == "comp_1b_siglip"
    env = {"COMP_DATA_ROOT": str(request.getfixturevalue("prepared_root"))} if seed_data else {}
    _run_script(name, workdir, **env)
    run = workdir / name
    for step in STEPS[name]:
        assert (run / step / "model.safetensors").exists(), f"{name}/{step} left no checkpoint"
        history = _state(run / step)["log_history"]
        assert any("lm_loss" in h for h in history), f"{name}/{step} logged no lm_loss"
        if seed_data:  # it read the seed's mixtures under the prepared root, and skipped nothing
            identity = json.loads((run / step / "comp_run.json").read_text())["identity"]
            assert identity["data_path"].endswith(f"scripts/data/{STAGE_YAML[step]}")
            assert Path(identity["data_root"]).resolve() == Path(env["COMP_DATA_ROOT"]).resolve()
            assert all(h.get("samples_skipped", 0) == 0 for h in history), f"{name}/{step} skipped samples"
    stage1 = CompForConditionalGeneration.from_pretrained(run / "stage1")
    stage2 = CompForConditionalGeneration.from_pretrained(run / STEPS[name][1])
    assert stage1.config.vision_config.use_rope == (name == "comp_1b_comp_siglip")
    assert stage2.config.vision_config.use_rope
    aligned = [s for s in STEPS[name] if any("align_loss" in h for h in _state(run / s)["log_history"])]
    assert aligned == ([] if name == "comp_1b_comp_siglip" else ["stage1", "stage2a", "stage2b"])
    if name != "comp_1b_comp_siglip":
        vfm = CompVisionModel.from_pretrained(run / "comp-vfm")
        assert vfm.config.use_rope and vfm.merger is None

