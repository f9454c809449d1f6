"""RAF-DB adapters: ``--data rafdb:PATH`` (basic set) and ``--data rafdb-compound:PATH``.

Layout of the official release (http://www.whdeng.cn/RAF/model1.html; docs/datasets.md):
``PATH/EmoLabel/list_patition_label.txt`` (sic; the corrected spelling is accepted too) with lines
``train_00001.jpg 5`` / ``test_0001.jpg 1`` (labels 1..7 in RAF order = canonical order), images
``PATH/Image/aligned/<stem>_aligned.jpg`` (100x100) or ``PATH/Image/original/<name>``. ``PATH`` may
also be the folder holding ``basic/``. Splits come from the name prefix (``train_``/``test_``);
sample names are the list-file names, so community noise files (``EmoLabel/noiseNN.txt``) match
them.

The compound set (``PATH`` = the folder holding ``EmoLabel/`` and ``Image/``, or its
``compound/`` parent) has the same files with labels 1..11 naming :data:`COMPOUND_CLASSES`, kept
in that (file) order; its names are not expression names, so the run records them as written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from dnfer.data.classes import RAF_ORDER
from dnfer.data.records import Record, RecordIndex, opt_choice, register_adapter
from dnfer.errors import DataError
from dnfer.io_safety import read_utf8_lines

LIST_FILES = ("list_patition_label.txt", "list_partition_label.txt")
OPTIONS = {"images": "aligned (default, 100x100 faces) or original"}
#: RAF-DB compound classes; label k in its list file means COMPOUND_CLASSES[k - 1].
COMPOUND_CLASSES: tuple[str, ...] = (
    "happily surprised",
    "happily disgusted",
    "sadly fearful",
    "sadly angry",
    "sadly surprised",
    "sadly disgusted",
    "fearfully angry",
    "fearfully surprised",
    "angrily surprised",
    "angrily disgusted",
    "disgustedly surprised",
)


def find_root(path: Path, subset: str = "basic") -> tuple[Path, Path]:
    """``(root, list_file)``; accepts the RAF root, its ``basic/`` (``compound/``) parent, or the list file."""
    if path.is_file():
        return path.parent.parent, path
    for root in (path, path / subset, path / "RAF-DB" / subset):
        for name in LIST_FILES:
            if (root / "EmoLabel" / name).is_file():
                return root, root / "EmoLabel" / name
    raise DataError(
        f"RAF-DB: no EmoLabel/{LIST_FILES[0]} under {str(path)!r} (nor under {str(path / subset)!r}); "
        "give the folder that holds EmoLabel/ and Image/"
    )


def read_list(path: Path, options: dict[str, str], dataset: str, subset: str, class_names: Sequence[str]) -> RecordIndex:
    """Records of a RAF-DB list file whose labels 1..K name ``class_names`` (K = len)."""
    images = opt_choice(dataset, options, "images", ("aligned", "original"), "aligned")
    root, list_file = find_root(path, subset)
    img_dir = root / "Image" / images
    if not img_dir.is_dir():
        raise DataError(f"RAF-DB: image folder {str(img_dir)!r} does not exist (--data-option images={images})")
    present = set(os.listdir(img_dir))  # one listing instead of a stat per image
    k = len(class_names)
    records: list[Record] = []
    for lineno, line in read_utf8_lines(list_file):
        if not line.strip():
            continue
        where = f"{list_file}:{lineno}"
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{where}: expected 'name label' with label 1..{k}, got {line.strip()!r}")
        name, lab = parts[0], int(parts[1])
        if not 1 <= lab <= k:
            raise DataError(f"{where}: label {lab} out of range 1..{k} (RAF-DB {subset} has {k} classes)")
        prefix = name.split("_", 1)[0].lower()
        if prefix not in ("train", "test"):
            raise DataError(f"{where}: name {name!r} starts neither with train_ nor test_, so its split is unknown")
        stem, ext = os.path.splitext(name)
        candidates = [f"{stem}_aligned{ext}", name] if images == "aligned" else [name]
        fname = next((c for c in candidates if c in present), candidates[0])
        records.append(
            Record(name=name, label=lab - 1, split=prefix, file=str(img_dir / fname), origin=where)
        )
    return RecordIndex(
        class_names=list(class_names),
        records=records,
        sources=[list_file],
        meta={"protocol": f"RAF-DB {subset}, {images} images, list-file train/test, RAF label order"},
    )


@register_adapter("rafdb", OPTIONS)
def index_rafdb(path: Path, options: dict[str, str], seed: int) -> RecordIndex:
    """RAF-DB basic: 7 classes, train/test from the list file (12,271 / 3,068 in the release)."""
    index = read_list(path, options, "rafdb", "basic", RAF_ORDER)
    index.meta["protocol"] += " (= canonical)"
    return index


@register_adapter("rafdb-compound", OPTIONS)
def index_rafdb_compound(path: Path, options: dict[str, str], seed: int) -> RecordIndex:
    """RAF-DB compound: 11 compound classes, train/test from the list file (3,162 / 792 in the release)."""
    return read_list(path, options, "rafdb-compound", "compound", COMPOUND_CLASSES)
