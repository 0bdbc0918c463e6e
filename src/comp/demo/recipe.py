"""The SigLIP recipe's stages as ``comp demo`` trains them: the recipe file's smoke-mode flags
(comp.recipes, the data the bash script runs too) with the demo's assets, step count, seed
and stated settings put in by ``demo_argv``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from comp import recipes

RUN = "comp_1b_siglip"
LR_FLAGS = ("--learning_rate", "--mm_vision_tower_lr", "--mm_projector_lr")


@dataclass(frozen=True)
class RecipeStep:
    name: str
    data: str  # the stage's mixture file name (stage1.yaml, ...), which toyworld writes too
    flags: tuple[str, ...]  # the recipe's smoke-mode flags (no paths, step count or seed)
    starts_from: str | None  # the step whose output it continues (None: the originals)


def recipe_steps() -> list[RecipeStep]:
    """The recipe's steps, in order, with their smoke-mode flags."""
    return [RecipeStep(s.name, s.data, tuple(recipes.stage_flags(s, "smoke")), s.start)
            for s in recipes.load_recipe(RUN).stages]


def flag_pairs(argv: list[str], where: str = "") -> list[tuple[str, str]]:
    """``--flag value`` pairs in order; every flag of the recipe takes one value."""
    if len(argv) % 2 or not all(a.startswith("--") for a in argv[::2]):
        raise ValueError(f"{where}: expected --flag value pairs, got {argv}")
    return list(zip(argv[::2], argv[1::2]))


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
