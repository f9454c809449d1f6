"""Named registries for models, methods, datasets and threshold policies (timm-style).

Each family registers its builders under a short name; the CLI and configs refer to them by
that name and an unknown name is a :class:`~dnfer.errors.ConfigError` listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from dnfer.errors import ConfigError, choices_text

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping ``name -> object`` with a decorator to fill it and helpful lookup errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@METHODS.register("dnfer")`` on a class or function."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """Return the object registered as ``name`` or raise a ConfigError naming the choices."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {choices_text(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items


MODELS: Registry = Registry("model")
METHODS: Registry = Registry("method")
DATASETS: Registry = Registry("dataset")
THRESHOLDS: Registry = Registry("threshold policy")


def load_builtins() -> None:
    """Import the modules that fill the registries (their import registers them)."""
    import dnfer.data.registry_builtins  # noqa: F401
    import dnfer.methods  # noqa: F401
    import dnfer.models  # noqa: F401
