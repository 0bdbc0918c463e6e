"""Known user errors and the one-line form the ``comp`` command prints for them.

A ``UserError`` is a mistake in an input (file, flag, directory) that the user can fix; the
dispatcher in ``comp.cli`` prints ``comp <cmd>: <what> (<file>): <fix>`` and exits 2. Any
other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import os


class UserError(ValueError):
    """``what`` went wrong with ``path`` (may be None); ``fix`` says what to do about it.
    A ValueError, so the commands' existing handlers of bad input print it the same way."""

    def __init__(self, what: str, path: str | os.PathLike | None = None, fix: str = ""):
        self.what, self.path, self.fix = what, None if path is None else os.fspath(path), fix
        super().__init__(self.line())

    def line(self) -> str:
        where = f" ({self.path})" if self.path is not None else ""
        return f"{self.what}{where}" + (f": {self.fix}" if self.fix else "")


def ensure_writable_dir(directory: str | os.PathLike, what: str = "output directory") -> None:
    """Create ``directory`` and write (then remove) a probe file in it: a read-only or full
    disk is found now, not at the first save hours later."""
    path = os.fspath(directory)
    probe = os.path.join(path, f".comp-write-probe-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise UserError(f"the {what} is not writable ({err.strerror or err})", path,
                        "choose a directory you can write to, with free space") from None
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass
