"""The SigLIP recipe's steps, read from ``scripts/comp/comp_1b_siglip.sh`` itself: one recipe
definition for the shell run and the demo (not a copy kept equal by a test).

``recipe_steps`` runs the script in its smoke mode with a launcher that prints the argv of
each ``comp.train`` call instead of training (``COMP_LAUNCHER='printf %s\\0'``, ``PYTHON=true``,
a pre-made ``smoke_assets/ready`` so nothing is built) and parses each
``== comp_1b_siglip/<step>`` block. ``demo_argv`` then puts the demo's assets where the
script's smoke assets were, and the demo's step count and seed in.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from comp.errors import UserError

RUN = "comp_1b_siglip"
SCRIPT = Path("scripts") / "comp" / f"{RUN}.sh"
# Flags whose value the demo supplies itself (paths, step count, seed).
PATH_FLAGS = ("--data_path", "--output_dir", "--model_name_or_path", "--custom_visual_model",
              "--word_dist_path")
LR_FLAGS = ("--learning_rate", "--mm_vision_tower_lr", "--mm_projector_lr")


@dataclass(frozen=True)
class RecipeStep:
    name: str
    data: str  # the toyworld stage YAML's file name (stage1.yaml, ...)
    flags: tuple[str, ...]  # the script's flags minus PATH_FLAGS, --max_steps and --seed
    starts_from: str | None  # the step whose output it continues (None: the originals)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[3]


def script_path(root: Path | None = None) -> Path:
    """The recipe script; an error says what to do when the package was installed without it."""
    path = (root or repo_root()) / SCRIPT
    if not path.is_file():
        raise UserError("the recipe script is missing", path,
                        "the demo reads the recipe's stage flags from the repository's scripts/; "
                        "run it from a source checkout (git clone + pip install -e .), not a wheel")
    if shutil.which("bash") is None:
        raise UserError("bash is not installed", path, "install bash: the recipe scripts are bash")
    return path


def launched_argvs(script: Path) -> dict[str, list[str]]:
    """Step name -> the argv the script launches for it (after the launcher), smoke mode."""
    with tempfile.TemporaryDirectory(prefix="comp-recipe-") as work:
        (Path(work) / "smoke_assets").mkdir()
        (Path(work) / "smoke_assets" / "ready").touch()  # skip the asset build
        env = dict(os.environ, COMP_SMOKE="1", COMP_WORKDIR=work, PYTHON="true",
                   COMP_LAUNCHER="printf %s\\0")
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise UserError(f"the recipe script failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}",
                        script, "fix the script; `COMP_SMOKE=1 bash` it to see the error")
    parts = re.split(rf"== {RUN}/(\w+)\n", proc.stdout)[1:]
    return {name: block.split("\0")[:-1] for name, block in zip(parts[::2], parts[1::2])}


def flag_pairs(argv: list[str], where: str = "") -> list[tuple[str, str]]:
    """``--flag value`` pairs in order; every flag of the recipe takes one value."""
    if len(argv) % 2 or not all(a.startswith("--") for a in argv[::2]):
        raise ValueError(f"{where}: expected --flag value pairs, got {argv}")
    return list(zip(argv[::2], argv[1::2]))


def recipe_steps(root: Path | None = None) -> list[RecipeStep]:
    """The script's steps, in order, with their own flags."""
    script = script_path(root)
    steps, names = [], []
    for name, argv in launched_argvs(script).items():
        if not argv or argv[0] != "comp.train":
            raise UserError(f"step {name} does not launch comp.train: {argv[:1]}", script,
                            "each run_step must launch comp.train")
        pairs = flag_pairs(argv[1:], f"{script} step {name}")
        values = dict(pairs)
        previous = Path(values["--model_name_or_path"]).name
        steps.append(RecipeStep(
            name, Path(values["--data_path"]).name,
            tuple(x for k, v in pairs if k not in (*PATH_FLAGS, "--max_steps", "--seed") for x in (k, v)),
            previous if previous in names else None))
        names.append(name)
    if not steps:
        raise UserError(f"no `== {RUN}/<step>` blocks in the script's output", script,
                        "the demo parses run_step's banner lines; keep them")
    return steps


def set_flag(flags: tuple[str, ...], flag: str, value: str | None) -> tuple[str, ...]:
    """``flags`` with ``flag``'s value replaced (appended when absent; removed when None)."""
    pairs = [(k, v) for k, v in flag_pairs(list(flags)) if k != flag]
    if value is not None:
        pairs.append((flag, value))
    return tuple(x for pair in pairs for x in pair)


def demo_argv(step: RecipeStep, *, llm: Path, vision: Path, toyworld: Path, word_dist: str | Path,
              run_dir: Path, max_steps: int, seed: int, overrides: dict[str, str | None] | None = None,
              ) -> list[str]:
    """``comp train`` arguments of ``step`` on the demo's assets (``overrides``: flag -> value
    for the demo's own settings and the study's ablations; None removes the flag)."""
    if step.starts_from is None:
        model = ["--model_name_or_path", str(llm), "--custom_visual_model", str(vision)]
    else:
        model = ["--model_name_or_path", str(run_dir / step.starts_from)]
    flags = step.flags
    for flag, value in (overrides or {}).items():
        flags = set_flag(flags, flag, value)
    return ["--data_path", str(toyworld / step.data), "--output_dir", str(run_dir / step.name),
            "--word_dist_path", str(word_dist), *model, "--max_steps", str(max_steps), "--seed", str(seed),
            *flags]


def flag_value(flags: tuple[str, ...] | list[str], flag: str) -> str | None:
    return dict(flag_pairs(list(flags))).get(flag)
