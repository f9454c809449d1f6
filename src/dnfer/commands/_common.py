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


def add_data_args(p: argparse.ArgumentParser, *, default_help: str = "synthetic") -> None:
    p.add_argument("--data", metavar="SPEC", help=f"dataset: synthetic or NAME:PATH (default {default_help})")
    p.add_argument("--data-option", action="append", metavar="K=V", help="dataset adapter option (repeatable)")
