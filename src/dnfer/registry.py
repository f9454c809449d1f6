"""Named registries for models, methods, datasets and threshold policies (timm-style).

Each family registers its builders under a short name; the CLI and configs refer to them by
that name and an unknown name is a :class:`~dnfer.errors.ConfigError` listing the valid ones.

A registry fills itself: the first lookup (``get``, ``names``, ``in``) imports the package whose
import registers the built-ins, so no caller has to remember to load them. This module imports
nothing from dnfer's subpackages at import time (they import it to register).
"""

from __future__ import annotations

import importlib
from typing import Any, Generic, TypeVar

from dnfer.errors import ConfigError, choices_text

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping ``name -> object`` with a decorator to fill it and helpful lookup errors.

    Args:
        kind: what is registered, for error messages (``method``).
        builtins: modules whose import registers the built-in entries, imported on first lookup.
    """

    def __init__(self, kind: str, builtins: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self._builtins = builtins
        self._loaded = not builtins
        self._items: dict[str, T] = {}

    def register(self, target: str | Any) -> Any:
        """Add an entry: ``@METHODS.register`` on a class with a ``name`` attribute registers it
        under that name; ``@MODELS.register("tiny_cnn")`` on anything registers it under the string.
        """
        if isinstance(target, str):
            return lambda obj: self._add(target, obj)
        name = getattr(target, "name", "")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} {target!r} has no ``name``: set it or pass the name to register()")
        return self._add(name, target)

    def _add(self, name: str, obj: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = obj
        return obj

    def _load(self) -> None:
        """Import the built-in modules once (they register on import)."""
        if self._loaded:
            return
        self._loaded = True  # set first: the imports below call register(), never a lookup
        try:
            for module in self._builtins:
                importlib.import_module(module)
        except BaseException:
            self._loaded = False
            raise

    def get(self, name: str) -> T:
        """Return the object registered as ``name`` or raise a ConfigError naming the choices."""
        self._load()
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {choices_text(self.names())}"
            ) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items


MODELS: Registry = Registry("model", ("dnfer.models",))
METHODS: Registry = Registry("method", ("dnfer.methods",))
DATASETS: Registry = Registry("dataset", ("dnfer.data.registry_builtins",))
THRESHOLDS: Registry = Registry("threshold policy", ("dnfer.methods.thresholds",))
