"""Hub ids resolve through huggingface_hub's cache (comp.hub), offline, in every loader.

The cache is built on disk in the layout huggingface_hub writes (``models--org--name/``
with ``blobs/``, ``snapshots/<commit>/`` symlinks and ``refs/main``) from the tiny
checkpoints; ``HF_HUB_OFFLINE=1`` keeps every test off the network.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from comp import CompForConditionalGeneration, CompProcessor, CompVisionModel
from comp.data.image import CompImageProcessor
from comp.hub import resolve_model_dir, split_revision
from comp.train.args import DataArguments, ModelArguments
from comp.models.kinds import checkpoint_kind
from comp.train.run import build_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ORG = "tiny-org"


def add_to_cache(cache: Path, repo_id: str, source: Path, commit: str = COMMIT) -> Path:
    """Copy ``source``'s files into ``cache`` as huggingface_hub stores a download."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for f in sorted(source.rglob("*")):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / f.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(tiny_dir, tiny_mm_dir, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf_cache")
    for kind in ("siglip", "dinov2", "qwen2"):
        add_to_cache(cache, f"{ORG}/{kind}", tiny_dir(kind))
    add_to_cache(cache, f"{ORG}/comp-mm", tiny_mm_dir)
    return cache


@pytest.fixture
def offline(hub_cache, monkeypatch) -> Path:
    """huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE at import: set its constants."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def hub_env(cache: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_split_revision():
    assert split_revision("org/name") == ("org/name", None)
    assert split_revision("org/name@v1.0") == ("org/name", "v1.0")


def test_local_path_wins(tiny_dir, offline):
    assert resolve_model_dir(tiny_dir("siglip")) == tiny_dir("siglip")


def test_id_resolves_to_the_cached_snapshot(offline):
    snapshot = offline / f"models--{ORG}--siglip" / "snapshots" / COMMIT
    assert resolve_model_dir(f"{ORG}/siglip") == snapshot
    assert resolve_model_dir(f"{ORG}/siglip@main") == snapshot
    assert resolve_model_dir(f"{ORG}/siglip@{COMMIT}") == snapshot
    assert resolve_model_dir(f"{ORG}/siglip", revision=COMMIT) == snapshot


def test_offline_and_not_cached_says_so(offline):
    with pytest.raises(FileNotFoundError) as err:
        resolve_model_dir("google/siglip-so400m-patch14-384")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE=1" in msg and str(offline) in msg and "hf download" in msg
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        resolve_model_dir(f"{ORG}/siglip@v9")  # a revision the cache has no ref for


def test_neither_path_nor_id(offline, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face Hub id"):
        resolve_model_dir(tmp_path / "missing" / "deeper" / "dir")


@pytest.mark.parametrize("kind", ["siglip", "dinov2"])
def test_vision_model_and_processor_by_id(kind, tiny_dir, offline):
    by_id = CompVisionModel.from_pretrained(f"{ORG}/{kind}", use_rope=True)
    local = CompVisionModel.from_pretrained(tiny_dir(kind), use_rope=True)
    assert by_id.config.to_dict() == local.config.to_dict() and same_state(by_id, local)
    assert by_id.preprocessor_config == local.preprocessor_config
    proc_id = CompImageProcessor.from_pretrained(f"{ORG}/{kind}", max_num_vistoken=64)
    assert proc_id.to_dict() == CompImageProcessor.from_pretrained(tiny_dir(kind), max_num_vistoken=64).to_dict()


def test_mllm_from_components_and_pretrained_by_id(tiny_dir, tiny_mm_dir, offline):
    torch.manual_seed(0)
    by_id = CompForConditionalGeneration.from_components(f"{ORG}/qwen2", f"{ORG}/siglip")
    torch.manual_seed(0)
    local = CompForConditionalGeneration.from_components(tiny_dir("qwen2"), tiny_dir("siglip"))
    assert same_state(by_id, local)
    saved_id = CompForConditionalGeneration.from_pretrained(f"{ORG}/comp-mm@main")
    assert same_state(saved_id, CompForConditionalGeneration.from_pretrained(tiny_mm_dir))
    proc = CompProcessor.from_components(f"{ORG}/qwen2", f"{ORG}/siglip", max_num_vistoken=64)
    ref = CompProcessor.from_components(tiny_dir("qwen2"), tiny_dir("siglip"), max_num_vistoken=64)
    assert proc.tokenizer.get_vocab() == ref.tokenizer.get_vocab()
    assert CompProcessor.from_pretrained(f"{ORG}/comp-mm").image_processor.to_dict() == \
        CompProcessor.from_pretrained(tiny_mm_dir).image_processor.to_dict()


def test_train_builds_from_ids(offline):
    """`comp train --model_name_or_path ID --custom_visual_model ID`, as the recipes default."""
    assert checkpoint_kind(f"{ORG}/comp-mm") == "comp-mm" and checkpoint_kind(f"{ORG}/qwen2") == "llm"
    data = DataArguments(data_path="unused.yaml", max_num_vistoken=64)
    model, processor = build_model(ModelArguments(f"{ORG}/qwen2", custom_visual_model=f"{ORG}/siglip"), data)
    assert model.config.vision_config.family == "siglip" and processor.image_processor.max_pixels == 64 * 28 * 28
    model, _ = build_model(ModelArguments(f"{ORG}/comp-mm"), data)
    assert model.config.model_type == "comp"


def test_cli_commands_take_ids_offline(hub_cache, tmp_path):
    env = hub_env(hub_cache)
    image = tmp_path / "img.png"
    from PIL import Image
    Image.new("RGB", (60, 40), (200, 30, 30)).save(image)
    run = lambda *args: subprocess.run([sys.executable, "-m", "comp", *args], env=env,  # noqa: E731
                                       capture_output=True, text=True, timeout=300)
    out = run("encode", f"{ORG}/siglip", str(image), "--out", str(tmp_path / "f.safetensors"))
    assert out.returncode == 0, out.stderr
    out = run("chat", f"{ORG}/comp-mm", "--image", str(image), "--prompt", "hi", "--max_new_tokens", "2")
    assert out.returncode == 0, out.stderr
    out = run("export-vfm", f"{ORG}/comp-mm", "--out", str(tmp_path / "vfm"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "vfm" / "config.json").exists()
    out = run("encode", "google/siglip-so400m-patch14-384", str(image), "--out", str(tmp_path / "g.safetensors"))
    assert out.returncode == 2 and "HF_HUB_OFFLINE=1" in out.stderr and "Traceback" not in out.stderr
