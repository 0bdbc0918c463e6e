"""Helpers of the tests that start `comp.train` processes (one process, torchrun, two "nodes")."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_env(**extra: str) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int = 2, *, nnodes: int = 1, node_rank: int = 0, port: int | None = None) -> list[str]:
    """A torchrun prefix for ``-m MODULE``: one node, or node ``node_rank`` of ``nnodes`` on
    the loopback."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(port or free_port())]
    if nnodes > 1:
        launcher += ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--master_addr", "127.0.0.1"]
    return [*launcher, "-m"]


def run(args: list[str], *, launcher=(sys.executable, "-m"), timeout=300, check=True,
        env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*launcher, *args], cwd=REPO, env=env or run_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args[:2])} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_script(source: str, path: Path, args, *, launcher=(sys.executable,), timeout=300,
               **env: str) -> subprocess.CompletedProcess:
    """``source`` written to ``path`` and run as ``LAUNCHER PATH ARGS``, unchecked: comp.train
    with a fault injected (KILLER and the scripts beside the tests that use them)."""
    path.write_text(source)
    return subprocess.run([*launcher, str(path), *map(str, args)], cwd=REPO, env=run_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def losses(output_dir: Path, key="loss") -> dict[int, float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: float(h[key]) for h in history if key in h}


# `python KILLER.py FLAGS` = comp.train that SIGKILLs itself at step $KILL_AT_STEP.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from comp.train import run

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["KILL_AT_STEP"]):
                os.kill(os.getpid(), signal.SIGKILL)

    original = run.CompTrainer.__init__
    def init(self, *a, **kw):
        original(self, *a, **kw)
        self.add_callback(KillAt())
    run.CompTrainer.__init__ = init
    sys.exit(run.main(sys.argv[1:]))
""")
