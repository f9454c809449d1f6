"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse

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
