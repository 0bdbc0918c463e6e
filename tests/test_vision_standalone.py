"""The CoMP-VFM as a transformers model: AutoModel / AutoConfig after ``import comp``, and
``comp export-vfm --standalone`` loaded by plain transformers with ``comp`` unimportable."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel
from transformers.dynamic_module_utils import get_imports

from comp.models.vision import configuration
from comp.models.vision.families import FAMILIES
from comp.models.vision.model import CompVisionModel
from comp.models.vision.packing import patchify
from comp.models.vision.standalone import AUTO_MAP, shipped_files
from comp.train.export import main as export_main

SHIPPED = {"aimv2", "attention", "configuration", "dinov2", "encoder", "families", "merger", "mlp",
           "model", "packing", "rope2d", "siglip"}
ALLOWED = set(sys.stdlib_module_names) | {"torch", "transformers", "safetensors", "huggingface_hub"}

# Run by a fresh interpreter: comp blocked before anything is imported (the venv also has an
# editable install of the main checkout), then plain transformers loads the export.
STANDALONE = textwrap.dedent('''
    import sys

    class BlockComp:
        def find_spec(self, name, path=None, target=None):
            if name == "comp" or name.startswith("comp."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
            return None

    sys.meta_path.insert(0, BlockComp())
    try:
        import comp
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("comp is importable")
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    vfm, inputs, out = sys.argv[1:]
    model = AutoModel.from_pretrained(vfm, trust_remote_code=True)
    x = load_file(inputs)
    with torch.no_grad():
        features = model(x["pixel_values"], x["grid_thw"])
    save_file({"features": features.contiguous()}, out)
    print(type(model).__module__, type(model).__name__, model.dtype)
''')


def _inputs():
    gen = torch.Generator().manual_seed(0)
    grids = [(4, 6), (2, 2), (6, 4)]
    patches = [patchify(torch.randn(3, 14 * h, 14 * w, generator=gen), 14) for h, w in grids]
    return torch.cat(patches), torch.tensor([[1, h, w] for h, w in grids])


@pytest.fixture(scope="module")
def standalone_vfm(tiny_mm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "vfm"
    assert export_main([str(tiny_mm_dir), "--out", str(out), "--standalone"]) == 0
    return out


def test_families_registry_matches_the_config():
    assert tuple(FAMILIES) == configuration.FAMILIES
    assert all(f.name == name for name, f in FAMILIES.items())


def test_shipped_modules_need_only_torch_and_transformers():
    files = shipped_files()
    assert {f.stem for f in files} == SHIPPED  # loading.py (comp's loader) stays behind
    for f in files:
        assert set(get_imports(f)) <= ALLOWED, (f.name, get_imports(f))


def test_standalone_export_writes_code_and_auto_map(standalone_vfm):
    config = json.loads((standalone_vfm / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP == {"AutoConfig": "configuration.CompVisionConfig",
                                              "AutoModel": "model.CompVisionModel"}
    assert {p.stem for p in standalone_vfm.glob("*.py")} == SHIPPED
    assert (standalone_vfm / "preprocessor_config.json").exists()


def test_plain_transformers_loads_the_standalone_export(standalone_vfm, tmp_path):
    pixel_values, grid_thw = _inputs()
    save_file({"pixel_values": pixel_values, "grid_thw": grid_thw}, tmp_path / "in.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", STANDALONE, str(standalone_vfm), str(tmp_path / "in.safetensors"),
                           str(tmp_path / "out.safetensors")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    module, name, dtype = done.stdout.split()[-3:]
    assert module.startswith("transformers_modules.") and name == "CompVisionModel" and dtype == "torch.float32"
    theirs = load_file(tmp_path / "out.safetensors")["features"]
    ours = CompVisionModel.from_pretrained(standalone_vfm)
    assert ours.config.use_rope and ours.merger is None
    with torch.no_grad():
        torch.testing.assert_close(theirs, ours(pixel_values, grid_thw), atol=1e-5, rtol=0)


def test_auto_classes_round_trip_after_import_comp(standalone_vfm, tiny_dir, tmp_path):
    pixel_values, grid_thw = _inputs()
    vfm = CompVisionModel.from_pretrained(tiny_dir("dinov2"), use_rope=True, w_merger=16)
    out = vfm.save_pretrained(tmp_path / "vfm")
    assert isinstance(AutoConfig.from_pretrained(out), configuration.CompVisionConfig)
    auto = AutoModel.from_pretrained(out)
    assert type(auto) is CompVisionModel and auto.config.w_merger == 16
    with torch.no_grad():
        assert torch.equal(auto(pixel_values, grid_thw), vfm(pixel_values, grid_thw))
    # comp's own class wins over the shipped code once comp is imported
    local = AutoModel.from_pretrained(standalone_vfm, trust_remote_code=True)
    assert type(local) is CompVisionModel
    assert AutoModel.from_pretrained(out, dtype=torch.bfloat16, w_merger=0).merger is None
    fresh = AutoModel.from_config(AutoConfig.from_pretrained(out))
    assert type(fresh) is CompVisionModel and fresh.state_dict().keys() == vfm.state_dict().keys()
