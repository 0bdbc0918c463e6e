"""Independent demo work in child Pythons, so a 2-core machine runs two pieces at once.

The demo's models are tiny: one torch thread per process is fastest (a second intra-op thread
mostly waits), so the cores pay only as separate processes. A child is a fresh
``python -c`` that imports one function by name, reads its pickled arguments from a work
folder and pickles the result back: no caller's ``__main__`` is re-run (multiprocessing's
spawn would re-run an unguarded script), nothing is inherited by fork from a process whose
torch or tokenizer threads are running. Its prints and warnings go to the work folder's
log, whose tail an error quotes.

``ChildCall`` is one call in its own child; a ``ChildPool``'s children (``Worker``) run one
call after another, because importing torch and transformers costs a child about 6 s on this
kind of machine, as much as many of the demo's calls themselves. Before each call a worker
resets torch's default generator to the seed it started with, so a call's draws do not depend
on the calls it ran before (the demo's calls seed their own generators besides).
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
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Self

import torch

CHILD = ("import sys; from comp.demo.parallel import child_main; child_main(sys.argv[1])",)
WORKER = ("import sys; from comp.demo.parallel import worker_main; worker_main(sys.argv[1])",)


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
        with open(work / "log.txt", "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", *CHILD, str(work)], stdout=log,
                                         stderr=subprocess.STDOUT, env=child_env())

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
            raise RuntimeError(f"{self.function} in a child process exited with {self.proc.returncode}; "
                               f"the end of {self.work / 'log.txt'}:\n{log_tail(self.work)}")
        return pickle.loads((self.work / "result.pkl").read_bytes())


def child_env() -> dict[str, str]:
    """The environment of a child Python: this comp package first on its path."""
    src = str(Path(__file__).resolve().parents[2])  # where this comp package is imported from
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))


def log_tail(work: Path, lines: int = 15) -> str:
    return "\n".join((work / "log.txt").read_text(errors="replace").splitlines()[-lines:])


class Worker:
    """A child Python that runs calls one after another (``start`` one, poll ``done``, then
    ``result``), each as ``ChildCall`` runs its one: a function by name, pickled arguments
    and result in the work folder. The call's number goes down the child's stdin."""

    def __init__(self, work: Path):
        work.mkdir(parents=True, exist_ok=True)
        self.work, self.calls, self.current = work, 0, None
        with open(work / "log.txt", "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", *WORKER, str(work)], stdin=subprocess.PIPE,
                                         stdout=log, stderr=subprocess.STDOUT, env=child_env())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def start(self, function: str, args: tuple, kwargs: dict, threads: int = 1) -> None:
        """Hand the worker one call (raises here when the arguments do not pickle)."""
        job = pickle.dumps((function, args, kwargs, threads))
        index = self.calls
        (self.work / f"job-{index}.pkl").write_bytes(job)
        self.calls, self.current = index + 1, (index, function)
        self.proc.stdin.write(f"{index}\n".encode())
        self.proc.stdin.flush()

    def _outcome(self, kind: str) -> Path:
        return self.work / f"{kind}-{self.current[0]}"

    def done(self) -> bool:
        return self._outcome("result").exists() or self._outcome("error").exists() or not self.alive()

    def result(self):
        """The current call's result; its error, or the child's end, raised as a RuntimeError."""
        function = self.current[1]
        result, error = self._outcome("result"), self._outcome("error")
        self.current = None
        if result.exists():
            return pickle.loads(result.read_bytes())
        if error.exists():
            raise RuntimeError(f"{function} in a child process raised:\n{error.read_text()}")
        raise RuntimeError(f"{function} in a child process: the child exited with {self.proc.wait()}; "
                           f"the end of {self.work / 'log.txt'}:\n{log_tail(self.work)}")

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        try:
            self.proc.stdin.close()
        except OSError:  # nothing was left to flush to a child that is gone
            pass


def worker_main(work: str) -> None:
    """The child side of ``Worker``: the calls named on stdin, in turn, until stdin closes."""
    import transformers

    transformers.logging.set_verbosity_error()
    fresh_seed = torch.initial_seed()
    for line in sys.stdin:
        index = int(line)
        function, args, kwargs, threads = pickle.loads((Path(work) / f"job-{index}.pkl").read_bytes())
        torch.set_num_threads(threads)
        torch.manual_seed(fresh_seed)
        try:
            name, payload = f"result-{index}", pickle.dumps(resolve(function)(*args, **kwargs))
        except Exception:
            name, payload = f"error-{index}", traceback.format_exc().encode()
        sys.stdout.flush()
        sys.stderr.flush()
        partial = Path(work) / f".{name}"
        partial.write_bytes(payload)
        os.replace(partial, Path(work) / name)  # whole or absent to the parent's poll


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
    """Calls submitted at any time, each in a child Python (a ``Worker``, reused from call to
    call) with one torch thread, at most ``jobs`` at once (changeable: lower while this
    process computes too), started in the order submitted. A scheduler thread starts and
    collects the children, so this process keeps working meanwhile. ``submit`` returns a
    ``concurrent.futures.Future`` carrying ``label`` and, once done, ``seconds`` (the call's
    wall time); ``on_done(future)`` runs in the scheduler thread as each finishes. Leaving
    the ``with`` block ends running children and cancels the calls not started."""

    def __init__(self, jobs: int | None = None, on_done: Callable[[Future], object] | None = None):
        self.jobs = default_jobs() if jobs is None else jobs
        self.on_done = on_done
        self._work = tempfile.TemporaryDirectory(prefix="comp-parallel-")
        self._pending: list[tuple[Future, str, tuple, dict]] = []
        self._running: dict[Future, tuple[Worker, float]] = {}
        self._idle: list[Worker] = []
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
                    worker = self._idle.pop() if self._idle else self._new_worker()
                    try:
                        worker.start(function, args, kwargs)
                        self._running[future] = (worker, time.perf_counter())
                    except Exception as err:  # e.g. arguments that do not pickle: the caller's result() raises
                        self._idle.append(worker)
                        future.seconds = 0.0
                        future.set_exception(err)
                finished = [f for f, (worker, _) in self._running.items() if worker.done()]
                done = [(f, *self._running.pop(f)) for f in finished]
            for future, worker, start in done:
                future.seconds = time.perf_counter() - start
                try:
                    future.set_result(worker.result())
                except Exception as err:  # the caller's result() raises it
                    future.set_exception(err)
                with self._lock:
                    if worker.alive():
                        self._idle.append(worker)
                    else:
                        worker.close()
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
            for future, (worker, _) in self._running.items():
                worker.close()
                future.set_exception(RuntimeError("the ChildPool was closed before this call finished"))
            for worker in self._idle:
                worker.close()
            self._pending, self._running, self._idle = [], {}, []
        self._work.cleanup()

    def warm(self, workers: int) -> None:
        """Start workers until there are ``workers``, so the calls that come later find them
        imported (a worker takes seconds to import torch)."""
        with self._lock:
            while len(self._idle) + len(self._running) < workers:
                self._idle.append(self._new_worker())

    def _new_worker(self) -> Worker:
        work = Path(self._work.name) / f"worker-{self._count:02d}"
        self._count += 1
        return Worker(work)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
