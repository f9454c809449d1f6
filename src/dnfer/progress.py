"""Progress bars of the commands (tqdm, like training's): on stderr, and only on a terminal."""

from __future__ import annotations

import sys
from typing import Any


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def progress_bar(total: int | None, desc: str, enabled: bool = True, **kwargs: Any) -> Any:
    """A ``tqdm`` bar on stderr, disabled unless ``enabled`` and stderr is a terminal.

    A disabled bar accepts ``update``/``close``/``set_postfix`` and prints nothing, so callers
    need no branches; logs redirected to a file never fill with carriage returns.
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not (enabled and stderr_is_terminal()), leave=False,
                file=sys.stderr, dynamic_ncols=True, **kwargs)
