"""``python -m comp.recipes {plan,show} RECIPE [--mode gpu|smoke]``: a recipe for its runners.

``plan`` is what scripts/comp/common.sh reads (``run_recipe``): NUL-separated fields, per
stage ``stage NAME DATA START N FLAG_1 ... FLAG_N`` (START empty for the originals, N the
number of flag fields), then ``export STAGE`` when the recipe exports an encoder. ``show``
prints the same for a person, one stage per line.
"""
from __future__ import annotations

import shlex
import sys

from comp.cliargs import ArgumentParser
from comp.errors import UserError
from comp.recipes import MODES, load_recipe, names, stage_flags


def plan_fields(recipe: str, mode: str) -> list[str]:
    loaded = load_recipe(recipe)
    fields: list[str] = []
    for stage in loaded.stages:
        flags = stage_flags(stage, mode)
        fields += ["stage", stage.name, stage.data, stage.start or "", str(len(flags)), *flags]
    return fields + (["export", loaded.export] if loaded.export else [])


def show_lines(recipe: str, mode: str) -> list[str]:
    loaded = load_recipe(recipe)
    lines = [f"{s.name} (data {s.data}, from {s.start or 'the originals'}): {shlex.join(stage_flags(s, mode))}"
             for s in loaded.stages]
    return lines + ([f"export the encoder of {loaded.export}"] if loaded.export else [])


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m comp.recipes",
                       description="A training recipe's stages and flags (package data, comp.recipes).")
    p.add_argument("action", choices=("plan", "show"),
                   help="plan: NUL-separated fields for scripts/comp/common.sh; show: one line per stage")
    p.add_argument("recipe", help=f"one of {', '.join(names())}, or a recipe file (.yaml)")
    p.add_argument("--mode", choices=MODES, default="gpu", help="launch mode (default gpu)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.action == "plan":
            sys.stdout.write("".join(f + "\0" for f in plan_fields(args.recipe, args.mode)))
        else:
            print("\n".join(show_lines(args.recipe, args.mode)))
    except UserError as err:
        print(f"comp.recipes: {err.line()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
