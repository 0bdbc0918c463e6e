"""Independent demo work in child Pythons, so a 2-core machine runs two pieces at once.

The demo's models are tiny: one torch thread per process is fastest (a second intra-op thread
mostly waits), so the cores pay only as separate processes. A child is a fresh
``python -c`` that imports one function by name, reads its pickled arguments from a work
folder and pickles the result back: no caller's ``__main__`` is re-run (multiprocessing's
spawn would re-run an unguarded script), nothing is inherited by fork from a process whose
torch or tokenizer threads are running. Its prints and warnings go to the work folder's
log, whose tail an error quotes.
"""
from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Self

import torch

CHILD = ("import sys; from comp.demo.parallel import child_main; child_main(sys.argv[1])",)


def available_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_jobs(limit: int = 2) -> int:
    """How many processes to run side by side: the cores available, at most ``limit``."""
    return max(1, min(limit, available_cores()))


class ChildCall:
    """``function(*args, **kwargs)`` (``function`` as "module:name") in a child Python with
    ``threads`` torch threads; ``result()`` waits and returns what it returned. Leaving a
    ``with`` block before ``result()`` ends the child."""

    def __init__(self, work: Path, function: str, *args, threads: int | None = None, **kwargs):
        work.mkdir(parents=True, exist_ok=True)
        self.work, self.function = work, function
        (work / "result.pkl").unlink(missing_ok=True)
        (work / "job.pkl").write_bytes(pickle.dumps((function, args, kwargs, threads or torch.get_num_threads())))
        src = str(Path(__file__).resolve().parents[2])  # where this comp package is imported from
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
        with open(work / "log.txt", "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", *CHILD, str(work)], stdout=log,
                                         stderr=subprocess.STDOUT, env=env)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def done(self) -> bool:
        return self.proc.poll() is not None

    def result(self):
        if self.proc.wait() != 0:
            tail = "\n".join((self.work / "log.txt").read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"{self.function} in a child process exited with {self.proc.returncode}; "
                               f"the end of {self.work / 'log.txt'}:\n{tail}")
        return pickle.loads((self.work / "result.pkl").read_bytes())


def child_main(work: str) -> None:
    """The child side of ``ChildCall``."""
    import transformers

    transformers.logging.set_verbosity_error()
    function, args, kwargs, threads = pickle.loads((Path(work) / "job.pkl").read_bytes())
    torch.set_num_threads(threads)
    result = resolve(function)(*args, **kwargs)
    (Path(work) / "result.pkl").write_bytes(pickle.dumps(result))


def resolve(function: str):
    module, name = function.split(":")
    return getattr(importlib.import_module(module), name)


def run_parallel(function: str, calls: Sequence[tuple], jobs: int | None = None,
                 kwargs: dict | None = None) -> list:
    """``function(*args, **kwargs)`` for each ``args`` of ``calls``: ``run_calls`` of one function."""
    return run_calls([(function, args, kwargs or {}) for args in calls], jobs)


def run_calls(calls: Sequence[tuple[str, tuple, dict]], jobs: int | None = None) -> list:
    """``function(*args, **kwargs)`` for each (function, args, kwargs) of ``calls``, up to
    ``jobs`` at a time (None: ``default_jobs()``) in child Pythons (a ``ChildPool``), in the
    order given (put the longest first); with ``jobs`` 1, here in turn (no child). Results in
    the order of ``calls``; the first failure is raised after the running children are ended."""
    jobs = default_jobs() if jobs is None else jobs
    if jobs <= 1:
        return [resolve(function)(*args, **kwargs) for function, args, kwargs in calls]
    with ChildPool(jobs) as pool:
        futures = [pool.submit(function, args, kwargs) for function, args, kwargs in calls]
        return [f.result() for f in futures]


class ChildPool:
    """Calls submitted at any time, each in a child Python with one torch thread, at most
    ``jobs`` at once (changeable: lower while this process computes too), started in the
    order submitted. A scheduler thread starts and collects the children, so this process
    keeps working meanwhile. ``submit`` returns a ``concurrent.futures.Future`` carrying
    ``label`` and, once done, ``seconds`` (the call's wall time); ``on_done(future)`` runs
    in the scheduler thread as each finishes. Leaving the ``with`` block ends running
    children and cancels the calls not started."""

    def __init__(self, jobs: int | None = None, on_done: Callable[[Future], object] | None = None):
        self.jobs = default_jobs() if jobs is None else jobs
        self.on_done = on_done
        self._work = tempfile.TemporaryDirectory(prefix="comp-parallel-")
        self._pending: list[tuple[Future, str, tuple, dict]] = []
        self._running: dict[Future, tuple[ChildCall, float]] = {}
        self._count = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._schedule, name="comp-child-pool", daemon=True)
        self._thread.start()

    def submit(self, function: str, args: tuple = (), kwargs: dict | None = None, label: str | None = None) -> Future:
        """``function(*args, **kwargs)`` ("module:name") as soon as a job is free."""
        future: Future = Future()
        future.label = label or function
        kwargs = kwargs or {}
        with self._lock:
            self._pending.append((future, function, args, kwargs))
        return future

    def _schedule(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                while self._pending and len(self._running) < self.jobs:
                    future, function, args, kwargs = self._pending.pop(0)
                    if not future.set_running_or_notify_cancel():
                        continue
                    work = Path(self._work.name) / f"call-{self._count:04d}"
                    self._count += 1
                    try:
                        self._running[future] = (ChildCall(work, function, *args, threads=1, **kwargs),
                                                 time.perf_counter())
                    except Exception as err:  # e.g. arguments that do not pickle: the caller's result() raises
                        future.seconds = 0.0
                        future.set_exception(err)
                finished = [f for f, (child, _) in self._running.items() if child.done()]
                done = [(f, *self._running.pop(f)) for f in finished]
            for future, child, start in done:
                future.seconds = time.perf_counter() - start
                try:
                    future.set_result(child.result())
                except Exception as err:  # the caller's result() raises it
                    future.set_exception(err)
                if self.on_done is not None:
                    try:
                        self.on_done(future)
                    except Exception as err:  # a report that fails must not stop the scheduler
                        print(f"comp.demo.parallel: on_done failed for {future.label}: {err!r}", file=sys.stderr)
            if not done:
                time.sleep(0.05)

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        with self._lock:
            for future, *_ in self._pending:
                future.cancel()
            for future, (child, _) in self._running.items():
                child.close()
                future.set_exception(RuntimeError("the ChildPool was closed before this call finished"))
            self._pending, self._running = [], {}
        self._work.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
