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

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
