"""Writing outputs safely: atomically (a killed or failing command leaves the old file or
nothing, never half a file), never over the command's own input, and with a full disk
reported as one line instead of a library's traceback."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path

from comp.errors import UserError

# How libraries word a full disk (measured on a 64 KiB tmpfs): OSError ENOSPC/EDQUOT;
# safetensors "I/O error: No space left on device (os error 28)"; torch.save's zip writer
# "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534" (a short write).
_FULL_DISK_WORDS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122",
                    "unexpected pos ", "PytorchStreamWriter failed writing file")


def file_sha256(path: str | os.PathLike) -> str:
    """Streaming sha256 of a file (1 MiB blocks: a large checkpoint costs seconds, not memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) means the disk or quota is full."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(word in str(err) for word in _FULL_DISK_WORDS):
            return True
        err = err.__cause__ or err.__context__
    return False


@contextlib.contextmanager
def disk_full_is_user_error(path: str | os.PathLike, fix="free some space and run it again"):
    """Turn a full-disk failure inside the block into the one-line UserError naming ``path``;
    ``fix`` may be a function, called only then."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise UserError("the disk is full (no space left while writing)", path,
                            fix() if callable(fix) else fix) from err
        raise


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, directory: bool = False):
    """Yield a temporary path next to ``path`` (a file, or with ``directory`` a folder) to
    write to; on success it replaces ``path`` in one rename, on any failure it is removed and
    ``path`` keeps what it held. A full disk becomes the one-line UserError."""
    final = Path(path)
    tmp = _temporary_sibling(final)
    _remove(tmp)
    if directory:
        tmp.mkdir(parents=True)
    try:
        with disk_full_is_user_error(final):
            yield tmp
            if not directory:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            if directory and final.is_dir():  # a directory cannot be renamed over a full one
                old = final.with_name(f".{final.name}.{os.getpid()}.old")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def refuse_output_over_input(out: str | os.PathLike, inputs, *, flag: str = "--out",
                             nested: bool = True) -> None:
    """Raise when the output path is one of the inputs or (``nested``) lies inside one or
    contains one: writing it would destroy what the command reads."""
    target = Path(out).expanduser().resolve()
    for source in inputs:
        if source is None or not os.path.exists(source):  # a Hub id, or a missing input
            continue
        src = Path(source).expanduser().resolve()
        if target == src or nested and (src in target.parents or target in src.parents):
            raise UserError(f"{flag} would write over this command's own input {src}", out,
                            f"choose an {flag} outside the input")
