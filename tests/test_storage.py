"""Images read in place from zip, tar and parquet shards: the same bytes as the files, bad
members named, and the dataset / data check reading every storage the same way."""
from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from transformers import AutoTokenizer

from comp.data.check import check
from comp.data.dataset import MixtureDataset, Skipped
from comp.data.image import CompImageProcessor
from comp.data.mixture import load_mixture
from comp.data.storage import (ImageLocation, MemberError, ParquetReader, TarReader, ZipReader,
                               read_member, split_archive_path)


def jpeg(seed: int, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (seed * 40 % 256, 80, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


IMAGES = {f"d/{k:03d}.jpg": jpeg(k, (30 + 7 * k, 20 + 3 * k)) for k in range(5)}


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for k, (name, data) in enumerate(members.items()):
            z.writestr(name, data, zipfile.ZIP_DEFLATED if k % 2 else zipfile.ZIP_STORED)
    return path


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def write_parquet(path: Path, images: list[bytes | None]) -> Path:
    table = pa.table({"id": [str(k) for k in range(len(images))],
                      "image": pa.array([None if b is None else {"bytes": b, "path": f"{k}.jpg"}
                                         for k, b in enumerate(images)], IMAGE_TYPE)})
    pq.write_table(table, path, row_group_size=2)
    return path


def test_split_archive_path_enters_archives_like_directories(tmp_path):
    write_zip(tmp_path / "a.zip", IMAGES)
    (tmp_path / "dir.tar").mkdir()  # a directory named like an archive is a directory
    assert split_archive_path(tmp_path / "a.zip" / "d" / "001.jpg") == ImageLocation(tmp_path / "a.zip", "d/001.jpg")
    assert split_archive_path(tmp_path / "dir.tar" / "x.jpg") == ImageLocation(tmp_path / "dir.tar" / "x.jpg")
    assert split_archive_path(tmp_path / "plain.jpg").member is None


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_members_read_back_exactly(tmp_path, kind):
    path = (write_zip if kind == "zip" else write_tar)(tmp_path / f"a.{kind}", IMAGES)
    reader = (ZipReader if kind == "zip" else TarReader)(path)
    assert sorted(reader.members()) == sorted(IMAGES)
    for name, data in IMAGES.items():
        assert reader.read(name) == data
        assert read_member(ImageLocation(path, name)) == data
    with pytest.raises(MemberError, match="no such member") as err:
        reader.read("d/nope.jpg")
    assert err.value.kind == "missing"


def test_zip_bad_crc_and_bad_offset_are_named_and_the_rest_reads(tmp_path):
    path = write_zip(tmp_path / "a.zip", IMAGES)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        infos = {i.filename: i for i in z.infolist()}
    stored = infos["d/000.jpg"]  # ZIP_STORED: flipping data bytes leaves the stream valid
    start = stored.header_offset + 30 + len(stored.filename)
    raw[start + 100:start + 104] = b"\0\0\0\0"
    raw[infos["d/002.jpg"].header_offset:infos["d/002.jpg"].header_offset + 4] = b"XXXX"
    path.write_bytes(bytes(raw))
    reader = ZipReader(path)
    for name, what in (("d/000.jpg", "bad CRC"), ("d/002.jpg", "bad local header offset")):
        with pytest.raises(MemberError, match=what) as err:
            reader.read(name)
        assert err.value.kind == "bad_member" and name in str(err.value) and str(path) in str(err.value)
    assert reader.read("d/001.jpg") == IMAGES["d/001.jpg"]


def test_truncated_tar_keeps_the_members_before_the_cut(tmp_path):
    path = write_tar(tmp_path / "a.tar", IMAGES)
    with tarfile.open(path) as t:
        infos = t.getmembers()
    path.write_bytes(path.read_bytes()[:infos[3].offset_data + 10])  # cut inside member 3
    reader = TarReader(path)
    assert sorted(reader.members()) == [i.name for i in infos[:3]]
    with pytest.raises(MemberError, match="truncated") as err:
        reader.read(infos[3].name)
    assert err.value.kind == "bad_member"


def test_parquet_rows_by_number_across_row_groups(tmp_path):
    images = list(IMAGES.values()) + [None]
    path = write_parquet(tmp_path / "train-00000-of-00001.parquet", images)
    reader = ParquetReader(path)
    assert len(reader) == 6 and len(reader.group_ends) == 3
    for row in (4, 0, 3, 1, 2):  # out of order: row groups re-read or cached
        assert reader.read(str(row)) == images[row]
    for row, match in (("5", "no image"), ("6", "no such row")):
        with pytest.raises(MemberError, match=match) as err:
            reader.read(row)
        assert err.value.kind == "missing"


def mixture_over_storages(root: Path) -> Path:
    """One JSONL whose records point into a zip, a tar, a parquet file and a plain file."""
    images = root / "images"
    images.mkdir()
    write_zip(images / "a.zip", IMAGES)
    write_tar(images / "b.tar", IMAGES)
    write_parquet(images / "c.parquet", list(IMAGES.values()))
    (images / "d").mkdir()
    (images / "d" / "001.jpg").write_bytes(IMAGES["d/001.jpg"])
    bad = bytearray((images / "a.zip").read_bytes())
    with zipfile.ZipFile(images / "a.zip") as z:
        info = z.getinfo("d/004.jpg")
    start = info.header_offset + 30 + len(info.filename)
    bad[start + 5:start + 9] = b"\xff\xff\xff\xff"
    (images / "a.zip").write_bytes(bytes(bad))
    refs = ["a.zip/d/001.jpg", "b.tar/d/001.jpg", "c.parquet/1", "d/001.jpg",
            "a.zip/d/004.jpg", "b.tar/d/missing.jpg", "c.parquet/99"]
    lines = [json.dumps({"id": f"r{k}", "image": ref,
                         "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                           {"from": "gpt", "value": "a box"}]})
             for k, ref in enumerate(refs)]
    (root / "mix.jsonl").write_text("\n".join(lines) + "\n")
    return root / "mix.jsonl"


def test_dataset_and_check_read_every_storage_alike(tmp_path, tiny_dir):
    data = mixture_over_storages(tmp_path)
    specs = load_mixture(data, image_folder=tmp_path / "images")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir("qwen2"))
    dataset = MixtureDataset(specs, tokenizer, CompImageProcessor(max_num_vistoken=16), model_max_length=256)
    samples = [dataset[i] for i in range(len(dataset))]
    kept = samples[:4]
    assert not any(isinstance(s, Skipped) for s in kept)
    for s in kept[1:]:  # the same image through every storage: the same pixels
        assert s["pixel_values"].equal(kept[0]["pixel_values"])
    reasons = [(s.reason, s.detail) for s in samples[4:]]
    assert [r for r, _ in reasons] == ["bad_member", "missing_image", "missing_image"]
    assert "bad CRC" in reasons[0][1] and "a.zip" in reasons[0][1] and "d/004.jpg" in reasons[0][1]
    summary = check(str(data), image_folder=str(tmp_path / "images"))
    assert summary["records"] == 7 and summary["images"] == 4
    assert {r: e["count"] for r, e in summary["errors"].items()} == {"bad_member": 1, "missing_image": 2}


def test_many_shards_keep_few_descriptors_and_every_index(tmp_path, monkeypatch):
    """Random reads over more shards than MAX_OPEN_FILES: descriptors stay bounded, the
    indexes are not reloaded, and every read is right."""
    import os

    from comp.data import storage

    monkeypatch.setattr(storage, "MAX_OPEN_FILES", 3)
    shards = [write_tar(tmp_path / f"{k}.tar", IMAGES) for k in range(6)]
    shards += [write_parquet(tmp_path / f"{k}.parquet", list(IMAGES.values())) for k in range(3)]
    before = len(os.listdir("/proc/self/fd"))
    loads = []
    monkeypatch.setattr(storage, "_cached_index", lambda a, build: loads.append(a) or build(a))
    names = list(IMAGES)
    for k in [0, 5, 2, 7, 1, 8, 0, 3, 6, 5, 4, 2, 1, 8, 7] * 2:
        shard = shards[k]
        member = str(k % 5) if shard.suffix == ".parquet" else names[k % 5]
        assert read_member(ImageLocation(shard, member)) == IMAGES[names[k % 5]]
        assert len(os.listdir("/proc/self/fd")) <= before + 3
    assert sorted(loads) == sorted(s for s in shards if s.suffix == ".tar")  # each index once
