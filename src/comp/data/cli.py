"""``comp data``: check | prior | show | toyworld (each module's ``main`` takes the remaining argv)."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "check": ("comp.data.check", "scan a mixture or JSON file and summarise it (errors -> exit 1)"),
    "prior": ("comp.data.prior", "count assistant-answer tokens: the alignment loss's word prior"),
    "show": ("comp.data.show", "print records as the model sees them (rendered text, supervised spans, tokens)"),
    "toyworld": ("comp.data.toyworld", "write the synthetic toyworld dataset with Stage YAMLs"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "usage: comp data {check,prior,show,toyworld} [args]\n\n" + "\n".join(
            f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items())
        known = not argv or argv[0] in ("-h", "--help")
        print(usage if known else f"comp data: unknown command {argv[0]!r}\n\n{usage}",
              file=sys.stdout if known else sys.stderr)
        return 0 if known else 2
    from comp.cli import run_command

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return run_command(f"comp data {argv[0]}", module.main, argv[1:])
