"""Files CoMP writes get the mode of a plain open(): 0666 minus the umask (safetensors alone
creates 0600 files that the rest of a team cannot read)."""
from __future__ import annotations

import os
import stat

import pytest
from PIL import Image

from comp import CompForConditionalGeneration, CompVisionModel
from comp.eval import encode
from comp.eval.features import cached_features, load_encoder


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_are_world_readable(tiny_dir, tiny_mm_dir, tmp_path, umask_022):
    image = tmp_path / "a.png"
    Image.new("RGB", (60, 40), (0, 90, 200)).save(image)
    assert mode(image) == umask_022  # what any other writer gets
    out = tmp_path / "f.safetensors"
    assert encode.main([str(tiny_dir("siglip")), str(image), "--out", str(out), "--max_num_vistoken", "16"]) == 0
    assert mode(out) == umask_022
    cached_features(load_encoder(tiny_dir("siglip"), max_num_vistoken=16), [image], tmp_path / "cache")
    assert [mode(f) for f in (tmp_path / "cache").iterdir()] == [umask_022]
    vfm = CompVisionModel.from_pretrained(tiny_dir("siglip")).save_pretrained(tmp_path / "vfm")
    CompForConditionalGeneration.from_pretrained(tiny_mm_dir).save_pretrained(tmp_path / "mm")
    for directory in (vfm, tmp_path / "mm"):
        files = list(directory.iterdir())
        assert files and all(mode(f) == umask_022 for f in files), [(f.name, oct(mode(f))) for f in files]
