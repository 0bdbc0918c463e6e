"""A byte-offset index over a LLaVA JSON array or JSONL file: records are parsed on demand.

The index holds two int64 numpy arrays (offset, length) — 16 bytes a record — instead of
millions of Python dicts, so dataloader workers forked from the main process share it
without copy-on-write growth, and each ``load(i)`` reads one record with ``os.pread``.

- JSONL: record boundaries are the newlines, found with numpy over 4 MB chunks;
  blank lines are not records.
- JSON array: one streaming pass of ``json.JSONDecoder.raw_decode`` over chunks decoded as
  latin-1 (one character per byte, so character positions are byte offsets; non-ASCII bytes
  only occur inside strings, where the scanner accepts them). Syntax errors are reported
  with the file's line and column.
"""
from __future__ import annotations

import json
import os
import re
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np



CHUNK_BYTES = 4 << 20
PROGRESS_BYTES = 64 << 20  # files at least this large show a progress bar while indexed
_WS = re.compile(r"[ \t\r\n]*")
_WS_BYTES = frozenset(b" \t\r\n")
_BOM = b"\xef\xbb\xbf"
_TOO_DEEP = "nested deeper than Python's parser allows (a LLaVA record is a few levels deep)"



class JSONSyntaxError(ValueError):
    """A JSON syntax error located by file, line and column (1-based, characters)."""

    def __init__(self, path: Path, line: int, column: int, msg: str):
        self.path, self.line, self.column = path, line, column
        super().__init__(f"{path}:{line}:{column}: JSON syntax error: {msg}")


def line_column(path: Path, byte_pos: int) -> tuple[int, int]:
    """1-based line and character column of a byte position (reads the file up to it)."""
    line, last_nl, done = 1, -1, 0
    with open(path, "rb") as f:
        while done < byte_pos:
            chunk = f.read(min(CHUNK_BYTES, byte_pos - done))
            if not chunk:
                break
            n = chunk.count(b"\n")
            if n:
                line += n
                last_nl = done + chunk.rindex(b"\n")
            done += len(chunk)
        f.seek(last_nl + 1)
        prefix = f.read(byte_pos - last_nl - 1)
    return line, len(prefix.decode("utf-8", errors="replace")) + 1


def _chunks(path: Path, bar=None) -> Iterator[tuple[int, np.ndarray]]:
    """(file offset, bytes as uint8) of consecutive chunks, reading into one reused buffer."""
    buf = bytearray(CHUNK_BYTES)
    with open(path, "rb", buffering=0) as f:
        base = 0
        while n := f.readinto(buf):
            yield base, np.frombuffer(buf, np.uint8, count=n)
            base += n
            if bar is not None:
                bar.update(n)


def _progress(path: Path):
    """A byte-count bar for large files on a terminal (indexing 1 GB takes seconds)."""
    from tqdm.auto import tqdm

    size = path.stat().st_size
    return tqdm(total=size, desc=f"index {path.name}", unit="B", unit_scale=True, leave=False,
                disable=None if size >= PROGRESS_BYTES else True)


def _scan_jsonl(path: Path, bar=None) -> tuple[np.ndarray, np.ndarray]:
    size = path.stat().st_size
    nl = np.concatenate([np.zeros(0, np.int64)] + [np.flatnonzero(chunk == 10) + base
                                                   for base, chunk in _chunks(path, bar)])
    start_R = np.concatenate([[0], nl + 1])
    end_R = np.concatenate([nl, [size]])
    keep_R = end_R > start_R
    # A line opening with whitespace may be blank ("\r", spaces): look at just those lines.
    first_R = np.zeros(len(start_R), np.uint8)
    for base, chunk in _chunks(path):
        lo, hi = np.searchsorted(start_R, [base, base + len(chunk)])
        first_R[lo:hi] = chunk[start_R[lo:hi] - base]
    with open(path, "rb") as f:
        for r in np.flatnonzero(keep_R & np.isin(first_R, list(_WS_BYTES))):
            if not os.pread(f.fileno(), int(end_R[r] - start_R[r]), int(start_R[r])).strip():
                keep_R[r] = False
    return start_R[keep_R], (end_R - start_R)[keep_R]


def _scan_json_array(path: Path, bar=None) -> tuple[np.ndarray, np.ndarray]:
    decoder = json.JSONDecoder()
    offsets, lengths = array("q"), array("q")

    def fail(byte_pos: int, msg: str):
        line, col = line_column(path, byte_pos)
        raise JSONSyntaxError(path, line, col, msg)

    with open(path, "rb") as f:
        def read_chunk() -> tuple[str, bool]:
            """(the next chunk, whether it is the file's last)."""
            chunk = f.read(CHUNK_BYTES).decode("latin-1")
            if bar is not None:
                bar.update(len(chunk))
            return chunk, len(chunk) < CHUNK_BYTES

        buf_start = 0  # file offset of buf[0]
        buf, eof = read_chunk()
        pos = len(_BOM) if buf.startswith(_BOM.decode("latin-1")) else 0
        pos = _WS.match(buf, pos).end()
        if not buf.startswith("[", pos):
            fail(buf_start + pos, "a LLaVA JSON file must be an array of records ('[' expected)")
        pos += 1
        expect_record = None  # None: record or ']' ; True: record ; False: ',' or ']'
        while True:
            pos = _WS.match(buf, pos).end()
            if pos >= len(buf) - 64 and not eof:  # keep a margin so a token is never split
                more, eof = read_chunk()
                buf, buf_start, pos = buf[pos:] + more, buf_start + pos, 0
                continue
            if pos >= len(buf):
                fail(buf_start + pos, "unexpected end of file (the array is not closed with ']')")
            char = buf[pos]
            if expect_record is not True and char == "]":
                break
            if expect_record is False:
                if char != ",":
                    fail(buf_start + pos, "expected ',' or ']' after a record")
                pos, expect_record = pos + 1, True
                continue
            try:
                _, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                truncated = e.msg.startswith("Unterminated string") or e.pos >= len(buf) - 16
                if truncated and not eof:
                    more, eof = read_chunk()
                    buf, buf_start, pos = buf[pos:] + more, buf_start + pos, 0
                    continue
                fail(buf_start + e.pos, e.msg)
            offsets.append(buf_start + pos)
            lengths.append(end - pos)
            pos, expect_record = end, False
        pos = _WS.match(buf, pos + 1).end()
        if pos < len(buf) or f.read(1):
            fail(buf_start + pos, "extra data after the closing ']'")
    return np.frombuffer(offsets, np.int64).copy(), np.frombuffer(lengths, np.int64).copy()


def _is_jsonl(path: Path) -> bool:
    if path.suffix.lower() == ".jsonl":
        return True
    if path.suffix.lower() == ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(_BOM).lstrip()
    return not head.startswith(b"[")


class RecordIndex:
    """Offsets and lengths of the records of one JSON/JSONL file; ``load(i)`` parses record i."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: data file not found")
        self.is_jsonl = _is_jsonl(self.path)
        scan = _scan_jsonl if self.is_jsonl else _scan_json_array
        with _progress(self.path) as bar:
            try:
                self.offsets, self.lengths = scan(self.path, bar)
            except RecursionError:  # e.g. "[" x 100000: json recurses once per level
                raise JSONSyntaxError(self.path, 1, 1, _TOO_DEEP) from None
        self._fd: int | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}

    def read_bytes(self, i: int) -> bytes:
        if self._pid != os.getpid():  # one descriptor per process; pread needs no shared seek
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, int(self.lengths[i]), int(self.offsets[i]))

    def load(self, i: int):
        """Parse record i; a syntax error (JSONL lines) names the file, line and column."""
        raw = self.read_bytes(i)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            byte_pos = int(self.offsets[i]) + len(e.doc[:e.pos].encode("utf-8"))
            line, col = line_column(self.path, byte_pos)
            raise JSONSyntaxError(self.path, line, col, e.msg) from None
        except UnicodeDecodeError as e:
            line, col = line_column(self.path, int(self.offsets[i]) + e.start)
            raise JSONSyntaxError(self.path, line, col, "invalid UTF-8") from None
        except RecursionError:
            raise JSONSyntaxError(self.path, *line_column(self.path, int(self.offsets[i])), _TOO_DEEP) from None
