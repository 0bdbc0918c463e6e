"""The ``comp`` command: a thin dispatcher (parse -> build -> run lives in each command's module).

Each command is ``module:function`` taking the remaining argv; modules are imported only
when their command runs, so ``comp --help`` stays fast.

Known errors (``comp.errors.UserError``) end with one line ``comp <cmd>: <what> (<file>): <fix>``
and exit status 2; ``--debug`` (or COMP_DEBUG=1) shows their traceback too (for ``comp train``
only before the command: after it, ``--debug`` is transformers' own flag).
Other exceptions are bugs and keep their traceback.
"""
from __future__ import annotations

import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "tiny": ("comp.models.tiny:main", "write tiny random checkpoints in Hugging Face layout"),
    "train": ("comp.train.run:main", "train CoMP-MM (flags of the reference scripts)"),
    "export-vfm": ("comp.train.export:main", "write the trained encoder as a standalone CoMP-VFM"),
    "demo": ("comp.demo.run:main", "the SigLIP recipe on toy-pretrained models: before/after report"),
    "study": ("comp.demo.study:main", "the paper's ablations on the demo's toy setup, over seeds"),
    "data": ("comp.cli:data_main", "data tools: check | prior | show | toyworld | prepare"),
    "chat": ("comp.eval.chat:main", "chat with a CoMP-MM checkpoint about images"),
    "encode": ("comp.eval.encode:main", "native-resolution encoder features to safetensors"),
    "probe": ("comp.eval.probe:main", "frozen-encoder probes (linear, attentive, k-NN)"),
}


DATA_COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("comp.data.check", "scan a mixture or JSON file and summarise it (errors -> exit 1)"),
    "prior": ("comp.data.prior", "count assistant-answer tokens: the alignment loss's word prior"),
    "show": ("comp.data.show", "print records as the model sees them (rendered text, supervised spans, tokens)"),
    "toyworld": ("comp.data.toyworld", "write the synthetic toyworld dataset with Stage YAMLs"),
    "prepare": ("comp.data.prepare", "download the seed's published datasets and write the stage YAMLs' files"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: comp [--debug] <command> [args]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug" or os.environ.get("COMP_DEBUG") == "1"
    if argv and argv[0] == "--debug":
        argv = argv[1:]
    if argv and argv[0] != "train" and "--debug" in argv:  # train's --debug is transformers'
        debug, argv = True, [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"comp: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return run_command(f"comp {name}", func, rest, debug=debug)


def data_main(argv: list[str] | None = None) -> int:
    """``comp data {check,prior,show,toyworld,prepare}``: each module's ``main`` takes the remaining argv."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in DATA_COMMANDS:
        usage = "usage: comp data {check,prior,show,toyworld,prepare} [args]\n\n" + "\n".join(
            f"  {name:<9} {help_}" for name, (_, help_) in DATA_COMMANDS.items())
        known = not argv or argv[0] in ("-h", "--help")
        print(usage if known else f"comp data: unknown command {argv[0]!r}\n\n{usage}",
              file=sys.stdout if known else sys.stderr)
        return 0 if known else 2
    module = importlib.import_module(DATA_COMMANDS[argv[0]][0])
    return run_command(f"comp data {argv[0]}", module.main, argv[1:])


def run_command(prog: str, func, argv: list[str], *, debug: bool = False) -> int:
    """``func(argv)``; a UserError becomes ``prog: <line>`` on stderr and exit status 2, Ctrl-C
    ``prog: interrupted; <how to go on>`` (a KeyboardInterrupt's ``hint``) and exit status 130."""

    from comp.errors import UserError

    try:
        return int(func(argv) or 0)
    except KeyboardInterrupt as err:  # Ctrl-C: no traceback, and how to go on
        _close_progress_bars()
        print(f"\n{prog}: interrupted; {getattr(err, 'hint', None) or 'run it again to redo the work'}",
              file=sys.stderr)
        return 130
    except UserError as err:
        if debug:
            import traceback

            traceback.print_exc()
        _close_progress_bars()
        print(f"{prog}: {err.line()}", file=sys.stderr)
        return 2


def _close_progress_bars() -> None:
    """Close progress bars an interrupted loop left open, so that they do not redraw after
    (below) the error line when the interpreter exits."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
