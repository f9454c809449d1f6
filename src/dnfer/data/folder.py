"""Class-folder adapters: ``folder`` (ImageFolder) and ``sfew`` (SFEW 2.0).

- ``--data folder:PATH``: ``PATH/<split>/<class>/*`` (split folders train/val/test, common
  spellings accepted; train and test required) or ``PATH/<class>/*`` split per class with a
  seeded ratio (``test_ratio``, default 0.2; ``val_ratio``, default 0: the trainer carves
  validation from train).
- ``--data sfew:PATH``: ``PATH/Train/<Class>/*`` and ``PATH/Val/<Class>/*`` (single
  sub-folders such as ``Train_Aligned_Faces/`` are descended); Val is the test split.

Class folder names must be expression names (any case, synonyms such as ``Happy``/``Angry``);
they are mapped by name. Sample names are ``<class folder>/<relative file path>``. Files without
an image extension are not read but are counted and listed in ``meta['ignored_files']``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from dnfer.data.classes import canonical_name
from dnfer.data.records import (
    MAX_LISTED,
    Record,
    RecordIndex,
    canonical_subset,
    is_image_file,
    opt_float,
    register_adapter,
    seeded_split,
    split_name,
)
from dnfer.errors import ConfigError, DataError


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_of(folder: Path) -> str | None:
    try:
        return canonical_name(folder.name)
    except ConfigError:
        return None


def scan_classes(root: Path, ignored: list[str]) -> list[tuple[str, str, Path]]:
    """``(canonical class, sample name, file)`` for every image under ``root/<class>/``.

    Raises DataError naming any sub-folder that is not an expression name.
    """
    out: list[tuple[str, str, Path]] = []
    dirs = _subdirs(root)
    bad = [d.name for d in dirs if _class_of(d) is None]
    if bad:
        raise DataError(
            f"{root}: folder(s) {', '.join(repr(b) for b in bad)} are not expression names; expected class folders "
            "named surprise, fear, disgust, happiness (happy), sadness (sad), anger (angry), neutral, contempt"
        )
    if not dirs:
        raise DataError(f"{root}: no class folders found (expected {root}/<class>/<image>)")
    for d in dirs:
        cls = _class_of(d)
        assert cls is not None
        n_before = len(out)
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames.sort()
            for fn in sorted(filenames):
                f = Path(dirpath) / fn
                if fn.startswith(".") or not is_image_file(f):
                    ignored.append(str(f))
                    continue
                out.append((cls, f"{d.name}/{f.relative_to(d).as_posix()}", f))
        if len(out) == n_before:  # trains as if the class were absent: say so
            warnings.warn(f"class folder {str(d)!r} holds no images; class {cls!r} has no samples here", stacklevel=2)
    return out


def _records(items: list[tuple[str, str, Path]], classes: list[str], split: str) -> list[Record]:
    return [Record(name=n, label=classes.index(c), split=split, file=str(f), origin=str(f)) for c, n, f in items]


def _ignored_meta(ignored: list[str]) -> dict[str, object]:
    return {"num_ignored_files": len(ignored), "ignored_files": ignored[:MAX_LISTED * 5]}


def _descend_to_classes(d: Path) -> Path:
    """Follow single sub-folders (``Train/Train_Aligned_Faces/``) down to the class folders."""
    while True:
        subs = _subdirs(d)
        if any(_class_of(s) is not None for s in subs) or len(subs) != 1:
            return d
        d = subs[0]


FOLDER_OPTIONS = {
    "val_ratio": "fraction per class held out as val, PATH/<class>/* layout only (default 0)",
    "test_ratio": "fraction per class held out as test, PATH/<class>/* layout only (default 0.2)",
}


@register_adapter("folder", FOLDER_OPTIONS)
def index_folder(path: Path, options: dict[str, str], seed: int) -> RecordIndex:
    """ImageFolder layouts, with split folders or a seeded stratified split."""
    if not path.is_dir():
        raise DataError(f"folder: {str(path)!r} is not a folder")
    ignored: list[str] = []
    subs = _subdirs(path)
    split_dirs = {d: split_name(d.name) for d in subs}
    if any(s is not None for s in split_dirs.values()):
        others = [d.name for d, s in split_dirs.items() if s is None]
        if others:
            raise DataError(
                f"{path}: has split folders and also {', '.join(repr(o) for o in others)}; use either "
                "PATH/<split>/<class>/* (split = train, val, test) or PATH/<class>/*"
            )
        for key in ("val_ratio", "test_ratio"):
            if key in options:
                raise ConfigError(f"--data-option {key} applies to the PATH/<class>/* layout; {path} has split folders")
        per_split: dict[str, list[tuple[str, str, Path]]] = {}
        for d, s in split_dirs.items():
            assert s is not None
            if s in per_split:
                raise DataError(f"{path}: two folders name the {s!r} split")
            per_split[s] = scan_classes(d, ignored)
        for need in ("train", "test"):
            if need not in per_split:
                raise DataError(f"{path}: no {need}/ folder; split layout needs train/ and test/ (val/ optional)")
        classes = canonical_subset(c for items in per_split.values() for c, _, _ in items)
        records = [r for s, items in per_split.items() for r in _records(items, classes, s)]
        return RecordIndex(classes, records, [], {"protocol": "folder, split folders", **_ignored_meta(ignored)})
    val_ratio = opt_float("folder", options, "val_ratio", 0.0, 0.0, 1.0)
    test_ratio = opt_float("folder", options, "test_ratio", 0.2, 0.0, 1.0)
    if val_ratio + test_ratio >= 1.0:
        raise ConfigError(f"folder: val_ratio + test_ratio = {val_ratio + test_ratio:g} leaves nothing to train on")
    items = scan_classes(path, ignored)
    classes = canonical_subset(c for c, _, _ in items)
    records = _records(items, classes, "train")
    seeded_split(records, num_classes=len(classes), val_ratio=val_ratio, test_ratio=test_ratio, seed=seed)
    return RecordIndex(
        classes, records, [],
        {"protocol": f"folder, seeded stratified split val_ratio={val_ratio:g} test_ratio={test_ratio:g}",
         **_ignored_meta(ignored)},
        uses_seed=True,
    )


@register_adapter("sfew", {})
def index_sfew(path: Path, options: dict[str, str], seed: int) -> RecordIndex:
    """SFEW 2.0: 7 classes, Train as train, Val as test (commonly 891 / 431 aligned faces)."""
    if not path.is_dir():
        raise DataError(f"sfew: {str(path)!r} is not a folder")
    subs = {d.name.lower(): d for d in _subdirs(path)}
    train = next((d for n, d in subs.items() if n.startswith("train")), None)
    val = next((d for n, d in subs.items() if n.startswith("val")), None)
    if train is None or val is None:
        raise DataError(f"sfew: {str(path)!r} needs Train/ and Val/ folders (found: {', '.join(sorted(subs)) or 'none'})")
    ignored: list[str] = []
    tr = scan_classes(_descend_to_classes(train), ignored)
    te = scan_classes(_descend_to_classes(val), ignored)
    classes = canonical_subset(c for c, _, _ in tr + te)
    records = _records(tr, classes, "train") + _records(te, classes, "test")
    return RecordIndex(classes, records, [], {"protocol": "SFEW 2.0, Train / Val as test", **_ignored_meta(ignored)})
