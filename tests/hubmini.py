"""A miniature of every Hugging Face dataset in scripts/data/sources.yaml, in its published
layout, written into an offline hub cache so ``comp data prepare`` can run on it.

``build_offline_hub(cache)`` writes, for each repo ``org/name`` (repo_type dataset),
``cache/datasets--org--name/{refs/main, blobs/<sha256>, snapshots/<commit>/<path in repo>}``
the way huggingface_hub itself stores downloads (snapshot entries are relative symlinks to
blobs; ``symlinks=False`` writes regular files instead). With ``HF_HUB_OFFLINE=1`` and
``HF_HUB_CACHE=cache``, ``hf_hub_download(repo, path, repo_type="dataset", revision="main")``
returns those files (``check_offline_hub`` verifies it in a subprocess). It returns, per
json_path key of sources.yaml, what prepare must produce: ``{"written": n, "dropped":
{reason: n}}`` (reasons with a zero count are left out). Every record whose image is
readable is written; a record without an image (no ``image`` key, or a null parquet image)
is dropped as ``text_only``.

What is reproduced, from the datasets' published file trees and cards (the registry's
comments cite them):
- liuhaotian/LLaVA-Pretrain: ``blip_laion_cc_sbu_558k.json`` (one JSON array; the first
  record is the published one, id ``004539375``, ``<image>`` after the text; images
  ``<first 5 digits>/<id>.jpg``), ``blip_laion_cc_sbu_558k_meta.json``, and ``images.zip``
  with members at the root (no ``images/`` dir), directory entries, deflated and stored
  members.
- lmms-lab/LLaVA-OneVision-Mid-Data: ``synthdog_{en,zh}/synthdog_*_processed.json`` with
  ``synthdog_*_images_{1,2}.tar.gz`` (top dirs ``synthdog-en/``, ``synthdog-zh/``, JSON image
  values equal to the member paths), ``ureader_tr`` with three tar.gz holding ``docvqa/...``
  and ``ureader-instruction-1.0/ChartQA/train/png/<id>.png``, and the text-only
  ``evol_instruct/evol_instruct_processed.json`` (no stage uses it).
- lmms-lab/LLaVA-ReCap-{118K,558K,CC3M}: ``data/train-0000K-of-0000N.parquet``, columns id,
  image (the HF Image feature ``struct<bytes: binary, path: string>``), conversations
  (``list<struct<from, value>>``, human turn exactly ``"<image>"``), data_source, with the
  ``huggingface`` schema metadata. 118K ids are 12-digit COCO ids, 558K ids LCS ids;
  CC3M ids (``GCC_train_<9 digits>``, as in LLaVA-CC3M-Pretrain-595K) and the
  ``image.path`` values (a file name, or null in 558K) are guesses.
- BAAI/DenseFusion-1M: ``DenseFusion-1M/DenseFusion-1M.jsonl`` {image_id, image_path
  ``DenseFusion-1M/<batch>/<image_id>.png``, caption, url} and
  ``images/DenseFusion-1M/00000{0,1}.zip`` of bare ``<image_id>.png`` members; a decoy
  ``DenseFusion-4V-100k`` jsonl + ``images/DenseFusion-4V-100K/000000.zip`` that the 1M
  source must not pick up.
- lmms-lab/LLaVA-NeXT-Data: ``data/train-0000K-of-00003.parquet``; the last shard ends in
  null-image (text-only) rows, one of them a whole row group; an id with ``/``
  (``VG_100K/2317533``), a dvqa-like id ending in ``.png``, PNG RGBA images; data_source
  ``llava-next-instruct``; image.path the bare file name.
- lmms-lab/LLaVA-OneVision-Data: config folders with their real names
  (``CLEVR-Math(MathV360K)``, ``ai2d(cauldron,llava_format)`` in two shards with path-like
  cauldron ids, ``vision_flan(filtered)`` with ``/`` in ids, ``magpie_pro(l3_80b_st)`` all
  null images) and the json + tar.gz parts ``ureader_kg``, ``ureader_qa``,
  ``cambrian(filtered)`` (tar top dir ``cambrian_selection/``).
Not published, added to exercise prepare (inferences, flagged): ``ureader_qa`` has two
records sharing one image, and one of its images has the same member path (and bytes) as
one in ``ureader_kg`` (both extract into one folder in LLaVA-OV-Manager's setup.sh);
``cambrian(filtered)`` has one text-only record (no ``image`` key).

``defects=True`` adds exactly: (a) a bad CRC in DenseFusion ``000001.zip`` (bytes flipped
inside a stored member; upstream 000072/000099 have this) -> ``bad_member``; (b) the last
ureader_tr tar.gz cut inside a member's data: members whose data lies wholly in what the
cut gzip stream still inflates to survive, the cut one and the ones after it are lost ->
``bad_member``; (c) one NeXT row whose image bytes are ``b"not an image"`` ->
``broken_image``.

Images are 20-120 px, seeded (numpy default_rng), JPEG mostly; the whole cache is ~0.3 MB
and builds in well under a second. Run ``python tests/hubmini.py`` for the self-check.
"""
from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import json
import os
import tarfile
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SOURCES_YAML = Path(__file__).resolve().parents[1] / "scripts" / "data" / "sources.yaml"

PRETRAIN = "data/LLaVA-Pretrain/blip_laion_cc_sbu_558k_mixin.json"
SYNTHDOG_EN = "data/LLaVA-OneVision-Mid-Data/synthdog_en_processed.json"
SYNTHDOG_ZH = "data/LLaVA-OneVision-Mid-Data/synthdog_zh_processed.json"
UREADER_TR = "data/LLaVA-OneVision-Mid-Data/ureader_tr_processed.json"
CC3M = "data/cc3m_llava_recap/cc3m_llava_recap_2m_subset.json"
RECAP_118K = "data/LLaVA-ReCap-118K/LLaVA-ReCap-118K_all.json"
RECAP_558K = "data/LLaVA-ReCap-558K/LLaVA-ReCap-558K_all.json"
DENSEFUSION = "data/DenseFusion/DenseFusion-1M.json"
NEXT = "data/LLaVA-NeXT-Data/llava_next_748k_mixin.json"
OV_SI = "data/llava_ov_si_only_image.json"

ZIP_DATE = (2023, 7, 6, 12, 0, 0)
TAR_MTIME = 1_717_000_000
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
TURNS_TYPE = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
_VALUE = {"dtype": "string", "_type": "Value"}
HF_FEATURES = {"info": {"features": {
    "id": _VALUE, "image": {"_type": "Image"},
    "conversations": [{"from": _VALUE, "value": _VALUE}], "data_source": _VALUE}}}


# ----------------------------------------------------------------------------- images


class _Images:
    """Seeded small images: smooth blocks (a few hundred bytes to a few kB encoded)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def _pixels(self, channels: int, noise: bool = False) -> np.ndarray:
        w, h = (int(v) for v in self.rng.integers(20, 121, size=2))
        if noise:
            return self.rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
        coarse = self.rng.integers(0, 256, size=(4, 4, channels), dtype=np.uint8)
        img = Image.fromarray(coarse.squeeze(), "RGBA" if channels == 4 else "RGB")
        return np.asarray(img.resize((w, h), Image.BILINEAR))

    def jpeg(self) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self._pixels(3)).save(buf, "JPEG", quality=80)
        return buf.getvalue()

    def png(self, mode: str = "RGB", noise: bool = False) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(self._pixels(4 if mode == "RGBA" else 3, noise), mode).save(buf, "PNG")
        return buf.getvalue()


def _chat(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


# ----------------------------------------------------------------------------- containers


def _zip(members: list[tuple[str, bytes, int]], dirs: bool = True) -> bytes:
    """(name, data, compress_type) members; directory entries first, as ``zip -r`` writes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        seen = set()
        for name, _, _ in members:
            parent = name.rpartition("/")[0]
            if dirs and parent and parent not in seen:
                seen.add(parent)
                z.writestr(zipfile.ZipInfo(parent + "/", ZIP_DATE), b"")
        for name, data, method in members:
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.compress_type = method
            z.writestr(info, data)
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """An uncompressed GNU tar with parent directory entries, as ``tar czf`` writes them;
    also each file member's (data offset, size)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        seen = set()
        for name, data in members:
            parts = name.split("/")[:-1]
            for k in range(1, len(parts) + 1):
                d = "/".join(parts[:k])
                if d not in seen:
                    seen.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, TAR_MTIME
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, TAR_MTIME
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        spans = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
    return raw, spans


def _targz(members: list[tuple[str, bytes]]) -> bytes:
    return gzip.compress(_tar(members)[0], mtime=0)


def _truncated_targz(members: list[tuple[str, bytes]], cut_member: str) -> tuple[bytes, set[str]]:
    """The tar.gz cut so the gzip stream ends in the middle of ``cut_member``'s data; also the
    members whose data is wholly inside what the cut stream still inflates to."""
    raw, spans = _tar(members)
    gz = gzip.compress(raw, mtime=0)
    start, size = spans[cut_member]
    target = start + size // 2

    def inflated(n: int) -> int:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        return len(d.decompress(gz[:n]))

    lo, hi = 0, len(gz)
    while lo < hi:  # smallest prefix that inflates past the middle of the member
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if inflated(mid) < target else (lo, mid)
    got = inflated(lo)
    assert start + 1024 <= got <= start + size - 1024, (start, size, got)
    survivors = {name for name, (off, n) in spans.items() if off + n <= got}
    return gz[:lo], survivors


def _parquet(rows: list[dict]) -> bytes:
    table = pa.table({
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "image": pa.array([r["image"] for r in rows], IMAGE_TYPE),
        "conversations": pa.array([r["conversations"] for r in rows], TURNS_TYPE),
        "data_source": pa.array([r["data_source"] for r in rows], pa.string()),
    }).replace_schema_metadata({"huggingface": json.dumps(HF_FEATURES)})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=2)
    return buf.getvalue()


def _json(records, indent: int | None = None) -> bytes:
    return json.dumps(records, ensure_ascii=False, indent=indent).encode()


class _Repo:
    """One dataset repo in the hub cache: blobs named by sha256, snapshot entries linking to
    them (relative symlinks, as huggingface_hub writes), refs/main -> the commit."""

    def __init__(self, cache: Path, repo_id: str, symlinks: bool):
        self.root = Path(cache) / ("datasets--" + repo_id.replace("/", "--"))
        self.repo_id, self.symlinks = repo_id, symlinks
        self.files: dict[str, bytes] = {}

    def add(self, path: str, data: bytes) -> None:
        self.files[path] = data

    def write(self) -> str:
        digest = hashlib.sha1(self.repo_id.encode())
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(self.files[path]).digest())
        commit = digest.hexdigest()
        snapshot = self.root / "snapshots" / commit
        for path, data in self.files.items():
            target = snapshot / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if self.symlinks:
                blob = self.root / "blobs" / hashlib.sha256(data).hexdigest()
                blob.parent.mkdir(parents=True, exist_ok=True)
                if not blob.exists():
                    blob.write_bytes(data)
                os.symlink(os.path.relpath(blob, target.parent), target)
            else:
                target.write_bytes(data)
        (self.root / "refs").mkdir(parents=True, exist_ok=True)
        (self.root / "refs" / "main").write_text(commit)  # no newline, as huggingface_hub
        return commit


class _Expect:
    def __init__(self):
        self.written = Counter()
        self.dropped: dict[str, Counter] = {}

    def add(self, key: str, outcome: str) -> None:
        if outcome == "written":
            self.written[key] += 1
        else:
            self.dropped.setdefault(key, Counter())[outcome] += 1
        self.dropped.setdefault(key, Counter())

    def result(self) -> dict:
        return {k: {"written": self.written[k], "dropped": dict(sorted(self.dropped[k].items()))}
                for k in self.dropped}


# ----------------------------------------------------------------------------- sources


def _pretrain(repo: _Repo, img: _Images, exp: _Expect) -> None:
    ids = ["004539375", "002239345", "002239412", "001328704", "003097857"]
    captions = ["select luxury furniture 3 - inch gel memory foam mattress topper",
                "a grey watch with an army style strap", "a dragon kite flying in the blue sky",
                "the little girl is smiling", "an old stone bridge over a river"]
    prompts = ["Render a clear and concise summary of the photo.\n<image>",
               "<image>\nWrite a terse but informative summary of the picture.",
               "Give a brief description of the image.\n<image>",
               "<image>\nShare a concise interpretation of the image provided.",
               "Describe the image concisely.\n<image>"]
    records, meta, members = [], [], []
    for k, (i, cap, prompt) in enumerate(zip(ids, captions, prompts)):
        path = f"{i[:5]}/{i}.jpg"
        records.append({"id": i, "image": path, "conversations": _chat(prompt, cap)})
        meta.append({"id": i, "image": path, "blip_caption": cap, "url": f"http://example.com/{i}.jpg"})
        members.append((path, img.jpeg(), zipfile.ZIP_STORED if k % 2 else zipfile.ZIP_DEFLATED))
        exp.add(PRETRAIN, "written")
    repo.add("blip_laion_cc_sbu_558k.json", _json(records))
    repo.add("blip_laion_cc_sbu_558k_meta.json", _json(meta))
    repo.add("images.zip", _zip(members))
    repo.add("README.md", b"---\nlicense: other\n---\n# LLaVA Visual Instruct Pretrain Dataset\n")


def _tar_json_part(repo: _Repo, img: _Images, exp: _Expect, key: str, folder: str,
                   stem: str, images: list[list[tuple[str, bytes]]], records: list[dict],
                   lost: set[str] = frozenset(), tars: dict[int, bytes] | None = None) -> None:
    """``folder/stem_processed.json`` + ``folder/stem_images_<n>.tar.gz`` (n from 1)."""
    for n, members in enumerate(images, 1):
        data = (tars or {}).get(n) or _targz(members)
        repo.add(f"{folder}/{stem}_images_{n}.tar.gz", data)
    repo.add(f"{folder}/{stem}_processed.json", _json(records, indent=4))
    for r in records:
        exp.add(key, "text_only" if "image" not in r else
                "bad_member" if r["image"] in lost else "written")


def _mid_data(repo: _Repo, img: _Images, exp: _Expect, defects: bool) -> None:
    for lang, key, texts, sizes in (
            ("en", SYNTHDOG_EN, ["The quick brown fox", "jumps over the lazy dog",
                                 "Sphinx of black quartz", "judge my vow"], (2, 2)),
            ("zh", SYNTHDOG_ZH, ["我们的数据", "图像中的文字", "你好，世界"], (2, 1))):
        names = iter(range(100, 200, 7))
        tars, records = [], []
        for size in sizes:
            members = [(f"synthdog-{lang}/images/image_{next(names)}.jpg", img.jpeg())
                       for _ in range(size)]
            tars.append(members)
        for k, (name, _) in enumerate(m for t in tars for m in t):
            records.append({"id": f"synthdog_{lang}_{k:05d}", "image": name,
                            "conversations": _chat("<image>\nWhat is written in the image?", texts[k])})
        records.reverse()  # the JSON's order is not the tars' order
        _tar_json_part(repo, img, exp, key, f"synthdog_{lang}", f"synthdog_{lang}", tars, records)

    # ureader_tr: docvqa + ChartQA pngs over three tar.gz; the last one is cut when defects
    tars = [
        [("docvqa/train/documents/xnbl0037_1.png", img.png()),
         ("ureader-instruction-1.0/ChartQA/train/png/two_col_1234.png", img.png())],
        [("ureader-instruction-1.0/ChartQA/train/png/multi_col_20396.png", img.png()),
         ("docvqa/train/documents/ffbf0023_4.png", img.png())],
        [("docvqa/train/documents/kzbn0226_2.png", img.png()),
         ("ureader-instruction-1.0/ChartQA/train/png/two_col_40912.png", img.png(noise=True)),
         ("docvqa/train/documents/qqvf0054_7.png", img.png())],
    ]
    lost, cut = set(), {}
    if defects:
        cut[3], survivors = _truncated_targz(tars[2], tars[2][1][0])
        lost = {name for name, _ in tars[2]} - survivors
    records = [{"id": f"ureader_tr_{k}", "image": name,
                "conversations": _chat("<image>\nRecognize the text in the image.", f"text {k}")}
               for k, (name, _) in enumerate(m for t in tars for m in t)]
    _tar_json_part(repo, img, exp, UREADER_TR, "ureader_tr", "ureader_tr", tars, records, lost, cut)

    evol = [{"id": f"evol_{k}", "conversations": _chat(q, "...")}
            for k, q in enumerate(["Write a haiku about autumn.", "Explain recursion.",
                                   "Sort a list in Python."])]
    repo.add("evol_instruct/evol_instruct_processed.json", _json(evol, indent=4))
    repo.add("README.md", b"---\nlicense: apache-2.0\n---\n# LLaVA-OneVision Mid-Stage Data\n")


def _row(id_: str, image: bytes | None, question: str, answer: str, source: str,
         path: str | None = None) -> dict:
    return {"id": id_, "image": None if image is None else {"bytes": image, "path": path},
            "conversations": _chat(question, answer), "data_source": source}


def _parquet_source(repo: _Repo, exp: _Expect, key: str, folder: str,
                    shards: list[list[dict]], outcomes: dict[str, str] | None = None) -> None:
    n = len(shards)
    for k, rows in enumerate(shards):
        repo.add(f"{folder}/train-{k:05d}-of-{n:05d}.parquet", _parquet(rows))
        for r in rows:
            exp.add(key, (outcomes or {}).get(r["id"]) or
                    ("text_only" if r["image"] is None else "written"))


def _recap(repos: dict[str, _Repo], img: _Images, exp: _Expect) -> None:
    cap = "The image shows a scene with several objects arranged on a surface."
    for repo_id, key, ids, with_path, source in (
            ("lmms-lab/LLaVA-ReCap-118K", RECAP_118K,
             [[f"{n:012d}" for n in (9, 25, 30, 34, 36)], [f"{n:012d}" for n in (42, 49, 61, 64)]],
             True, "coco"),
            ("lmms-lab/LLaVA-ReCap-558K", RECAP_558K,
             [["004539375", "002239345", "002239412", "001328704"],
              ["003097857", "000914321", "004005183", "002775541"]], False, "lcs558k"),
            ("lmms-lab/LLaVA-ReCap-CC3M", CC3M,
             [["GCC_train_002582585", "GCC_train_002109690", "GCC_train_000093466"],
              ["GCC_train_001291534", "GCC_train_002461329", "GCC_train_000318958"],
              ["GCC_train_002814107", "GCC_train_001154880"]], True, "cc3m")):
        repo = repos[repo_id]
        shards = [[_row(i, img.jpeg(), "<image>", cap, source, f"{i}.jpg" if with_path else None)
                   for i in shard] for shard in ids]
        _parquet_source(repo, exp, key, "data", shards)
        repo.add("README.md", _card(repo_id))


def _card(repo_id: str) -> bytes:
    return (f"---\ndataset_info:\n  features:\n  - name: id\n    dtype: string\n  - name: image\n"
            f"    dtype: image\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
            f"    path: data/train-*\n---\n# {repo_id}\n").encode()


def _densefusion(repo: _Repo, img: _Images, exp: _Expect, defects: bool) -> None:
    batches = {"000000": ["2467575000241", "2895978003295", "1523607005417"],
               "000001": ["3011218004436", "1938550002571", "2722107000118"]}
    bad = "1938550002571"  # stored; its bytes are flipped when defects
    lines = []
    for batch, ids in batches.items():
        members = []
        for i in ids:
            data = img.png()
            members.append((i, data, zipfile.ZIP_STORED if i == bad else zipfile.ZIP_DEFLATED))
            lines.append({"image_id": i, "image_path": f"DenseFusion-1M/{batch}/{i}.png",
                          "caption": f"The image depicts item {i} in detail.",
                          "url": f"https://example.com/laion/{i}.jpg"})
            exp.add(DENSEFUSION, "bad_member" if defects and i == bad else "written")
        archive = _zip([(f"{i}.png", d, m) for i, d, m in members], dirs=False)
        if defects and bad in ids:
            archive = _flip_stored(archive, f"{bad}.png")
        repo.add(f"images/DenseFusion-1M/{batch}.zip", archive)
    repo.add("DenseFusion-1M/DenseFusion-1M.jsonl",
             "".join(json.dumps(line) + "\n" for line in lines).encode())
    # decoy: the 4V-100K subset, which the 1M source must not read
    repo.add("DenseFusion-4V-100k/DenseFusion-4V-100k.jsonl", (json.dumps(
        {"image_id": "1000000000001", "image_path": "DenseFusion-4V-100K/000000/1000000000001.png",
         "caption": "decoy", "url": "https://example.com/x.jpg"}) + "\n").encode())
    repo.add("images/DenseFusion-4V-100K/000000.zip",
             _zip([("1000000000001.png", img.png(), zipfile.ZIP_DEFLATED)], dirs=False))
    repo.add("README.md", b"---\nlicense: cc-by-4.0\nconfigs:\n- config_name: DenseFusion-1M\n"
                          b"  data_files: DenseFusion-1M/DenseFusion-1M.jsonl\n---\n")


def _flip_stored(archive: bytes, member: str) -> bytes:
    """Invert 8 bytes in the middle of a stored member's data: the CRC no longer matches."""
    with zipfile.ZipFile(io.BytesIO(archive)) as z:
        info = z.getinfo(member)
    assert info.compress_type == zipfile.ZIP_STORED
    name_len, extra_len = np.frombuffer(archive[info.header_offset + 26:info.header_offset + 30], "<u2")
    start = info.header_offset + 30 + int(name_len) + int(extra_len) + info.file_size // 2
    out = bytearray(archive)
    out[start:start + 8] = bytes(b ^ 0xFF for b in out[start:start + 8])
    return bytes(out)


def _next(repo: _Repo, img: _Images, exp: _Expect, defects: bool) -> None:
    src = "llava-next-instruct"
    q = "<image>\nWhat is shown in the image?"
    broken = "coco2014_caps_1842"
    shards = [
        [_row("000000033471", img.jpeg(), q, "A bus.", src, "000000033471.jpg"),
         _row("VG_100K/2317533", img.jpeg(), q, "A street.", src, "2317533.jpg"),
         _row("bar_train_00014137.png", img.png("RGBA"), "<image>\nWhich bar is tallest?", "b",
              src, "bar_train_00014137.png"),
         _row("synthdog_en_57912", img.jpeg(), q, "Text.", src, "synthdog_en_57912.jpg")],
        [_row("chart_qa_two_col_8071", img.png("RGBA"), q, "A chart.", src,
              "chart_qa_two_col_8071.png"),
         _row(broken, b"not an image" if defects else img.jpeg(), q, "A cat.", src,
              f"{broken}.jpg"),
         _row("000000108416", img.jpeg(), q, "A kite.", src, "000000108416.jpg"),
         _row("VG_100K_2/2412945", img.jpeg(), q, "A room.", src, "2412945.jpg")],
        [_row("000000481404", img.jpeg(), q, "A dog.", src, "000000481404.jpg"),
         _row("M9Nb6So_0", None, "Write a poem about the sea.", "...", src),
         _row("M9Nb6So_1", None, "And another one.", "...", src),
         _row("alpaca_31", None, "Name three colours.", "Red, green, blue.", src),
         _row("alpaca_32", None, "What is 2 + 2?", "4", src)],
    ]
    _parquet_source(repo, exp, NEXT, "data", shards, {broken: "broken_image"} if defects else None)
    repo.add("README.md", _card("lmms-lab/LLaVA-NeXT-Data"))


def _ov_data(repo: _Repo, img: _Images, exp: _Expect) -> None:
    q = "<image>\nAnswer the question using a single word or phrase."
    configs = {
        "CLEVR-Math(MathV360K)": [[
            _row(f"identity_{n}", img.jpeg(), q + " How many cubes are left?", "3",
                 "CLEVR-Math(MathV360K)", f"CLEVR_train_{n:06d}.png") for n in (1021, 1022, 2045)]],
        "ai2d(cauldron,llava_format)": [
            [_row(f"cauldron/ai2d/images/ai2d_{n:05d}.png", img.png(), q, "b", "ai2d(cauldron,llava_format)")
             for n in (1, 2, 3)],
            [_row(f"cauldron/ai2d/images/ai2d_{n:05d}.png", img.jpeg(), q, "c", "ai2d(cauldron,llava_format)")
             for n in (4, 5)]],
        "magpie_pro(l3_80b_st)": [[
            _row(f"magpie_{n}", None, "Tell me about Rome.", "...", "magpie_pro(l3_80b_st)")
            for n in range(3)]],
        "vision_flan(filtered)": [[
            _row(f"VQA-E+VQA-E/COCO_train2014_{n:012d}.jpg", img.jpeg(), q, "yes",
                 "vision_flan(filtered)") for n in (139, 285)]],
    }
    for folder, shards in configs.items():
        _parquet_source(repo, exp, OV_SI, folder, shards)

    chart = "ureader-instruction-1.0/ChartQA/train/png"
    shared = (f"{chart}/two_col_100.png", img.png())  # in both ureader_kg and ureader_qa
    kg = [shared, (f"{chart}/multi_col_803.png", img.png()),
          ("docvqa/train/documents/nkbl0226_1.png", img.png())]
    _tar_json_part(repo, img, exp, OV_SI, "ureader_kg", "ureader_kg", [kg], [
        {"id": f"ureader_kg_{k}", "image": name,
         "conversations": _chat("<image>\nWhat does the chart show?", "A trend.")}
        for k, (name, _) in enumerate(kg)])
    qa = [shared, (f"{chart}/two_col_2301.png", img.png()),
          ("docvqa/train/documents/ffdw0217_3.png", img.png())]
    _tar_json_part(repo, img, exp, OV_SI, "ureader_qa", "ureader_qa", [qa], [
        {"id": f"ureader_qa_{k}", "image": name,
         "conversations": _chat(f"<image>\nQuestion {k}?", f"Answer {k}.")}
        for k, (name, _) in enumerate(qa + [qa[1]])])  # two records share an image
    cam = [("cambrian_selection/coco/train2017/000000123456.jpg", img.jpeg()),
           ("cambrian_selection/ai2d/images/1043.png", img.png()),
           ("cambrian_selection/ocr_vqa/images/1234567890.jpg", img.jpeg())]
    records = [{"id": f"cambrian_{k}", "image": name,
                "conversations": _chat("<image>\nDescribe the image.", "It is a picture.")}
               for k, (name, _) in enumerate(cam)]
    records.insert(2, {"id": "cambrian_text_0", "conversations": _chat("What is 3 + 4?", "7")})
    _tar_json_part(repo, img, exp, OV_SI, "cambrian(filtered)", "cambrian(filtered)", [cam], records)
    repo.add("README.md", b"---\nlicense: apache-2.0\n---\n# LLaVA-OneVision Data\n")


def build_offline_hub(cache: Path, *, defects: bool = False, symlinks: bool = True) -> dict:
    """Write the miniature hub cache under ``cache``; return the expectations per json_path."""
    cache = Path(cache)
    img, exp = _Images(seed=0), _Expect()
    repos = {r: _Repo(cache, r, symlinks) for r in (
        "liuhaotian/LLaVA-Pretrain", "lmms-lab/LLaVA-OneVision-Mid-Data",
        "lmms-lab/LLaVA-ReCap-118K", "lmms-lab/LLaVA-ReCap-558K", "lmms-lab/LLaVA-ReCap-CC3M",
        "BAAI/DenseFusion-1M", "lmms-lab/LLaVA-NeXT-Data", "lmms-lab/LLaVA-OneVision-Data")}
    _pretrain(repos["liuhaotian/LLaVA-Pretrain"], img, exp)
    _mid_data(repos["lmms-lab/LLaVA-OneVision-Mid-Data"], img, exp, defects)
    _recap(repos, img, exp)
    _densefusion(repos["BAAI/DenseFusion-1M"], img, exp, defects)
    _next(repos["lmms-lab/LLaVA-NeXT-Data"], img, exp, defects)
    _ov_data(repos["lmms-lab/LLaVA-OneVision-Data"], img, exp)
    for repo in repos.values():
        repo.write()
    return exp.result()


# ----------------------------------------------------------------------------- self-check

_CHILD = r"""
import json, os, sys
from pathlib import Path
from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import LocalEntryNotFoundError
cache = Path(os.environ["HF_HUB_CACHE"])
n = 0
for folder in sorted(cache.glob("datasets--*")):
    repo_id = folder.name[len("datasets--"):].replace("--", "/", 1)
    snap = folder / "snapshots" / (folder / "refs" / "main").read_text()
    for f in sorted(p for p in snap.rglob("*") if not p.is_dir()):
        rel = f.relative_to(snap).as_posix()
        got = hf_hub_download(repo_id, rel, repo_type="dataset", revision="main")
        assert Path(got) == f and Path(got).read_bytes() == f.read_bytes(), (got, f)
        n += 1
    assert Path(snapshot_download(repo_id, repo_type="dataset", revision="main")) == snap
    try:
        hf_hub_download(repo_id, "no/such/file.json", repo_type="dataset", revision="main")
        raise SystemExit("a missing file was found")
    except LocalEntryNotFoundError:
        pass
print(f"hf_hub_download (HF_HUB_OFFLINE=1) returned all {n} files of "
      f"{len(list(cache.glob('datasets--*')))} repos; snapshot_download returned each snapshot")
"""


def _snapshot(cache: Path, repo_id: str) -> Path:
    root = Path(cache) / ("datasets--" + repo_id.replace("/", "--"))
    return root / "snapshots" / (root / "refs" / "main").read_text()


def _glob(snap: Path, pattern: str) -> list[Path]:
    files = sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if not p.is_dir())
    return [snap / f for f in files if fnmatch.fnmatchcase(f, pattern)]


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except (OSError, ValueError, SyntaxError):  # PIL's UnidentifiedImageError is an OSError
        return False


def reference_counts(cache: Path) -> dict:
    """What a straightforward reader (zipfile, streamed tarfile, pyarrow, PIL) gets from the
    miniature, following sources.yaml's parts: an independent check of the expectations."""
    import yaml

    out = {}
    for key, src in yaml.safe_load(SOURCES_YAML.read_text())["sources"].items():
        snap, exp = _snapshot(cache, src["repo"]), _Expect()
        for part in src["parts"]:
            if part["format"] == "parquet":
                for f in (p for pat in part["files"] for p in _glob(snap, pat)):
                    for value in pq.read_table(f, columns=["image"]).column(0).to_pylist():
                        exp.add(key, "text_only" if value is None else
                                "written" if _decodes(value["bytes"]) else "broken_image")
                continue
            images, damaged = {}, False
            for f in (p for pat in part["archives"] for p in _glob(snap, pat)):
                if f.suffix == ".zip":
                    with zipfile.ZipFile(f) as z:
                        for info in z.infolist():
                            try:
                                images[info.filename] = z.read(info)
                            except (zipfile.BadZipFile, zlib.error):
                                damaged = True
                else:
                    try:
                        with tarfile.open(f, "r|gz") as tar:
                            for m in tar:
                                if m.isfile():
                                    images[m.name] = tar.extractfile(m).read()
                    except (tarfile.TarError, EOFError, OSError):
                        damaged = True
            lines = (snap / part["records"]).read_text()
            if part["format"] == "caption_jsonl":
                records = [{"image": Path(json.loads(s)["image_path"]).name}
                           for s in lines.splitlines() if s.strip()]
            else:
                records = json.loads(lines)
            for r in records:
                exp.add(key, "text_only" if r.get("image") is None else
                        ("written" if _decodes(images[r["image"]]) else "broken_image")
                        if r["image"] in images else "bad_member" if damaged else "missing")
        out.update(exp.result())
    return out


def check_offline_hub(cache: Path, expected: dict | None = None) -> str:
    """huggingface_hub (in a subprocess: it reads HF_HUB_OFFLINE at import) finds every file
    offline, and ``expected`` equals what an independent reader counts."""
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(cache))
    env.pop("HF_DATASETS_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise AssertionError(proc.stdout + proc.stderr)
    report = proc.stdout.strip()
    if expected is not None:
        ref = reference_counts(cache)
        assert ref == expected, (ref, expected)
        report += f"\nexpectations == independent reader's counts for all {len(ref)} sources"
    return report


if __name__ == "__main__":
    import tempfile
    import time

    for defects in (False, True):
        for symlinks in (True, False):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                expected = build_offline_hub(Path(tmp), defects=defects, symlinks=symlinks)
                took = time.perf_counter() - start
                size = sum(p.stat().st_size for p in Path(tmp).rglob("*")
                           if p.is_file() and not p.is_symlink())
                print(f"defects={defects} symlinks={symlinks}: built in {took:.2f} s, "
                      f"{size / 1e6:.2f} MB")
                print(check_offline_hub(Path(tmp), expected))
                if symlinks:
                    print(json.dumps(expected, indent=1))
