"""Shared fixtures: tiny checkpoints written by the project (never downloaded)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from comp.models.tiny import write_tiny

SHARED = Path(__file__).resolve().parents[2] / "shared"
QWEN2_TOKENIZER_DIR = SHARED / "tokenizers" / "qwen2"
WORD_DIST_FIXTURE = SHARED / "fixtures" / "word_dist.pth"

# Without a GPU, DeepSpeed (imported by transformers when saving) prints an accelerator
# warning to stdout on first use, inside whichever test captures stdout first; naming the CPU
# accelerator keeps that quiet.
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

# Tiny models: one thread is fastest, and does not fight other processes for the 2 cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Caches the code writes (sample lengths) go to a temporary directory, also in the
    training processes the tests start, never to the user's ~/.cache."""
    os.environ["COMP_CACHE"] = str(tmp_path_factory.mktemp("comp_cache"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(kind)`` -> directory of a tiny checkpoint (siglip|dinov2|aimv2|qwen2), seed 0."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = write_tiny(root / kind, kind, seed=0)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir():
    if not (QWEN2_TOKENIZER_DIR / "tokenizer.json").exists():
        pytest.skip("../shared/tokenizers/qwen2 is not present (fresh clone without ../shared)")
    return QWEN2_TOKENIZER_DIR


@pytest.fixture(scope="session")
def word_dist_fixture():
    if not WORD_DIST_FIXTURE.exists():
        pytest.skip("../shared/fixtures/word_dist.pth is not present")
    return WORD_DIST_FIXTURE


@pytest.fixture(scope="session")
def tiny_mm_dir(tiny_dir, tmp_path_factory):
    """A saved CoMP-MM directory (model + processor): tiny Qwen2 + tiny SigLIP with C-RoPE."""
    from comp import CompForConditionalGeneration, CompProcessor

    out = tmp_path_factory.mktemp("comp_mm")
    parts = tiny_dir("qwen2"), tiny_dir("siglip")  # first: writing them reseeds torch
    torch.manual_seed(0)  # the merger's initialisation
    CompForConditionalGeneration.from_components(*parts, use_rope=True).save_pretrained(out)
    CompProcessor.from_components(*parts, max_num_vistoken=64).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def assets(tiny_dir, tmp_path_factory):
    """What a CLI training run reads: the tiny Qwen2 and SigLIP and a small toyworld, written
    once per test module (tests copy what they corrupt; a module may define its own)."""
    from comp.data.toyworld import write_toyworld

    root = tmp_path_factory.mktemp("assets")
    return {"llm": tiny_dir("qwen2"), "vision": tiny_dir("siglip"),
            "data": write_toyworld(root / "toyworld", seed=0, size="small")}


@pytest.fixture(scope="module")
def mm(tiny_mm_dir):
    """(model, processor) of ``tiny_mm_dir``, loaded once per test module (tests may edit the
    model's weights: each module gets its own copy)."""
    from comp import CompForConditionalGeneration, CompProcessor

    model = CompForConditionalGeneration.from_pretrained(tiny_mm_dir).eval()
    return model, CompProcessor.from_pretrained(tiny_mm_dir)
