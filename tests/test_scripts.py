"""The three seed scripts, end to end in smoke mode (tiny checkpoints, toyworld) with the
GPU recipe's engine: DeepSpeed ZeRO-3, 2 processes under torchrun, on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runs import REPO, torchrun
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

