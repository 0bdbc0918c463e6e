"""The ``comp`` command: a thin dispatcher (parse -> build -> run lives in each command's module).

Each command is ``module:function`` taking the remaining argv; modules are imported only
when their command runs, so ``comp --help`` stays fast.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "tiny": ("comp.models.tiny:main", "write tiny random checkpoints in Hugging Face layout"),
    "train": ("comp.train.run:main", "train CoMP-MM (flags of the reference scripts)"),
    "export-vfm": ("comp.train.export:main", "write the trained encoder as a standalone CoMP-VFM"),
    "demo": ("comp.train.demo:main", "tiny end-to-end run of the SigLIP recipe with a report"),
    "data": ("comp.data.cli:main", "data tools: check | prior | show | toyworld"),
    "chat": ("comp.eval.chat:main", "chat with a CoMP-MM checkpoint about images"),
    "encode": ("comp.eval.encode:main", "native-resolution encoder features to safetensors"),
    "probe": ("comp.eval.probe:main", "frozen-encoder probes (linear, attentive, k-NN)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: comp <command> [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"comp: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
