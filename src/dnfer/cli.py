"""``dnfer`` command line: thin argument parsing that calls the library.

Each subcommand lives in ``dnfer/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args) -> int``. User errors (:class:`~dnfer.errors.DnferError`) print one line and exit
with their code (2 for bad input); no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dnfer import __version__
from dnfer.errors import DnferError

#: Subcommand modules under dnfer.commands, in help order.
COMMANDS = ("train", "pretrain", "eval", "noise", "synth", "prepare", "bench", "audit", "report", "predict", "export")


def _available_commands() -> list[str]:
    from importlib.util import find_spec

    return [c for c in COMMANDS if find_spec(f"dnfer.commands.{c}") is not None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dnfer",
        description="Noise-robust facial expression recognition: train (DNFER and peers), audit labels, deploy.",
    )
    parser.add_argument("--version", action="version", version=f"dnfer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _available_commands():
        importlib.import_module(f"dnfer.commands.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except DnferError as e:
        print(f"dnfer {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"dnfer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
