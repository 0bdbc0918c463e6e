"""Where an image's bytes live: a plain file, or a member of a zip, tar or parquet shard.

A record's image path reads like a file path, and an archive on the way is entered as if it
were a directory (``LLaVA-Pretrain/images.zip/00453/004539375.jpg``,
``LLaVA-NeXT-Data/shards/llava_next-00001.tar/1234.jpg``,
``LLaVA-ReCap-118K/data/train-00000-of-00004.parquet/17``: row 17 of the ``image`` column).
The first path component ending in ``.zip``, ``.tar`` or ``.parquet`` that is a regular
file is the archive; the rest is the member. So one image root serves extracted trees and
shards alike, and everything downstream (dataset, lengths, ``comp data check/show/prior``)
reads every storage through ``locate_image`` + ``read_image_bytes``.

Random access without extracting anything:
- zip: the central directory is indexed once (name -> local header offset, sizes, CRC),
  each read is two ``pread`` calls, inflated and CRC-checked (published archives do have bad
  CRCs and bad offsets: those members raise ``MemberError``, the others stay readable);
- tar (uncompressed): member data offsets are indexed once; a read is one ``pread``;
- parquet: rows are located through the footer's row-group sizes; the row group's image
  column is read (pyarrow) and the last few of the process are kept, so sequential scans
  read each once. A random read costs the whole group (100 rows in Hub image datasets):
  benchmarks/bench_storage.py measures it, which is why ``comp data prepare`` re-packs
  parquet images into tar shards.

Indexes are cached on disk (``$COMP_CACHE/archive-index``, keyed by the archive's real path,
size and mtime) as sorted numpy arrays, so dataloader workers share them after ``fork`` and
a restart does not rebuild them. Readers are per process (file descriptors are not shared
across ``fork``).
"""
from __future__ import annotations

import hashlib
import os
import struct
import tarfile
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from comp.files import atomic_output

ARCHIVE_SUFFIXES = (".zip", ".tar", ".parquet")
INDEX_VERSION = 1
MAX_OPEN_FILES = 256  # descriptors a process keeps open; every index stays cached regardless
PARQUET_CACHED_GROUPS = 4  # per process, over all parquet files: a Hub row group is 5-40 MB
_ZIP_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # signature ... name length, extra length


class MemberError(ValueError):
    """An archive member that cannot be read. ``kind``: ``missing`` (no such member, or a row
    without an image) or ``bad_member`` (bad CRC, bad offset, truncated or damaged archive)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ImageLocation:
    """A plain file (``member`` None) or a member of the archive at ``path``."""
    path: Path
    member: str | None = None

    def __str__(self) -> str:
        return str(self.path) if self.member is None else f"{self.path}/{self.member}"


def split_archive_path(path: str | os.PathLike) -> ImageLocation:
    """Split a joined path at its first archive component that is a regular file."""
    text = os.fspath(path)
    parts = text.split(os.sep)
    for k, part in enumerate(parts[:-1]):
        if part.lower().endswith(ARCHIVE_SUFFIXES) and part:
            archive = os.sep.join(parts[:k + 1]) or os.sep
            if _is_file(archive):
                return ImageLocation(Path(archive), "/".join(parts[k + 1:]))
    return ImageLocation(Path(text))


_ARCHIVES: set[str] = set()


def _is_file(path: str) -> bool:
    """os.path.isfile, remembered when true: an archive is looked up once per process."""
    if path in _ARCHIVES:
        return True
    if os.path.isfile(path):
        _ARCHIVES.add(path)
        return True
    return False


# ----------------------------------------------------------------------------- indexes


def _index_path(archive: Path) -> Path:
    from comp.data.lengths import cache_root

    st = os.stat(archive)
    key = f"{INDEX_VERSION}:{os.path.realpath(archive)}:{st.st_size}:{st.st_mtime_ns}"
    return cache_root() / "archive-index" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"


def _cached_index(archive: Path, build) -> dict[str, np.ndarray]:
    """``build(archive)`` once per archive version, kept as an .npz (atomic write)."""
    path = _index_path(archive)
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError):
        pass
    index = build(archive)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as f:  # ranks may write it at once
        np.savez(f, **index)
    return index


def _sorted_names(names: list[str], **columns) -> dict[str, np.ndarray]:
    """Names as a sorted fixed-width bytes array (searchsorted lookups, fork-friendly) with
    the other columns in the same order."""
    encoded = np.array([n.encode("utf-8", "surrogateescape") for n in names] or [b""],
                       dtype=bytes)[:len(names)]
    order = np.argsort(encoded, kind="stable")
    out = {"names": encoded[order]}
    out.update({k: np.asarray(v, dtype=np.int64)[order] for k, v in columns.items()})
    return out


def _find(index: dict[str, np.ndarray], member: str) -> int | None:
    names = index["names"]
    key = member.encode("utf-8", "surrogateescape")
    k = int(np.searchsorted(names, key))
    return k if k < len(names) and names[k] == key else None


def build_zip_index(archive: Path) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(archive) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise MemberError(f"{archive}: the zip's central directory cannot be read ({err}); "
                          "re-download the archive", "bad_member") from None
    return _sorted_names([i.filename for i in infos],
                         header_offset=[i.header_offset for i in infos],
                         compress_size=[i.compress_size for i in infos],
                         file_size=[i.file_size for i in infos],
                         method=[i.compress_type for i in infos],
                         crc=[i.CRC for i in infos],
                         flags=[i.flag_bits for i in infos])


def build_tar_index(archive: Path) -> dict[str, np.ndarray]:
    """Data offsets of the regular members of an uncompressed tar. A truncated or damaged
    tar keeps the members before the damage; ``truncated`` says the rest is lost."""
    names, offsets, sizes, truncated = [], [], [], 0
    try:
        with tarfile.open(archive, "r:") as tar:
            for info in tar:
                if info.isfile():
                    names.append(info.name)
                    offsets.append(info.offset_data)
                    sizes.append(info.size)
    except (tarfile.TarError, OSError, EOFError):
        truncated = 1
    size = os.path.getsize(archive)
    if sizes and offsets[-1] + sizes[-1] > size:  # the last member runs past the end
        names, offsets, sizes, truncated = names[:-1], offsets[:-1], sizes[:-1], 1
    index = _sorted_names(names, offset=offsets, size=sizes)
    index["truncated"] = np.array(truncated, dtype=np.int64)
    return index


# ----------------------------------------------------------------------------- readers


_OPEN_FILES: OrderedDict[int, object] = OrderedDict()  # id -> handle with an open file, LRU


def _opened(handle) -> None:
    """Count ``handle`` as open (most recently used); close the least recently used ones
    past MAX_OPEN_FILES, so thousands of shards never exhaust the descriptors."""
    _OPEN_FILES[id(handle)] = handle
    _OPEN_FILES.move_to_end(id(handle))
    while len(_OPEN_FILES) > MAX_OPEN_FILES:
        _, old = _OPEN_FILES.popitem(last=False)
        old.close()


class _FileHandle:
    """One read-only descriptor per process (``pread`` needs no shared position), opened
    on use and closed when the process holds too many."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._pid: int | None = None

    def pread(self, n: int, offset: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():  # after fork: the child's own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        _opened(self)
        return os.pread(self._fd, n, offset)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


class _IndexedArchive:
    """An archive read by member through its cached index (``build_index``) and ``pread``."""

    build_index = None  # set by each archive kind

    def __init__(self, archive: Path):
        self.archive = archive
        self.index = _cached_index(archive, type(self).build_index)
        self.file = _FileHandle(archive)

    def members(self) -> list[str]:
        return [n.decode("utf-8", "surrogateescape") for n in self.index["names"]]


class ZipReader(_IndexedArchive):
    build_index = staticmethod(build_zip_index)

    def read(self, member: str) -> bytes:
        k = _find(self.index, member)
        where = f"{self.archive} member {member!r}"
        if k is None:
            raise MemberError(f"{where}: no such member in the zip", "missing")
        col = {name: int(values[k]) for name, values in self.index.items() if name != "names"}
        if col["flags"] & 0x1:
            raise MemberError(f"{where}: the member is encrypted", "bad_member")
        header = self.file.pread(_ZIP_LOCAL_HEADER.size, col["header_offset"])
        if len(header) < _ZIP_LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise MemberError(f"{where}: bad local header offset {col['header_offset']} (the "
                              "archive is damaged or truncated); re-download it", "bad_member")
        fields = _ZIP_LOCAL_HEADER.unpack(header)
        start = col["header_offset"] + _ZIP_LOCAL_HEADER.size + fields[9] + fields[10]
        raw = self.file.pread(col["compress_size"], start)
        if len(raw) < col["compress_size"]:
            raise MemberError(f"{where}: the archive ends inside the member (truncated download?)",
                              "bad_member")
        if col["method"] == zipfile.ZIP_STORED:
            data = raw
        elif col["method"] == zipfile.ZIP_DEFLATED:
            try:
                inflater = zlib.decompressobj(-15)
                data = inflater.decompress(raw) + inflater.flush()
            except zlib.error as err:
                raise MemberError(f"{where}: the deflate stream is damaged ({err})", "bad_member") from None
        else:
            raise MemberError(f"{where}: unsupported zip compression method {col['method']} "
                              "(stored and deflate are read)", "bad_member")
        if len(data) != col["file_size"] or zlib.crc32(data) != col["crc"]:
            raise MemberError(f"{where}: bad CRC (the member's bytes are damaged); re-download "
                              "the archive", "bad_member")
        return data


class TarReader(_IndexedArchive):
    build_index = staticmethod(build_tar_index)

    def read(self, member: str) -> bytes:
        k = _find(self.index, member)
        if k is None:
            lost = " (the tar is truncated or damaged: members after the damage are lost)" \
                if int(self.index["truncated"]) else ""
            raise MemberError(f"{self.archive} member {member!r}: no such member in the tar{lost}",
                              "bad_member" if lost else "missing")
        size, offset = int(self.index["size"][k]), int(self.index["offset"][k])
        data = self.file.pread(size, offset)
        if len(data) != size:
            raise MemberError(f"{self.archive} member {member!r}: the tar ends inside the member",
                              "bad_member")
        return data


class ParquetReader:
    """Rows of the ``image`` column (a Hugging Face ``Image`` struct of bytes and path, or
    plain binary); the member is the row number in the file."""

    column = "image"

    def __init__(self, archive: Path):
        self.archive = archive
        self._pf, self._pid = None, None
        meta = self._file().metadata
        self.group_ends = np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])

    def _file(self):
        """The open ParquetFile of this process (reopened after fork or when closed)."""
        import pyarrow.parquet as pq

        if self._pf is None or self._pid != os.getpid():
            try:
                self._pf, self._pid = pq.ParquetFile(self.archive), os.getpid()
            except Exception as err:  # pyarrow raises ArrowInvalid / OSError for damaged files
                raise MemberError(f"{self.archive}: not a readable parquet file ({err}); "
                                  "re-download it", "bad_member") from None
        _opened(self)
        return self._pf

    def close(self) -> None:
        self._pf = None

    def __len__(self) -> int:
        return int(self.group_ends[-1]) if len(self.group_ends) else 0

    def members(self) -> list[str]:
        return [str(r) for r in range(len(self))]

    def _group(self, g: int):
        key = (self.archive, g)
        if key in _PARQUET_GROUPS:
            _PARQUET_GROUPS.move_to_end(key)
            return _PARQUET_GROUPS[key]
        try:
            column = self._file().read_row_group(g, columns=[self.column]).column(0)
        except KeyError:
            raise MemberError(f"{self.archive}: no column {self.column!r}", "bad_member") from None
        except Exception as err:
            raise MemberError(f"{self.archive}: row group {g} cannot be read ({err}); re-download "
                              "the file", "bad_member") from None
        _PARQUET_GROUPS[key] = column
        while len(_PARQUET_GROUPS) > PARQUET_CACHED_GROUPS:
            _PARQUET_GROUPS.popitem(last=False)
        return column

    def read(self, member: str) -> bytes:
        where = f"{self.archive} row {member}"
        if not member.isdigit() or int(member) >= len(self):
            raise MemberError(f"{where}: no such row (the file has {len(self)})", "missing")
        row = int(member)
        g = int(np.searchsorted(self.group_ends, row, side="right"))
        value = self._group(g)[row - (int(self.group_ends[g - 1]) if g else 0)].as_py()
        if isinstance(value, dict):
            value = value.get("bytes")
        if not value:
            raise MemberError(f"{where}: the row has no image bytes", "missing")
        return value


_PARQUET_GROUPS: OrderedDict[tuple[Path, int], object] = OrderedDict()  # the last row groups read
_READERS = {".zip": ZipReader, ".tar": TarReader, ".parquet": ParquetReader}
_INDEXED: dict[str, object] = {}


def archive_reader(archive: str | os.PathLike):
    """The process's reader for ``archive``: its index is loaded once and kept (a few bytes
    a member); its file is open while used (see MAX_OPEN_FILES)."""
    key = os.fspath(archive)
    reader = _INDEXED.get(key)
    if reader is None:
        path = Path(key)
        reader = _INDEXED[key] = _READERS[path.suffix.lower()](path)
    return reader


def read_member(location: ImageLocation) -> bytes:
    """The bytes of an archive member; MemberError when it cannot be read."""
    return archive_reader(location.path).read(location.member)
