"""``comp data prepare`` on a miniature of every published source (tests/hubmini.py) in an
offline Hugging Face cache: the stage YAMLs' files written, bad members named and counted,
``comp data check`` clean, both layouts, a dry run, and resumption after SIGKILL."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from comp.data.check import check
from comp.data.prepare import STATE_DIR, main as prepare_main, subset_rows
from comp.data.sources import load_registry
from comp.errors import UserError
from hubmini import build_offline_hub
from runs import REPO

STAGES = [REPO / "scripts" / "data" / f"stage{k}.yaml" for k in (1, 2, 3)]
REGISTRY = REPO / "scripts" / "data" / "sources.yaml"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(cache dir, expectations) of the miniature with its defects (bad CRC, truncated
    tar.gz, undecodable parquet bytes)."""
    cache = tmp_path_factory.mktemp("hf_cache")
    return cache, build_offline_hub(cache, defects=True)


@pytest.fixture()
def offline(hub, monkeypatch):
    """huggingface_hub in this process reads the miniature's cache, offline."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub[0]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub[0]))
    return hub


def hub_env(cache: Path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), OMP_NUM_THREADS="1")


def rows(data_root: Path) -> dict[str, dict]:
    """json_path -> the closing-table row of every finished source."""
    out = {}
    for marker in (data_root / STATE_DIR).glob("*.done"):
        row = json.loads(marker.read_text())["row"]
        out[row["json_path"]] = row
    return out


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root (links: their target's name)."""
    digest = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            digest[rel] = "-> " + Path(os.readlink(path)).name
        elif path.is_file():
            digest[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def test_registry_covers_every_stage_file():
    import yaml

    registry = load_registry(REGISTRY)
    named = [d["json_path"] for s in STAGES for d in yaml.safe_load(s.read_text())["datasets"]]
    assert sorted(named) == sorted(registry) and len(named) == 10


def test_bad_registry_entry_is_named(tmp_path):
    bad = tmp_path / "sources.yaml"
    bad.write_text("sources:\n  data/x.json: {repo: a/b, image_prefix: x, parts: [{format: tarball}]}\n")
    with pytest.raises(UserError, match=r"source 'data/x.json': part 0: 'format' must be one of") as err:
        load_registry(bad)
    assert str(bad) in str(err.value)


def test_subset_is_seeded_uniform_and_in_file_order():
    rows_a, rows_b = subset_rows(1000, 300, seed=0), subset_rows(1000, 300, seed=0)
    assert np.array_equal(rows_a, rows_b) and len(np.unique(rows_a)) == 300
    assert np.all(np.diff(rows_a) > 0) and not np.array_equal(rows_a, subset_rows(1000, 300, seed=1))
    assert subset_rows(10, 20, seed=0) is None  # asking for more than there is keeps all


def test_every_stage_prepared_offline_then_checked_clean(hub, tmp_path):
    """The CLI as a user runs it (offline cache), every stage; each source's written and
    dropped counts as the miniature dictates; comp data check finds nothing wrong."""
    cache, expected = hub
    for stage in STAGES:
        proc = subprocess.run([sys.executable, "-m", "comp", "data", "prepare", str(stage),
                               "--data_root", str(tmp_path)], env=hub_env(cache),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "json_path" in proc.stdout and "expected" in proc.stdout  # the closing table
    done = rows(tmp_path)
    assert set(done) == set(expected)
    for json_path, want in expected.items():
        assert (done[json_path]["written"], done[json_path]["dropped"]) == (want["written"], want["dropped"]), json_path
    problems = (tmp_path / STATE_DIR / "data__DenseFusion__DenseFusion-1M.json.problems.tsv").read_text()
    assert "bad CRC" in problems and ".zip member" in problems  # named: archive, member, reason
    for stage in STAGES:
        summary = check(str(stage), data_root=str(tmp_path), image_folder=str(tmp_path / "data"))
        assert summary["num_errors"] == 0, summary["errors"]
        for dataset in summary["datasets"]:
            json_path = Path(dataset["json_path"]).relative_to(tmp_path).as_posix()
            assert dataset["records"] == expected[json_path]["written"] == dataset["images"]
    assert not list((tmp_path / "data").rglob("*.tmp"))


def test_files_layout_writes_the_reference_tree(offline, tmp_path):
    _, expected = offline
    assert prepare_main([str(STAGES[0]), "--data_root", str(tmp_path), "--layout", "files"]) == 0
    records = json.loads((tmp_path / "data/LLaVA-Pretrain/blip_laion_cc_sbu_558k_mixin.json").read_text())
    assert len(records) == expected["data/LLaVA-Pretrain/blip_laion_cc_sbu_558k_mixin.json"]["written"]
    assert records[0]["image"] == "LLaVA-Pretrain/images/00453/004539375.jpg"
    assert all((tmp_path / "data" / r["image"]).is_file() for r in records)
    assert not list(tmp_path.rglob("*.zip")) and not list(tmp_path.rglob("*.tar"))
    assert check(str(STAGES[0]), data_root=str(tmp_path), image_folder=str(tmp_path / "data"))["num_errors"] == 0


def test_dry_run_lists_files_and_sizes_and_fetches_nothing(offline, tmp_path, capsys):
    assert prepare_main([str(STAGES[1]), "--data_root", str(tmp_path / "root"), "--dry_run",
                         "--only", "DenseFusion"]) == 0
    out = capsys.readouterr().out
    assert "BAAI/DenseFusion-1M@" in out and "images/DenseFusion-1M/000000.zip" in out
    assert "DenseFusion-4V" not in out  # the other subset's files are not fetched
    assert "disk needed" in out and not (tmp_path / "root").exists()


def test_missing_offline_file_is_one_clear_error(offline, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="not in the Hugging Face cache") as err:
        prepare_main([str(STAGES[0]), "--data_root", str(tmp_path / "root")])
    assert "liuhaotian/LLaVA-Pretrain" in str(err.value)


def test_sigkill_at_random_points_then_rerun_gives_identical_outputs(hub, offline, tmp_path):
    cache, _ = hub
    clean = tmp_path / "clean"
    assert prepare_main([str(STAGES[1]), "--data_root", str(clean)]) == 0
    want = tree_digest(clean / "data")
    killed = tmp_path / "killed"
    rng = np.random.default_rng(0)
    argv = [sys.executable, "-m", "comp", "data", "prepare", str(STAGES[1]), "--data_root", str(killed)]
    kills = 0
    for delay in rng.uniform(0.0, 0.5, size=4):
        proc = subprocess.Popen(argv, env=hub_env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not (killed / STATE_DIR).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the work starts after the imports
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2, "the runs finished before the kills: the kill points test nothing"
    finished = subprocess.run(argv, env=hub_env(cache), capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert tree_digest(killed / "data") == want


def test_caption_source_from_an_img2dataset_run(offline, tmp_path):
    """DenseFusion's images taken from img2dataset's webdataset output (found by url, read in
    place) instead of the zips; a url it failed to download is a named missing image."""
    import io
    import tarfile

    from huggingface_hub import hf_hub_download
    from PIL import Image

    jsonl = hf_hub_download("BAAI/DenseFusion-1M", "DenseFusion-1M/DenseFusion-1M.jsonl", repo_type="dataset")
    urls = [json.loads(line)["url"] for line in Path(jsonl).read_text().splitlines() if line.strip()]
    shards = tmp_path / "img2dataset"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for k, url in enumerate(urls[1:]):  # the first url failed to download
            image = io.BytesIO()
            Image.new("RGB", (30 + k, 20), (k * 30 % 256, 9, 9)).save(image, "JPEG")
            for name, data in ((f"{k:09d}.jpg", image.getvalue()),
                               (f"{k:09d}.json", json.dumps({"url": url, "key": f"{k:09d}",
                                                             "status": "success"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    root = tmp_path / "root"
    assert prepare_main([str(STAGES[1]), "--data_root", str(root), "--only", "DenseFusion",
                         "--img2dataset", str(shards)]) == 0
    row = rows(root)["data/DenseFusion/DenseFusion-1M.json"]
    assert (row["written"], row["dropped"]) == (len(urls) - 1, {"missing_image": 1})
    records = json.loads((root / "data/DenseFusion/DenseFusion-1M.json").read_text())
    assert all(r["image"].startswith("DenseFusion/img2dataset/00000.tar/") for r in records)
    assert urls[0] in (root / STATE_DIR / "data__DenseFusion__DenseFusion-1M.json.problems.tsv").read_text()
    summary = check(str(root / "data/DenseFusion/DenseFusion-1M.json"), image_folder=str(root / "data"))
    assert (summary["num_errors"], summary["images"]) == (0, len(urls) - 1)
    with pytest.raises(UserError, match="--img2dataset is for sources of captions"):
        prepare_main([str(STAGES[0]), "--data_root", str(root), "--img2dataset", str(shards)])


def test_a_resumed_source_stays_on_the_commit_its_first_run_resolved(tmp_path, monkeypatch):
    """``main`` moving between a kill and the rerun does not mix two revisions' files."""
    from huggingface_hub import constants

    cache = tmp_path / "cache"
    build_offline_hub(cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    root = tmp_path / "root"
    assert prepare_main([str(STAGES[0]), "--data_root", str(root)]) == 0
    refs = cache / "datasets--liuhaotian--LLaVA-Pretrain" / "refs" / "main"
    commit = refs.read_text()
    state = root / STATE_DIR / "data__LLaVA-Pretrain__blip_laion_cc_sbu_558k_mixin.json.shards"
    assert (state / "commit").read_text() == commit
    refs.write_text("f" * 40)  # main moved to a commit this cache does not have
    (root / STATE_DIR / f"{state.name}.done").unlink()  # as if killed before the end
    assert prepare_main([str(STAGES[0]), "--data_root", str(root)]) == 0
    assert rows(root)["data/LLaVA-Pretrain/blip_laion_cc_sbu_558k_mixin.json"]["repo"].endswith(commit)


def test_a_second_prepare_into_the_same_root_is_refused_while_one_runs(offline, tmp_path):
    from comp.files import DirectoryLock

    (tmp_path / STATE_DIR).mkdir()
    with DirectoryLock(tmp_path / STATE_DIR, "prepare.lock", "comp data prepare", "--data_root"):
        with pytest.raises(UserError, match=r"another comp data prepare \(process \d+\) is writing"):
            prepare_main([str(STAGES[0]), "--data_root", str(tmp_path)])
    assert prepare_main([str(STAGES[0]), "--data_root", str(tmp_path)]) == 0  # released: it runs
