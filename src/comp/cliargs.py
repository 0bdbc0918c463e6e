"""One grammar for every ``comp`` command's flags.

- Outputs are ``--out PATH`` (``comp train`` keeps the reference's ``--output_dir``).
- Flags are written with underscores (the reference's spelling); the dashed spelling
  (``--max-num-vistoken``) works too, as it does in ``comp train`` (HfArgumentParser).
- Switches take a value, as in ``comp train``: ``--use_rope`` alone means on, ``--use_rope
  0|1|true|false|yes|no`` (any case) sets it.
- Eval commands take ``--threads`` (default: ``OMP_NUM_THREADS`` when set, else torch's).
"""
from __future__ import annotations

import argparse
import math
import os


TRUE, FALSE = ("1", "true", "yes", "y", "on"), ("0", "false", "no", "n", "off")


def to_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected one of 1/0, true/false, yes/no; got {value!r}")


def positive_int(value: str) -> int:
    """An argparse type: a whole number >= 1 (a count of threads, neighbours, tokens, ...)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def float_in(low: float, high: float = math.inf, *, low_open: bool = False):
    """An argparse type: a finite number in [low, high] ((low, high] with ``low_open``); NaN
    and inf are refused (NaN passes every comparison-based range check by failing it)."""
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
        below = number <= low if low_open else number < low
        if not math.isfinite(number) or below or number > high:
            where = f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else \
                f"{'>' if low_open else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {'in ' if math.isfinite(high) else ''}"
                                             f"{where}, got {value!r}")
        return number
    return parse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions keep their line breaks (each line wrapped to the terminal); each flag's
    help ends with its default."""

    def _fill_text(self, text, width, indent):
        import textwrap

        return "\n".join(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent)
                         for line in text.splitlines())

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or action.required:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the grammar above (dashed spellings, switches, --threads, --out)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_switch(self, name: str, *, default: bool | None, help: str):  # noqa: A002
        return self.add_argument(name, type=to_bool, nargs="?", const=True, default=default,
                                 metavar="{1,0}", help=help)

    def add_out(self, help: str, *, required: bool = True, **kwargs):  # noqa: A002
        return self.add_argument("--out", required=required, help=help, **kwargs)

    def add_threads(self):
        return self.add_argument("--threads", type=positive_int, default=None,

                                 help="CPU threads for torch (default: OMP_NUM_THREADS when set, "
                                      "else torch's choice); on small CPUs 1 is often fastest")

    def parse_known_args(self, args=None, namespace=None):
        import sys

        argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args([self._canonical(a) for a in argv], namespace)

    def _canonical(self, arg: str) -> str:
        """``--max-num-vistoken[=v]`` -> ``--max_num_vistoken[=v]`` when that flag exists."""
        if not arg.startswith("--") or "-" not in arg[2:].split("=", 1)[0]:
            return arg
        name, sep, value = arg.partition("=")
        underscored = "--" + name[2:].replace("-", "_")
        return underscored + sep + value if underscored in self._option_string_actions else arg


def apply_threads(threads: int | None) -> None:
    """``--threads`` (or OMP_NUM_THREADS) -> torch.set_num_threads; None and unset: torch's default."""
    import torch

    if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
