"""Argument helpers shared by subcommands (output-path safety lives in :mod:`dnfer.io_safety`)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dnfer.errors import ConfigError


def key_values(items: list[str] | None, option: str) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; a malformed item is a ConfigError."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{option} {item!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def add_trust_arg(p: argparse.ArgumentParser, what: str = "the checkpoint") -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help=f"UNSAFE: load {what} even if it needs arbitrary Python unpickling (old or foreign "
                        "pickles, TorchScript archives), which runs any code the file holds; only for files "
                        "whose origin you trust. Without it dnfer loads tensors and plain data only")


def add_data_args(p: argparse.ArgumentParser, *, default_help: str = "synthetic") -> None:
    p.add_argument("--data", metavar="SPEC", help=f"dataset: synthetic or NAME:PATH (default {default_help})")
    p.add_argument("--data-option", action="append", metavar="K=V", help="dataset adapter option (repeatable)")


def add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (an input is never overwritten)")


def check_positive(option: str, value: int | None, minimum: int = 1) -> None:
    """``value`` (of ``option``) must be >= ``minimum`` (None = not given)."""
    if value is not None and value < minimum:
        raise ConfigError(f"{option} must be >= {minimum}, got {value}")


def check_seed_arg(option: str, value: int) -> None:
    """A seed flag must be in [0, 2**32 - 1]."""
    from dnfer.config import check_seed

    check_seed(option, value)


def run_dir_inputs(run_dir: str | Path) -> list[Path]:
    """The files of a run folder that commands read (never to be overwritten by their outputs)."""
    from dnfer.io_safety import RUN_FILES

    d = Path(run_dir)
    return [d / n for n in RUN_FILES if n not in ("label_issues.csv", "report.html")] + [d / "cell.yaml"]


#: Appended to every command's ``--help`` (the table itself lives in one place).
EXIT_CODES_EPILOG = ("exit status: 0 success, 1 partial failure (predict, bench), 2 bad usage/config/input/output, "
                     "3 numerical failure (train), 4 OS error, 5 internal error (a bug), 130 interrupted; "
                     "the table: docs/reliability.md section 6")


def add_json_arg(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as one JSON object on stdout (other messages go to stderr)")


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are also off when stderr is not a terminal)")


def print_json(obj: Any) -> None:
    """``obj`` as one JSON line on stdout (paths and other non-JSON values as strings; NaN as null)."""
    print(json.dumps(_plain(obj), default=str, allow_nan=False))


def _plain(v: Any) -> Any:
    import numpy as np

    if isinstance(v, (np.generic, np.ndarray)):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def human(args: argparse.Namespace) -> Callable[[str], None]:
    """Where a command's human-readable lines go: stdout, or stderr when ``--json`` owns stdout."""
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    return lambda message: print(message, file=stream)


def note_deprecated(command: str, old: str, new: str) -> None:
    """One stderr line saying that ``old`` still works but ``new`` is the spelling to use."""
    print(f"dnfer {command}: note: {old} is deprecated; use {new}", file=sys.stderr)


def progress_enabled(args: argparse.Namespace) -> bool:
    """Progress bars unless ``--no-progress`` (see :func:`dnfer.progress.progress_bar` for the terminal test)."""
    return not getattr(args, "no_progress", False)


def add_offline_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--offline", action="store_true",
                   help="never download named --pretrained weights (torchvision:..., timm); read them from the "
                        "torch hub / Hugging Face cache only (same as DNFER_OFFLINE=1)")


def apply_offline_arg(args: argparse.Namespace) -> None:
    """``--offline`` sets ``DNFER_OFFLINE=1`` for this process and the processes it starts (sweep cells)."""
    if getattr(args, "offline", False):
        os.environ["DNFER_OFFLINE"] = "1"
