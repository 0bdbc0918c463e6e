"""Writing outputs safely: atomically (a killed or failing command leaves the old file or
nothing, never half a file), never over the command's own input, and with a full disk
reported as one line instead of a library's traceback."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path

from comp.errors import UserError

logger = logging.getLogger(__name__)

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


def _temporary_sibling(path: Path, single_writer: bool = False) -> Path:
    return path.with_name(f".{path.name}.tmp" if single_writer else f".{path.name}.{os.getpid()}.tmp")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, directory: bool = False, single_writer: bool = False):
    """Yield a temporary path next to ``path`` (a file, or with ``directory`` a folder) to
    write to; on success it replaces ``path`` in one rename, on any failure it is removed and
    ``path`` keeps what it held. A full disk becomes the one-line UserError.

    ``single_writer``: the temporary name is fixed (``.<name>.tmp``) instead of per process,
    for outputs one process writes under a lock (comp data prepare): what a SIGKILL left is
    overwritten by the rerun instead of staying beside the outputs."""
    final = Path(path)
    tmp = _temporary_sibling(final, single_writer)
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


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live run from a reused pid); None when
    the process does not exist or /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    """``directory/<name>``, held by the one process (of ``command``) that writes the
    directory. A lock left by a process that no longer runs on this host (killed, crashed) is
    stale and taken over; one of a live process, or of another host, refuses the start."""

    def __init__(self, directory: str | os.PathLike, name: str, command: str, flag: str):
        self.path = Path(directory) / name
        self.command, self.flag = command, flag
        self.held = False

    def acquire(self) -> "DirectoryLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise UserError("could not take the directory's lock", self.path,
                        f"another {self.command} keeps starting in it; run one at a time")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), holder["host"]
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError):
            holder, pid, host = {}, None, None
        if pid is not None and host == socket.gethostname():
            if not _alive(pid) or holder.get("start") not in (None, _process_start(pid)):
                logger.warning("removing a stale lock of process %d, which no longer runs: %s", pid, self.path)
                self.path.unlink(missing_ok=True)
                return
            raise UserError(f"another {self.command} (process {pid}) is writing into this directory",
                            self.path.parent, f"wait for it to finish, or use another {self.flag}")
        raise UserError(f"the directory is locked by {f'process {pid} on {host}' if pid else 'an unreadable lock'}",
                        self.path, "if no run is using the directory, delete the lock file")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
