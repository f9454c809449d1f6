"""Parse and load ``--data`` specs: ``synthetic`` or ``NAME:PATH`` (e.g. ``rafdb:/data/RAF-DB``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dnfer.data.base import FERDataset
from dnfer.errors import ConfigError, DataError
from dnfer.registry import DATASETS


class DatasetLoader(Protocol):
    """Signature every registered dataset loader has.

    Args:
        path: the dataset root (or file) the user gave, None for datasets that need none.
        image_size: side of the square uint8 images the loader returns.
        options: adapter-specific ``key -> value`` strings (``--data-option K=V``); a loader
            raises ConfigError for a key it does not know.
        seed: for any seeded split the adapter makes.
        skip_bad: skip (and record in ``meta['skipped']``) undecodable images instead of failing.
    """

    def __call__(
        self, path: Path | None, *, image_size: int, options: dict[str, str], seed: int, skip_bad: bool
    ) -> FERDataset: ...


@dataclass(frozen=True)
class DataSpec:
    name: str
    path: Path | None
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name if self.path is None else f"{self.name}:{self.path}"


#: Datasets that need no path.
PATHLESS = {"synthetic"}


def parse_data_spec(text: str, options: dict[str, str] | None = None) -> DataSpec:
    """``"rafdb:/x"`` -> DataSpec("rafdb", Path("/x")); the name must be registered."""

    text = text.strip()
    name, sep, path = text.partition(":")
    name = name.strip().lower()
    DATASETS.get(name)  # raises with the list of valid names
    if not sep or not path:
        if name in PATHLESS:
            return DataSpec(name, None, dict(options or {}))
        raise ConfigError(f"--data {text!r}: dataset {name!r} needs a path, as {name}:PATH")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"--data {text!r}: path {str(p)!r} does not exist")
    return DataSpec(name, p, dict(options or {}))


def load_data_spec(spec: DataSpec, *, image_size: int, seed: int, skip_bad: bool = False) -> FERDataset:
    """Load the dataset a spec names; the result's ``meta['spec']`` records the spec."""
    loader: DatasetLoader = DATASETS.get(spec.name)
    ds = loader(spec.path, image_size=image_size, options=dict(spec.options), seed=seed, skip_bad=skip_bad)
    ds.meta.setdefault("spec", str(spec))
    ds.meta.setdefault("dataset", spec.name)
    return ds
