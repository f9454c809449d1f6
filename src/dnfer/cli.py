"""``dnfer`` command line: thin argument parsing that calls the library.

Each subcommand lives in ``dnfer/commands/<name>.py`` with ``add_parser(subparsers)`` and
``run(args) -> int``. Whatever goes wrong, the user sees one line on stderr and an exit status
(docs/reliability.md lists them); ``--debug`` shows the traceback of an unexpected error.

Exit status: 0 success; 1 partial failure (``predict``: some inputs failed, ``bench``: some
cells failed); 2 bad usage, config, input file or output path (:class:`~dnfer.errors.DnferError`);
3 numerical failure in training (non-finite loss/gradient with ``--nan-policy stop``);
4 an OS error (disk full, permission denied...) outside a checked write; 5 an unexpected internal
error (a bug: rerun with ``--debug`` and report the traceback); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

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
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an unexpected error (anywhere on the command line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _available_commands():
        importlib.import_module(f"dnfer.commands.{name}").add_parser(sub)
    from dnfer.commands._common import EXIT_CODES_EPILOG

    for command_parser in sub.choices.values():  # one exit-code note for every command's --help
        command_parser.epilog = f"{command_parser.epilog}\n\n{EXIT_CODES_EPILOG}" if command_parser.epilog \
            else EXIT_CODES_EPILOG
    return parser


#: Exit status of an OS error (disk full, permission...) not caught by a command's own checks.
EXIT_OS_ERROR = 4
#: Exit status of an unexpected internal error (a bug).
EXIT_INTERNAL = 5
#: Exit status after Ctrl-C (128 + SIGINT, like a shell).
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():  # restores the warning display when the command returns
        if not debug:  # one line per warning, like errors (no source line)
            warnings.showwarning = _one_line_warning(args.command)
        return _run(args, debug)


def _run(args: argparse.Namespace, debug: bool) -> int:
    try:
        try:
            return int(args.run(args) or 0)
        except DnferError as e:
            _say(args.command, f"error: {_one_line(str(e), limit=2000)}")
            return e.exit_code
        except KeyboardInterrupt:
            _say(args.command, "interrupted")
            return EXIT_INTERRUPTED
        except OSError as e:
            if debug:
                raise
            from dnfer.io_safety import os_error_text

            _say(args.command, f"error: {_one_line(os_error_text(e))} (rerun with --debug for the traceback)")
            return EXIT_OS_ERROR
        except Exception as e:
            if debug:
                raise
            _say(args.command, f"internal error: {type(e).__name__}: {_one_line(str(e))} "
                               "(a bug; rerun with --debug for the traceback and report it)")
            return EXIT_INTERNAL
    except KeyboardInterrupt:  # a second Ctrl-C while the first one was being handled
        _say(args.command, "interrupted")
        return EXIT_INTERRUPTED


def _one_line_warning(command: str) -> Any:
    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        _say(command, f"warning: {_one_line(str(message))}")

    return show


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (a message quoting a library's multi-line text stays one line), at most ``limit`` chars."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _say(command: str, message: str) -> None:
    try:
        print(f"dnfer {command}: {message}", file=sys.stderr)
    except (KeyboardInterrupt, OSError):  # Ctrl-C again, or stderr closed: nothing more to say
        pass


def entry() -> None:
    """Process entry point (the ``dnfer`` script, ``python -m dnfer``): :func:`main`, then exit.

    Once the command has returned, further Ctrl-C are ignored: a late one during the interpreter's
    shutdown would otherwise end the process with a traceback or a signal status instead of 130.
    """
    import signal

    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C while importing or parsing
        code = EXIT_INTERRUPTED
    finally:
        with contextlib.suppress(ValueError, KeyboardInterrupt):  # ValueError: not the main thread
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    entry()
