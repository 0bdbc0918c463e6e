"""``comp data prepare``: the seed's published datasets -> the JSON files the stage YAMLs name.

For every ``json_path`` of a stage YAML, ``scripts/data/sources.yaml`` says which Hub dataset
and files it comes from and how it is transformed (see that file). Prepare downloads exactly
those files (huggingface_hub: cache, token, offline rules, resumable), converts them and
writes ``DATA_ROOT/<json_path>`` with image paths relative to the image root
``DATA_ROOT/data`` (the recipes' ``--image_folder``), so ``comp data check`` and the recipes
run unchanged.

Layouts (``--layout``):
- ``shards`` (default): no per-image files. Zips are read in place (linked into the data
  root from the Hugging Face cache); gzip tars and parquet shards are re-packed once, in a
  streaming pass, into uncompressed tar shards (one per input file) that are read by member
  offset: measured, reading a row of a Hub parquet shard costs its whole 100-row group
  (benchmarks/bench_storage.py).
- ``files``: every image extracted to ``<prefix>/images/...``, the reference's tree.
Sources of captions with urls (DenseFusion-1M) can take their images from an img2dataset
run instead of the published zips (``--img2dataset DIR``: its webdataset tars, read in place
and matched by url); prepare downloads no image itself.

Every image is checked on the way (zip CRC, header, truncation) and its size stored in the
record (``width``/``height``), so the sampler's lengths need no image. Records are dropped,
counted and named (``DATA_ROOT/.comp-prepare/<source>.problems.tsv``) for: ``text_only``
(the seed removed them), ``broken_image``, ``bad_member`` (bad CRC, bad offset, truncated
archive), ``missing_image`` (the archives lack it) and the records' own faults (see
comp.data.records.SKIP_REASONS).

Resumable after a kill at any point: work is done in units (one input file, or one records
pass); each unit writes its outputs under temporary names, renames them, then writes its
marker; a unit without a marker is redone from scratch, a marker whose outputs changed size
is not trusted. Outputs are byte-identical whatever the interruptions (tar headers carry
no times or owners).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from comp.data.records import SkipSample, parse_record
from comp.data.sources import HubRepo, Part, SourceSpec, default_registry, load_registry
from comp.data.storage import MemberError, ZipReader, archive_reader
from comp.errors import UserError
from comp.files import DirectoryLock, atomic_output

LAYOUTS = ("shards", "files")
STATE_DIR = ".comp-prepare"
IMAGE_ROOT = "data"  # image paths in the written records are relative to DATA_ROOT/data
MAX_SHOWN_PROBLEMS = 5
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp",
               "TIFF": "tif"}


# ----------------------------------------------------------------------------- small pieces


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, single_writer=True) as tmp:
        tmp.write_bytes(data)


def safe_member(name: str) -> str | None:
    """A member name that stays inside its directory when extracted, or None."""
    clean = os.path.normpath(name.replace("\\", "/")).lstrip("/") if name else ""
    if not clean or clean.startswith("..") or clean == "." or any(c in clean for c in "\n\t\0"):
        return None
    return clean


def inspect_image(data: bytes, name: str) -> tuple[int, int, str]:
    """(width, height, extension) from the header; ValueError for what training would refuse."""
    from PIL import Image

    from comp.data.image import ImageLoadError, image_size, truncation_problem

    buffer = io.BytesIO(data)
    buffer.name = name
    try:
        with Image.open(buffer) as image:
            fmt = image.format
        problem = truncation_problem(buffer, fmt)
        height, width = image_size(buffer)
    except ImageLoadError as err:
        raise ValueError(str(err)) from None
    except Exception as err:  # Pillow's many error types for corrupt data
        raise ValueError(f"Pillow cannot read it as an image ({type(err).__name__})") from None
    if problem:
        raise ValueError(problem)
    return width, height, _EXTENSIONS.get(fmt or "", (fmt or "bin").lower())


def subset_rows(total: int, count: int | None, seed: int) -> np.ndarray | None:
    """Row positions a ``subset`` keeps (sorted), or None for all: numpy's seeded choice
    without replacement, so anyone can recompute it."""
    if count is None or count >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


@dataclass
class Tally:
    written: int = 0
    dropped: Counter = field(default_factory=Counter)
    problems: list = field(default_factory=list)  # (member or record, reason, detail)
    image_bytes: int = 0

    def drop(self, reason: str, where: str, detail: str = "") -> None:
        self.dropped[reason] += 1
        if reason != "text_only":
            self.problems.append((where, reason, detail))

    def to_dict(self) -> dict:
        return {"written": self.written, "dropped": dict(self.dropped), "image_bytes": self.image_bytes,
                "problems": self.problems}

    @classmethod
    def from_dict(cls, d: dict) -> "Tally":
        return cls(d["written"], Counter(d["dropped"]), [tuple(p) for p in d["problems"]], d["image_bytes"])

    def add(self, other: "Tally") -> None:
        self.written += other.written
        self.dropped.update(other.dropped)
        self.problems += other.problems
        self.image_bytes += other.image_bytes


# ----------------------------------------------------------------------------- image sinks


class TarShard:
    """An uncompressed tar written under a temporary name, renamed when complete; headers
    without times or owners, so the bytes depend on the members alone."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._output = contextlib.ExitStack()  # the atomic_output open until close()
        tmp = self._output.enter_context(atomic_output(path, single_writer=True))
        self.tar = tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT)
        self.names: set[str] = set()

    def add(self, name: str, data: bytes) -> None:
        if name in self.names:
            return
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        self.tar.addfile(info, io.BytesIO(data))
        self.names.add(name)

    def close(self) -> None:
        self.tar.close()
        self._output.close()


class ImageWriter:
    """Where a unit's images go: one tar shard (``shards``) or files (``files``); ``put``
    returns the record's image path relative to the image root."""

    def __init__(self, layout: str, image_root: Path, prefix: str, shard_name: str):
        self.layout, self.image_root, self.prefix, self.shard_name = layout, image_root, prefix, shard_name
        self.shard: TarShard | None = None
        self.outputs: list[Path] = []
        self._folders: set[Path] = set()

    def put(self, member: str, data: bytes) -> str:
        if self.layout == "files":
            relative = f"{self.prefix}/images/{member}"
            path = self.image_root / relative
            # Written in place, no temporary + fsync per image (millions of them): a file a
            # kill cut short is smaller, and the unit, redone without its marker, rewrites it.
            if not (path.is_file() and path.stat().st_size == len(data)):
                if path.parent not in self._folders:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self._folders.add(path.parent)
                path.write_bytes(data)
            return relative
        relative = f"{self.prefix}/shards/{self.shard_name}.tar"
        if self.shard is None:
            self.shard = TarShard(self.image_root / relative)
            self.outputs.append(self.shard.path)
        self.shard.add(member, data)
        return f"{relative}/{member}"

    def close(self) -> None:
        if self.shard is not None:
            self.shard.close()


# ----------------------------------------------------------------------------- units


@dataclass
class Context:
    spec: SourceSpec
    hub: HubRepo
    data_root: Path
    layout: str
    state: Path  # DATA_ROOT/.comp-prepare/<slug>
    img2dataset: Path | None = None  # caption sources' images from an img2dataset run instead

    @property
    def image_root(self) -> Path:
        return self.data_root / IMAGE_ROOT


@dataclass
class Unit:
    """One resumable piece of a source: ``run(unit)`` writes ``records_path`` and its images,
    puts the images' shard paths in ``outputs`` and returns the unit's Tally."""
    key: str
    run: Callable[["Unit"], Tally]
    records_path: Path | None = None  # JSONL of records, or a members list (repack units)
    emits_records: bool = True
    outputs: list = field(default_factory=list)


def record_line(obj: dict, ref: str, width: int, height: int) -> str:
    keep = {k: obj[k] for k in ("id", "conversations", "data_source") if k in obj}
    keep.update({"image": ref, "width": width, "height": height})
    return json.dumps(keep, ensure_ascii=False)


def has_image(obj: dict) -> bool:
    image = obj.get("image")
    if isinstance(image, dict):
        return bool(image.get("bytes"))
    return bool(image)


def checked(obj: dict, position: int, where: str, tally: Tally) -> bool:
    """The record's own faults, as training would see them (placeholders, shape)."""
    try:
        parse_record({**obj, "image": "x"} if has_image(obj) else obj, position)
        return True
    except SkipSample as e:
        tally.drop(e.reason, where, e.detail)
        return False


def write_jsonl(path: Path, lines: Iterator[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, single_writer=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")


class _Progress:
    """Records and image bytes of one unit, on stderr when it is a terminal."""

    def __init__(self, total: int | None, desc: str, tally: Tally):
        from tqdm.auto import tqdm

        self.tally = tally
        self.bar = tqdm(total=total, desc=desc, unit="rec", file=sys.stderr, dynamic_ncols=True,
                        leave=False, disable=None)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        if self.bar.n % 200 == 0:
            self.bar.set_postfix_str(f"{self.tally.image_bytes / 1e6:.0f} MB images", refresh=False)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


# -- parquet: one unit per file -------------------------------------------------------------


def parquet_units(ctx: Context, part: Part, k: int) -> list[Unit]:
    import pyarrow.parquet as pq

    files = [f.name for f in ctx.hub.match(part.files)]
    local = [ctx.hub.fetch(name) for name in files]
    counts = [pq.ParquetFile(p).metadata.num_rows for p in local]
    keep = subset_rows(sum(counts), ctx.spec.subset_count, ctx.spec.subset_seed)
    starts = np.cumsum([0] + counts)
    units = []
    for j, (name, path) in enumerate(zip(files, local)):
        rows = None if keep is None else keep[(keep >= starts[j]) & (keep < starts[j + 1])] - starts[j]
        shard = re.sub(r"\.parquet$", "", name)
        units.append(Unit(f"part{k}-parquet-{name}", partial(convert_parquet, ctx, path, name, rows, shard),
                          ctx.state / f"part{k}-{j:05d}.jsonl"))
    return units


def convert_parquet(ctx: Context, path: Path, name: str, rows: np.ndarray | None, shard: str,
                    unit: Unit) -> Tally:
    import pyarrow.parquet as pq

    tally = Tally()
    writer = ImageWriter(ctx.layout, ctx.image_root, ctx.spec.image_prefix, shard)
    wanted = None if rows is None else set(rows.tolist())
    pf = pq.ParquetFile(path)

    def every_row() -> Iterator[dict]:
        for g in range(pf.metadata.num_row_groups):  # one row group in memory at a time
            yield from pf.read_row_group(g).to_pylist()

    def lines() -> Iterator[str]:
        with _Progress(pf.metadata.num_rows if wanted is None else len(wanted), name, tally) as bar:
            for position, obj in enumerate(every_row()):
                if wanted is not None and position not in wanted:
                    continue
                bar.update(1)
                line = parquet_record(obj, position, name, writer, tally)
                if line is not None:
                    yield line

    write_jsonl(unit.records_path, lines())
    writer.close()
    unit.outputs = writer.outputs
    return tally


def parquet_record(obj: dict, row: int, name: str, writer: ImageWriter, tally: Tally) -> str | None:
    where = f"{name} row {row} (id {obj.get('id')})"
    if not has_image(obj):
        tally.drop("text_only", where)
        return None
    if not checked(obj, row, where, tally):
        return None
    data = obj["image"]["bytes"] if isinstance(obj["image"], dict) else obj["image"]
    try:
        width, height, ext = inspect_image(data, where)
    except ValueError as err:
        tally.drop("broken_image", where, str(err))
        return None
    tally.written += 1
    tally.image_bytes += len(data)
    return record_line(obj, writer.put(f"{row:06d}.{ext}", data), width, height)


# -- gzip tars: one unit per archive (re-pack or extract), then the records pass -------------


def repack_units(ctx: Context, part: Part, k: int) -> tuple[list[Unit], list[Path]]:
    """A unit per ``.tar.gz``: its regular members checked and written (tar shard or files),
    with a members list: ``member\\twidth\\theight\\tref``, ``member\\t-\\treason`` for a
    member that is no readable image, and ``\\t#truncated\\tarchive`` when the stream broke."""
    units, lists = [], []
    for j, remote in enumerate(ctx.hub.match([a for a in part.archives if a.endswith((".tar.gz", ".tgz"))])):
        listing = ctx.state / f"part{k}-members-{j:03d}.tsv"
        lists.append(listing)
        units.append(Unit(f"part{k}-repack-{remote.name}", partial(repack, ctx, remote.name, listing),
                          listing, emits_records=False))
    return units, lists


def repack(ctx: Context, name: str, listing: Path, unit: Unit) -> Tally:
    tally = Tally()
    shard = re.sub(r"\.(tar\.gz|tgz)$", "", Path(name).name)
    writer = ImageWriter(ctx.layout, ctx.image_root, ctx.spec.image_prefix, shard)
    path = ctx.hub.fetch(name)

    def lines() -> Iterator[str]:
        with _Progress(None, Path(name).name, tally) as bar:
            try:
                with tarfile.open(path, "r|gz") as tar:
                    for info in tar:
                        if not info.isfile():
                            continue
                        member = safe_member(info.name)
                        if member is None:
                            tally.drop("bad_member", f"{name} member {info.name!r}", "unsafe name")
                            continue
                        data = tar.extractfile(info).read()
                        if len(data) != info.size:
                            raise EOFError("the archive ends inside a member")
                        bar.update(1)
                        try:
                            width, height, _ = inspect_image(data, f"{name} member {member}")
                        except ValueError as err:
                            yield f"{member}\t-\t{' '.join(str(err).split())}"
                            continue
                        ref = writer.put(member, data)
                        tally.image_bytes += len(data)
                        yield f"{member}\t{width}\t{height}\t{ref}"
            except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
                tally.problems.append((name, "bad_member", f"truncated or damaged archive ({err}); "
                                       "the members after the damage are lost; re-download it"))
                yield f"\t#truncated\t{name}"

    write_jsonl(listing, lines())
    writer.close()
    unit.outputs = writer.outputs
    return tally


# -- LLaVA JSON records + archives -----------------------------------------------------------


class ArchiveImages:
    """Find a record's image among a part's archives: repacked gzip tars (their members
    lists) and zips read in place (linked into the data root under the image prefix)."""

    def __init__(self, ctx: Context, part: Part, lists: list[Path]):
        self.entries: dict[str, tuple] = {}  # member -> ("ok", ref, w, h) | ("bad", reason)
        self.truncated: list[str] = []  # damaged archives (the repack units reported the tars)
        self.damaged_zips: list[tuple[str, str, str]] = []
        for listing in lists:
            for line in listing.read_text(encoding="utf-8").splitlines():
                member, *rest = line.split("\t")
                if rest[0] == "#truncated":
                    self.truncated.append(rest[1])
                elif rest[0] == "-":
                    self.entries[member] = ("bad", rest[1])
                else:
                    self.entries[member] = ("ok", rest[2], int(rest[0]), int(rest[1]))
        self.zips: dict[str, tuple[str, ZipReader]] = {}  # member -> (archive ref, reader)
        self.basenames: dict[str, str] = {}
        zips = [a for a in part.archives if a.endswith(".zip")]
        for remote in ctx.hub.match(zips) if zips else []:
            ref, path = f"{ctx.spec.image_prefix}/{remote.name}", ctx.hub.fetch(remote.name)
            if ctx.layout == "shards":  # read in place, through a link in the data root
                path = ctx.image_root / ref
                link_in_place(ctx.hub.fetch(remote.name), path)
            try:
                reader = archive_reader(path)
            except MemberError as err:
                self.truncated.append(remote.name)
                self.damaged_zips.append((remote.name, "bad_member", str(err)))
                continue
            for member in reader.members():
                self.zips[member] = (ref, reader)
                self.basenames.setdefault(member.rsplit("/", 1)[-1], member)

    def candidates(self, image: str) -> list[str]:
        tail = image.split("/", 1)[1] if "/" in image else image
        return [image, f"images/{image}", tail, self.basenames.get(image.rsplit("/", 1)[-1], "")]

    def resolve(self, obj: dict, writer: ImageWriter, tally: Tally, where: str) -> tuple | None:
        """(ref, width, height) of the record's image, or None after counting why not."""
        image = obj["image"]
        for member in self.candidates(image):
            if member in self.entries:
                entry = self.entries[member]
                if entry[0] == "bad":
                    tally.drop("broken_image", f"{where} image {member}", entry[1])
                    return None
                return entry[1:]
            if member in self.zips:
                return read_in_place(*self.zips[member], member, writer, tally)
        if self.truncated:
            tally.drop("bad_member", f"{where} image {image}",
                       f"not in the archives; damaged or truncated: {', '.join(self.truncated)}")
        else:
            tally.drop("missing_image", f"{where} image {image}", "no archive of the source holds it")
        return None


def read_in_place(ref: str, reader, member: str, writer: ImageWriter, tally: Tally) -> tuple | None:
    """(ref, width, height) of an archive member read where it lies (extracted with
    ``--layout files``), or None after counting why not."""
    try:
        data = reader.read(member)
        width, height, _ = inspect_image(data, f"{ref}/{member}")
    except MemberError as err:
        tally.drop("bad_member", f"{ref} member {member}", str(err))
        return None
    except ValueError as err:
        tally.drop("broken_image", f"{ref} member {member}", str(err))
        return None
    tally.image_bytes += len(data)
    if writer.layout == "files":
        return writer.put(member, data), width, height
    return f"{ref}/{member}", width, height


class WebDatasetImages:
    """The images of an img2dataset run over a source's URLs (its webdataset output:
    ``NNNNN.tar`` holding ``<key>.jpg`` beside ``<key>.json`` with the ``url``), found by each
    record's ``url``; the tars are read in place (linked into the data root)."""

    IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")

    def __init__(self, ctx: Context, directory: Path):
        self.by_url: dict[str, tuple] = {}
        self.damaged_zips: list[tuple[str, str, str]] = []
        tars = sorted(directory.glob("*.tar"))
        if not tars:
            raise UserError("no webdataset shards (*.tar) in the img2dataset output", directory,
                            "run img2dataset with --output_format webdataset into that folder")
        for tar in tars:
            ref = f"{ctx.spec.image_prefix}/img2dataset/{tar.name}"
            path = tar
            if ctx.layout == "shards":
                path = ctx.image_root / ref
                link_in_place(tar, path)
            reader = archive_reader(path)
            members = reader.members()
            images = {m.rsplit(".", 1)[0]: m for m in members if m.lower().endswith(self.IMAGE_SUFFIXES)}
            for member in members:
                key = member[:-len(".json")]
                if member.endswith(".json") and key in images:
                    try:
                        url = json.loads(reader.read(member)).get("url")
                    except (ValueError, MemberError, AttributeError) as err:
                        self.damaged_zips.append((f"{tar} member {member}", "bad_member", str(err)))
                        continue
                    if url:
                        self.by_url[url] = (ref, reader, images[key])

    def resolve(self, obj: dict, writer: ImageWriter, tally: Tally, where: str) -> tuple | None:
        found = self.by_url.get(obj.get("url") or "")
        if found is None:
            tally.drop("missing_image", where, f"img2dataset did not download {obj.get('url')!r}")
            return None
        return read_in_place(*found, writer, tally)


def link_in_place(target: Path, link: Path) -> None:
    """``link`` -> the cached file (a symlink to its real path), replaced atomically (a
    symlink is swapped by rename, not written: atomic_output's fsync would open its target)."""
    real = os.path.realpath(target)
    if link.is_symlink() and os.readlink(link) == real:
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.lnk")
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(real, tmp)
    os.replace(tmp, link)


def read_records(path: Path) -> Iterator[tuple[int, dict | None, str]]:
    """(position, record or None when unparsable, error) of a LLaVA JSON/JSONL file, streamed."""
    from comp.data.index import JSONSyntaxError, RecordIndex

    try:
        index = RecordIndex(path)
    except JSONSyntaxError as err:
        raise UserError(f"the published records file is not valid JSON: {err}", path,
                        "re-download it (delete it from the Hugging Face cache)") from None
    for i in range(len(index)):
        try:
            yield i, index.load(i), ""
        except JSONSyntaxError as err:
            yield i, None, str(err)


def records_unit(ctx: Context, part: Part, k: int, lists: list[Path]) -> Unit:
    return Unit(f"part{k}-records-{part.records}", partial(convert_records, ctx, part, lists),
                ctx.state / f"part{k}-records.jsonl")


def convert_records(ctx: Context, part: Part, lists: list[Path], unit: Unit) -> Tally:
    tally = Tally()
    if part.format == "caption_jsonl" and ctx.img2dataset is not None:
        images = WebDatasetImages(ctx, ctx.img2dataset)
    else:
        images = ArchiveImages(ctx, part, lists)
    tally.problems += images.damaged_zips
    path = ctx.hub.fetch(part.records)
    writer = ImageWriter(ctx.layout, ctx.image_root, ctx.spec.image_prefix, "unused")
    to_record = caption_record(part.prompt) if part.format == "caption_jsonl" else (lambda obj: obj)

    def lines() -> Iterator[str]:
        with _Progress(None, Path(part.records).name, tally) as bar:
            for i, obj, error in read_records(path):
                bar.update(1)
                where = f"{part.records} record {i}"
                if obj is None or not isinstance(obj, dict):
                    tally.drop("malformed_record", where, error or "not a JSON object")
                    continue
                obj = to_record(obj)
                where += f" (id {obj.get('id')})"
                image = obj.get("image")
                if not image:
                    tally.drop("text_only", where)
                    continue
                if not isinstance(image, str):
                    tally.drop("malformed_record", where, "one image per record is prepared; got "
                               f"{type(image).__name__}")
                    continue
                if not checked(obj, i, where, tally):
                    continue
                found = images.resolve(obj, writer, tally, where)
                if found is not None:
                    tally.written += 1
                    yield record_line(obj, *found)

    write_jsonl(unit.records_path, lines())
    writer.close()
    return tally


def caption_record(prompt: str):
    """DenseFusion's ``{image_id, image_path, caption, url}`` as a one-turn LLaVA record."""
    def convert(obj: dict) -> dict:
        return {"id": str(obj.get("image_id", "")), "image": obj.get("image_path"), "url": obj.get("url"),
                "conversations": [{"from": "human", "value": f"<image>\n{prompt}"},
                                  {"from": "gpt", "value": obj.get("caption")}]}
    return convert


# ----------------------------------------------------------------------------- a source


def plan_units(ctx: Context) -> list[Unit]:
    units: list[Unit] = []
    for k, part in enumerate(ctx.spec.parts):
        if part.format == "parquet":
            units += parquet_units(ctx, part, k)
        else:
            repacks, lists = repack_units(ctx, part, k)
            units += repacks + [records_unit(ctx, part, k, lists)]
    return units


def _marker(unit: Unit, state: Path) -> Path:
    return state / (re.sub(r"[^\w.()-]+", "_", unit.key) + ".done")


def _sizes(paths) -> dict[str, int]:
    return {str(p): os.path.getsize(p) for p in paths}


def _trusted(marker: Path) -> dict | None:
    """The marker's content when every output it lists is there with its size."""
    try:
        done = json.loads(marker.read_text())
        if all(os.path.getsize(p) == n for p, n in done["outputs"].items()):
            return done
    except (OSError, ValueError, KeyError):
        pass
    return None


def run_unit(unit: Unit, state: Path) -> Tally:
    marker = _marker(unit, state)
    done = _trusted(marker)
    if done is not None:
        return Tally.from_dict(done["tally"])
    tally = unit.run(unit)
    outputs = list(unit.outputs) + ([unit.records_path] if unit.records_path else [])
    atomic_write_bytes(marker, json.dumps({"tally": tally.to_dict(), "outputs": _sizes(outputs)}).encode())
    return tally


def write_json_array(path: Path, parts: list[Path]) -> None:
    """The units' JSONL records, in order, as one JSON array (streamed, atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    first = True
    with atomic_output(path, single_writer=True) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("[")
        for part in parts:
            with open(part, encoding="utf-8") as f:
                for line in f:
                    out.write(("\n" if first else ",\n") + line.rstrip("\n"))
                    first = False
        out.write("\n]\n")


def pinned_repo(spec: SourceSpec, state: Path) -> HubRepo:
    """The source's repository at the commit its first run resolved (``state/commit``), so
    a resumed run never mixes files of two revisions of a moving branch."""
    pin = state / "commit"
    hub = HubRepo(spec.repo, pin.read_text().strip() if pin.is_file() else spec.revision)
    hub.listing()
    if not pin.is_file():
        atomic_write_bytes(pin, hub.commit.encode())
    return hub


def uses_urls(spec: SourceSpec) -> bool:
    return any(part.format == "caption_jsonl" for part in spec.parts)


def prepare_source(spec: SourceSpec, data_root: Path, layout: str, img2dataset: Path | None = None) -> dict:
    """Build one json_path (or find it built); returns its closing-table row."""
    start = time.monotonic()
    img2dataset = img2dataset if uses_urls(spec) else None
    variant = layout + (".img2dataset" if img2dataset else "")
    state = data_root / STATE_DIR / f"{spec.slug}.{variant}"
    final_marker = data_root / STATE_DIR / f"{spec.slug}.{variant}.done"
    done = _trusted(final_marker)
    if done is not None:
        return {**done["row"], "status": "done already"}
    state.mkdir(parents=True, exist_ok=True)
    hub = pinned_repo(spec, state)
    ctx = Context(spec, hub, data_root, layout, state, img2dataset)
    units = plan_units(ctx)
    tally = Tally()
    for unit in units:
        tally.add(run_unit(unit, state))
    out = data_root / spec.json_path
    write_json_array(out, [u.records_path for u in units if u.emits_records])
    problems = data_root / STATE_DIR / f"{spec.slug}.problems.tsv"
    write_jsonl(problems, ("\t".join(map(str, p)) for p in tally.problems))
    shard_paths = [p for u in units for p in _trusted(_marker(u, state))["outputs"]
                   if not p.endswith((".jsonl", ".tsv"))]
    row = {"json_path": spec.json_path, "repo": f"{spec.repo}@{hub.commit}",
           "expected": spec.expected_records, "written": tally.written, "dropped": dict(tally.dropped),
           "problems": len(tally.problems), "problems_file": str(problems),
           "json_bytes": out.stat().st_size, "image_bytes": tally.image_bytes,
           "shard_bytes": sum(os.path.getsize(p) for p in shard_paths),
           "seconds": round(time.monotonic() - start, 1), "status": "written"}
    atomic_write_bytes(final_marker, json.dumps({"row": row, "outputs": _sizes([out])}).encode())
    return row


# ----------------------------------------------------------------------------- the command


def needed_sources(stage_yaml: Path, registry: dict[str, SourceSpec], only: str | None) -> list[SourceSpec]:
    """The registry entries for the stage YAML's json_path values (``--only`` filters)."""
    import yaml

    try:
        doc = yaml.safe_load(stage_yaml.read_text())
        names = [str(d["json_path"]) for d in doc["datasets"]]
    except FileNotFoundError:
        raise UserError("stage YAML not found", stage_yaml, "pass scripts/data/stage{1,2,3}.yaml") from None
    except (yaml.YAMLError, TypeError, KeyError) as err:
        raise UserError(f"not a stage YAML ({err})", stage_yaml,
                        "it needs datasets: [{json_path, sampling_strategy}]") from None
    missing = [n for n in names if n not in registry]
    if missing:
        raise UserError(f"no registry entry for {missing}", stage_yaml,
                        "add them to scripts/data/sources.yaml (or pass --sources)")
    picked = [registry[n] for n in names if only is None or only in n]
    if not picked:
        raise UserError(f"--only {only!r} matches none of {names}", stage_yaml, "pick a substring of one")
    return picked


def dry_run(specs: list[SourceSpec], layout: str, img2dataset: Path | None = None) -> list[dict]:
    """What would be fetched: files and sizes from the Hub's metadata (or the cache)."""
    rows = []
    for spec in specs:
        hub = HubRepo(spec.repo, spec.revision)
        files = []
        for part in spec.parts:
            archives = [] if part.format == "caption_jsonl" and img2dataset else list(part.archives)
            patterns = list(part.files) + archives + ([part.records] if part.records else [])
            files += hub.match(patterns)
        total = sum(f.size or 0 for f in files)
        to_fetch = sum(f.size or 0 for f in files if not f.cached)
        in_place = sum(f.size or 0 for f in files if f.name.endswith(".zip")) if layout == "shards" else 0
        rows.append({"json_path": spec.json_path, "repo": f"{spec.repo}@{hub.commit}", "files": len(files),
                     "download_bytes": total, "to_fetch_bytes": to_fetch,
                     "disk_bytes": total + (total - in_place),  # the cache + shards/files beside it
                     "names": [f.name for f in files]})
    return rows


def _gb(n: int | None) -> str:
    """Bytes in the largest unit that keeps them above 1."""
    if n is None:
        return "?"
    unit = next((u for u, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if n >= scale), "B")
    return f"{n / {'GB': 1e9, 'MB': 1e6, 'kB': 1e3, 'B': 1}[unit]:.1f} {unit}"


def format_table(rows: list[dict]) -> str:
    lines = [f"{'json_path':<58} {'expected':>9} {'written':>9}  dropped (by reason)       "
             f"{'images':>10} {'on disk':>10} {'time':>7}"]
    for r in rows:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(r["dropped"].items())) or "-"
        expected = "-" if r["expected"] is None else str(r["expected"])
        flag = "" if r["expected"] is None or r["expected"] == r["written"] else "  (!= expected)"
        lines.append(f"{r['json_path']:<58} {expected:>9} {r['written']:>9}  {dropped:<25} "
                     f"{_gb(r['image_bytes']):>10} {_gb(r['json_bytes'] + r['shard_bytes']):>10} "
                     f"{r['seconds']:>6}s  {r['status']}{flag}")
    return "\n".join(lines)


def show_problems(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if not r["problems"]:
            continue
        lines.append(f"{r['json_path']}: {r['problems']} records or members skipped "
                     f"(all in {r['problems_file']}), e.g.:")
        with open(r["problems_file"], encoding="utf-8") as f:
            for _, line in zip(range(MAX_SHOWN_PROBLEMS), f):
                lines.append("  " + line.rstrip("\n").replace("\t", " | "))
    return "\n".join(lines)


def build_parser():
    from comp.cliargs import ArgumentParser

    p = ArgumentParser(prog="comp data prepare", description=__doc__.splitlines()[0])
    p.add_argument("stage", help="a stage YAML (scripts/data/stage{1,2,3}.yaml)")
    p.add_argument("--data_root", required=True, help="where data/<json_path> and the images go "
                   "(the recipes' COMP_DATA_ROOT; image root DATA_ROOT/data)")
    p.add_argument("--only", help="only the json_path values containing this substring")
    p.add_argument("--layout", choices=LAYOUTS, default="shards",
                   help="shards: images stay in zips / tar shards; files: extracted, one file per image")
    p.add_argument("--sources", help="the source registry (default: sources.yaml beside the stage YAML)")
    p.add_argument("--img2dataset", help="images of the caption sources (DenseFusion) from an img2dataset "
                   "run over their urls (its --output_format webdataset folder) instead of the "
                   "published zips")
    p.add_switch("--dry_run", default=False, help="print the files, sizes and disk needed; fetch nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    stage = Path(args.stage)
    registry = load_registry(args.sources or default_registry(stage))
    specs = needed_sources(stage, registry, args.only)
    img2dataset = Path(args.img2dataset) if args.img2dataset else None
    if img2dataset is not None and not any(uses_urls(spec) for spec in specs):
        raise UserError("--img2dataset is for sources of captions with urls (DenseFusion-1M); none "
                        "is selected", stage, "drop the flag, or pick that source with --only")
    if args.dry_run:
        for row in dry_run(specs, args.layout, img2dataset):
            print(f"{row['json_path']}: {row['repo']}, {row['files']} files, {_gb(row['download_bytes'])} "
                  f"({_gb(row['to_fetch_bytes'])} not cached), disk needed ~{_gb(row['disk_bytes'])}")
            print("".join(f"    {name}\n" for name in row["names"]), end="")
        return 0
    data_root = Path(args.data_root)
    from comp.errors import ensure_writable_dir

    ensure_writable_dir(data_root / STATE_DIR, "data root")
    with DirectoryLock(data_root / STATE_DIR, "prepare.lock", "comp data prepare", "--data_root"):
        rows = [prepare_source(spec, data_root, args.layout, img2dataset) for spec in specs]
    print(format_table(rows))
    problems = show_problems(rows)
    if problems:
        print(problems)
    return 0
