"""Class-folder adapters: ``folder`` (ImageFolder) and ``sfew`` (SFEW 2.0).

- ``--data folder:PATH``: ``PATH/<split>/<class>/*`` (split folders train/val/test, common
  spellings accepted; train and test required) or ``PATH/<class>/*`` split per class with a
  seeded ratio (``test_ratio``, default 0.2; ``val_ratio``, default 0: the trainer carves
  validation from train).
- ``--data sfew:PATH``: ``PATH/Train/<Class>/*`` and ``PATH/Val/<Class>/*`` (single
  sub-folders such as ``Train_Aligned_Faces/`` are descended); Val is the test split.

``folder`` accepts any class folder names, as torchvision's ``ImageFolder`` does: when every
folder is an expression name (any case, synonyms such as ``Happy``/``Angry``) the classes are
mapped by name onto the canonical expression order; otherwise the folder names are the class
names, as written, sorted as Python sorts strings (``'10'`` before ``'2'``, ``'Zebra'`` before
``'ant'``). ``--data-option taxonomy=expressions`` refuses anything but expression names. SFEW
folders must be expression names. Sample names are ``<class folder>/<relative file path>``.
Files without an image extension are not read but are counted and listed in
``meta['ignored_files']``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from dnfer.data.classes import TAXONOMIES, expression_name, order_class_names
from dnfer.data.records import (
    MAX_LISTED,
    Record,
    RecordIndex,
    is_image_file,
    opt_choice,
    opt_float,
    register_adapter,
    seeded_split,
    split_name,
)
from dnfer.errors import ConfigError, DataError


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_classes(root: Path, ignored: list[str]) -> list[tuple[str, str, Path]]:
    """``(class folder name, sample name, file)`` for every image under ``root/<class>/``."""
    out: list[tuple[str, str, Path]] = []
    dirs = _subdirs(root)
    if not dirs:
        raise DataError(f"{root}: no class folders found (expected {root}/<class>/<image>)")
    for d in dirs:
        n_before = len(out)
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames.sort()
            for fn in sorted(filenames):
                f = Path(dirpath) / fn
                if fn.startswith(".") or not is_image_file(f):
                    ignored.append(str(f))
                    continue
                out.append((d.name, f"{d.name}/{f.relative_to(d).as_posix()}", f))
        if len(out) == n_before:  # trains as if the class were absent: say so
            warnings.warn(f"class folder {str(d)!r} holds no images; class {d.name!r} has no samples here", stacklevel=2)
    return out


def _folder_classes(
    where: Path, items: list[tuple[str, str, Path]], taxonomy: str, hint: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """The class list of scanned ``items`` (all splits together) and folder name -> class name."""
    kw = {} if hint is None else {"hint": hint}
    return order_class_names((c for c, _, _ in items), taxonomy=taxonomy, where=f"{where}: folder(s)", **kw)


def _records(
    items: list[tuple[str, str, Path]], classes: list[str], to_class: dict[str, str], split: str
) -> list[Record]:
    index = {c: i for i, c in enumerate(classes)}
    return [Record(name=n, label=index[to_class[c.strip()]], split=split, file=str(f), origin=str(f)) for c, n, f in items]


def _ignored_meta(ignored: list[str]) -> dict[str, object]:
    return {"num_ignored_files": len(ignored), "ignored_files": ignored[:MAX_LISTED * 5]}


def _descend_to_classes(d: Path) -> Path:
    """Follow single sub-folders (``Train/Train_Aligned_Faces/``) down to the class folders."""
    while True:
        subs = _subdirs(d)
        if any(expression_name(s.name) is not None for s in subs) or len(subs) != 1:
            return d
        d = subs[0]


FOLDER_OPTIONS = {
    "taxonomy": "auto (default: expression folders map to the canonical order, any other names are kept "
                "as written, sorted like ImageFolder) or expressions (refuse non-expression folder names)",
    "val_ratio": "fraction per class held out as val, PATH/<class>/* layout only (default 0)",
    "test_ratio": "fraction per class held out as test, PATH/<class>/* layout only (default 0.2)",
}


@register_adapter("folder", FOLDER_OPTIONS)
def index_folder(path: Path, options: dict[str, str], seed: int) -> RecordIndex:
    """ImageFolder layouts, with split folders or a seeded stratified split."""
    if not path.is_dir():
        raise DataError(f"folder: {str(path)!r} is not a folder")
    taxonomy = opt_choice("folder", options, "taxonomy", TAXONOMIES, "auto")
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
        classes, to_class = _folder_classes(path, [it for items in per_split.values() for it in items], taxonomy)
        records = [r for s, items in per_split.items() for r in _records(items, classes, to_class, s)]
        return RecordIndex(classes, records, [], {"protocol": "folder, split folders", **_ignored_meta(ignored)})
    val_ratio = opt_float("folder", options, "val_ratio", 0.0, 0.0, 1.0)
    test_ratio = opt_float("folder", options, "test_ratio", 0.2, 0.0, 1.0)
    if val_ratio + test_ratio >= 1.0:
        raise ConfigError(f"folder: val_ratio + test_ratio = {val_ratio + test_ratio:g} leaves nothing to train on")
    items = scan_classes(path, ignored)
    classes, to_class = _folder_classes(path, items, taxonomy)
    records = _records(items, classes, to_class, "train")
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
    tr_dir, te_dir = _descend_to_classes(train), _descend_to_classes(val)
    tr, te = scan_classes(tr_dir, ignored), scan_classes(te_dir, ignored)
    for d, items in ((tr_dir, tr), (te_dir, te)):  # SFEW's classes are expressions: name the odd folder
        _folder_classes(d, items, "expressions", hint="")
    classes, to_class = _folder_classes(path, tr + te, "expressions", hint="")
    records = _records(tr, classes, to_class, "train") + _records(te, classes, to_class, "test")
    return RecordIndex(classes, records, [], {"protocol": "SFEW 2.0, Train / Val as test", **_ignored_meta(ignored)})
