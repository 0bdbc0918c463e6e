"""The training recipes as package data, read by both of their runners.

Files beside this module: ``<recipe>.yaml`` holds a recipe's stages in order (name, mixture,
the stage it continues, its own flags at the reference's values) and the stage whose encoder
it exports; ``common.yaml`` the flags every stage shares (the reference's job template) and
the launch modes (``gpu``: the reference run; ``smoke``: tiny models on one CPU, its own flags
and the scaling of the stage flags); ``data/`` the Stage I/II/III mixtures and their Hub
sources (``scripts/data/*.yaml`` are links to them).

Runners: the bash scripts read a recipe through ``python -m comp.recipes plan`` (one process,
NUL-separated fields), ``comp demo`` through ``load_recipe`` and ``stage_flags``. What is not
the recipe's (data, output and model paths, the word prior, the DeepSpeed config, the step
count, the seed) is the runner's: a recipe that sets it is refused.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import yaml

from comp.errors import UserError

HOME = Path(__file__).resolve().parent
DATA = HOME / "data"  # the stage mixtures (stage1.yaml, ...) and sources.yaml
COMMON = HOME / "common.yaml"
MODES = ("gpu", "smoke")
RUNNER_FLAGS = frozenset({"data_path", "data_root", "image_folder", "output_dir", "model_name_or_path",
                          "custom_visual_model", "word_dist_path", "deepspeed", "max_steps", "seed"})


@dataclass(frozen=True)
class Stage:
    name: str
    data: str  # its mixture's file name in DATA (toyworld writes the same names)
    start: str | None  # the earlier stage whose output it continues; None: the originals
    flags: tuple[tuple[str, str], ...]  # (flag without "--", value), the reference's values


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    stages: tuple[Stage, ...]
    export: str | None  # the stage whose trained encoder is exported as the CoMP-VFM


def names() -> list[str]:
    return sorted(p.stem for p in HOME.glob("*.yaml") if p != COMMON)


def recipe_path(name: str | Path) -> Path:
    """The package's recipe ``name``, or a recipe file of one's own (a path ending in .yaml)."""
    path = Path(name) if str(name).endswith(".yaml") else HOME / f"{name}.yaml"
    if path.resolve() == COMMON or not path.is_file():
        raise UserError(f"no recipe {str(name)!r}", path,
                        f"choose one of {', '.join(names())}, or name a recipe file (.yaml)")
    return path


def _read(path: Path) -> dict:
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"not valid YAML: {str(err).splitlines()[0]}", path, "fix the file") from None
    if not isinstance(doc, dict):
        raise UserError("expected a mapping at the top", path, "see the comment at the file's top")
    return doc


def _keys(obj, allowed: set[str], path: Path, where: str) -> dict:
    """``obj`` as a mapping holding only ``allowed`` keys (all of them)."""
    if not isinstance(obj, dict) or set(obj) != allowed:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(f"{where}: expected the keys {sorted(allowed)}, got {got}", path,
                        "see the comment at the file's top")
    return obj


def flag_text(value, path: Path, where: str) -> str:
    """A YAML value as comp train's command line spells it (True/False, 32, 1e-3, cosine)."""
    if isinstance(value, (bool, int, str)):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    raise UserError(f"{where}: a flag's value must be a string, a number or True/False, got {value!r}",
                    path, "write one value per flag")


def _flags(obj, path: Path, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected flag: value lines, got {type(obj).__name__}", path,
                        "write the flags as a mapping (comp train's names, without --)")
    owned = sorted(RUNNER_FLAGS & set(obj))
    if owned:
        raise UserError(f"{where}: {', '.join(owned)} are set by the runner (paths, step count, seed)",
                        path, "remove them from the recipe")
    return tuple((str(k), flag_text(v, path, f"{where}.{k}")) for k, v in obj.items())


def load_recipe(name: str | Path) -> Recipe:
    """The recipe ``name`` (``comp_1b_siglip``, ...), checked: stages start from the originals
    or an earlier stage, their mixtures exist in DATA, no flag is also a shared one."""
    path = recipe_path(name)
    name = path.stem
    doc = _keys(_read(path), {"export", "stages"}, path, name)
    shared = {k for k, _ in template_flags()} | {k for mode in MODES for k, _ in mode_flags(mode)}
    stages: list[Stage] = []
    for i, entry in enumerate(doc["stages"] or []):
        where = f"stages[{i}]"
        entry = _keys(entry, {"name", "data", "start", "flags"}, path, where)
        stage = Stage(str(entry["name"]), str(entry["data"]), entry["start"],
                      _flags(entry["flags"], path, f"{where}.flags"))
        earlier = [s.name for s in stages]
        if stage.name in earlier or stage.start not in (None, *earlier):
            raise UserError(f"{where}: stage {stage.name!r} repeats a name or starts from {stage.start!r}, "
                            f"not an earlier stage ({earlier})", path, "start from null or an earlier stage")
        if not (DATA / stage.data).is_file():
            raise UserError(f"{where}: no mixture {stage.data!r} in {DATA}", path, "name a file of that folder")
        twice = sorted(shared & {k for k, _ in stage.flags})
        if twice:
            raise UserError(f"{where}: {', '.join(twice)} also set in {COMMON.name}", path,
                            "set each flag in one place")
        stages.append(stage)
    if not stages or doc["export"] not in (None, *(s.name for s in stages)):
        raise UserError(f"{name}: no stages, or export {doc['export']!r} is not one of them", path,
                        "list the stages; export null or a stage's name")
    return Recipe(name, path, tuple(stages), doc["export"])


@functools.lru_cache(maxsize=1)
def _common() -> dict:
    doc = _keys(_read(COMMON), {"template", "modes"}, COMMON, "common")
    _keys(doc["modes"], set(MODES), COMMON, "modes")
    return doc


def template_flags() -> tuple[tuple[str, str], ...]:
    return _flags(_common()["template"], COMMON, "template")


def mode_flags(mode: str) -> tuple[tuple[str, str], ...]:
    return _flags(_mode(mode).get("flags") or {}, COMMON, f"modes.{mode}.flags")


def _mode(mode: str) -> dict:
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}", COMMON, f"choose one of {', '.join(MODES)}")
    spec = _common()["modes"][mode] or {}
    if not (isinstance(spec, dict) and set(spec) <= {"flags", "scale"} and isinstance(spec.get("scale") or {}, dict)):
        raise UserError(f"modes.{mode}: expected flags and a scale mapping", COMMON,
                        "see the comment at the file's top")
    return spec


def scaled(flag: str, value: str, rule) -> str:
    """A stage flag's value in a mode whose ``scale`` gives ``rule`` for it."""
    if not isinstance(rule, dict):
        return flag_text(rule, COMMON, f"scale.{flag}")
    divide = rule.get("divide") if set(rule) == {"divide"} else None
    if not (isinstance(divide, int) and divide > 0 and value.isdigit()):
        raise UserError(f"scale.{flag}: {{divide: N}} needs N >= 1 and a whole-number flag, got {rule} "
                        f"for {value!r}", COMMON, "fix the rule or the recipe's value")
    return str(int(value) // divide)


def stage_flags(stage: Stage, mode: str) -> list[str]:
    """``--flag value`` of ``stage`` in ``mode``: the mode's flags, the template, the stage's
    own flags (scaled by the mode). Paths, step count and seed are the runner's to add."""
    scale = _mode(mode).get("scale") or {}
    pairs = [*mode_flags(mode), *template_flags(),
             *((k, scaled(k, v, scale[k]) if k in scale else v) for k, v in stage.flags)]
    return [x for k, v in pairs for x in (f"--{k}", v)]
