"""User-facing errors.

Anything the user can get wrong (a name, a path, a value, a file's content) raises
:class:`DnferError` with one sentence that names the thing and what is valid. The CLI prints it
as one line and exits with status 2; library callers can catch it.
"""

from __future__ import annotations


class DnferError(Exception):
    """An error caused by user input, reported without a traceback."""

    exit_code: int = 2


class DataError(DnferError):
    """A dataset file or folder is missing, malformed or inconsistent."""


class ConfigError(DnferError):
    """A config key, value or combination of options is invalid."""


def choices_text(choices: list[str] | tuple[str, ...]) -> str:
    """Format valid choices for an error message: ``a, b, c``."""
    return ", ".join(sorted(choices))
