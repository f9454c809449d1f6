"""Argument helpers shared by subcommands (output-path safety lives in :mod:`dnfer.io_safety`)."""

from __future__ import annotations

import argparse
from pathlib import Path

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
