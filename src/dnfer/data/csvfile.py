"""Generic list adapter: ``--data csv:FILE`` with a header ``path,label[,split][,x,y,w,h]``.

``path`` is relative to the CSV file's folder (absolute paths are kept); ``label`` is an
expression name (``happy``, ``Happiness``...), or an integer when ``label_order`` says which
order it refers to (``raf`` is 1-based as in RAF-DB files; ``affectnet``, ``fer2013`` and
``ferplus`` are 0-based). ``split`` is train/val/test (common spellings accepted); without the
column the split is a seeded stratified ratio split (``val_ratio``, ``test_ratio``). The optional
``x,y,w,h`` columns give a face box to crop. The sample name is ``path`` as written.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from dnfer.data.classes import AFFECTNET_ORDER, FER2013_ORDER, FERPLUS_ORDER, RAF_ORDER, canonical_name
from dnfer.data.records import (
    Record,
    RecordIndex,
    canonical_subset,
    opt_choice,
    opt_float,
    register_adapter,
    seeded_split,
    split_name,
)
from dnfer.errors import ConfigError, DataError
from dnfer.io_safety import read_utf8_text

ORDERS = {"raf": (RAF_ORDER, 1), "affectnet": (AFFECTNET_ORDER, 0), "fer2013": (FER2013_ORDER, 0), "ferplus": (FERPLUS_ORDER, 0)}
OPTIONS = {
    "label_order": "names (default: labels are class names) or raf|affectnet|fer2013|ferplus for integer labels",
    "val_ratio": "without a split column: fraction per class held out as val (default 0)",
    "test_ratio": "without a split column: fraction per class held out as test (default 0.2)",
}


@register_adapter("csv", OPTIONS)
def index_csv(path: Path, options: dict[str, str], seed: int) -> RecordIndex:
    """A list file ``path,label[,split]`` of images anywhere on disk."""
    order_name = opt_choice("csv", options, "label_order", ("names", *ORDERS), "names")
    if not path.is_file():
        raise DataError(f"csv: {str(path)!r} is not a file; give the list file itself (csv:FILE)")
    rows = list(csv.reader(io.StringIO(read_utf8_text(path), newline="")))
    if not rows:
        raise DataError(f"{path}: the file is empty")
    header = [h.strip().lower() for h in rows[0]]
    for need in ("path", "label"):
        if need not in header:
            raise DataError(f"{path}:1: missing column {need!r}; the header must be path,label[,split][,x,y,w,h]")
    col = {h: i for i, h in enumerate(header)}
    has_split = "split" in col
    has_box = all(c in col for c in ("x", "y", "w", "h"))
    base = path.parent
    raw: list[tuple[str, str, str | None, tuple[float, float, float, float] | None, str]] = []
    for lineno, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        where = f"{path}:{lineno}"
        if len(row) < len(header):
            raise DataError(f"{where}: expected {len(header)} fields ({','.join(header)}), got {len(row)}")
        lab_text = row[col["label"]].strip()
        if order_name == "names":
            try:
                cls = canonical_name(lab_text)
            except ConfigError:
                hint = " (integer labels need --data-option label_order=raf|affectnet|fer2013|ferplus)" if lab_text.lstrip("-").isdigit() else ""
                raise DataError(f"{where}: unknown class {lab_text!r}{hint}") from None
        else:
            order, first = ORDERS[order_name]
            if not lab_text.lstrip("-").isdigit() or not first <= int(lab_text) < first + len(order):
                raise DataError(f"{where}: label {lab_text!r} out of range {first}..{first + len(order) - 1} ({order_name} order)")
            cls = order[int(lab_text) - first]
        split = None
        if has_split:
            split = split_name(row[col["split"]])
            if split is None:
                raise DataError(f"{where}: split {row[col['split']]!r} is not train, val or test")
        box = None
        if has_box:
            try:
                box = tuple(float(row[col[c]]) for c in ("x", "y", "w", "h"))  # type: ignore[assignment]
            except ValueError:
                raise DataError(f"{where}: x,y,w,h must be numbers") from None
        rel = row[col["path"]].strip()
        if not rel:
            raise DataError(f"{where}: empty path")
        raw.append((rel, cls, split, box, where))
    classes = canonical_subset(r[1] for r in raw)
    records = [
        Record(name=rel, label=classes.index(cls), split=split or "train", file=str(base / rel), box=box, origin=where)
        for rel, cls, split, box, where in raw
    ]
    uses_seed = not has_split
    if uses_seed:
        val_ratio = opt_float("csv", options, "val_ratio", 0.0, 0.0, 1.0)
        test_ratio = opt_float("csv", options, "test_ratio", 0.2, 0.0, 1.0)
        seeded_split(records, num_classes=len(classes), val_ratio=val_ratio, test_ratio=test_ratio, seed=seed)
        protocol = f"csv list, seeded stratified split val_ratio={val_ratio:g} test_ratio={test_ratio:g}"
    else:
        protocol = "csv list with split column"
    return RecordIndex(classes, records, [path], {"protocol": protocol}, uses_seed=uses_seed)
