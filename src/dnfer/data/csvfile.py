"""Generic list adapter: ``--data csv:FILE`` with a header ``path,label[,split][,x,y,w,h]``.

``path`` is relative to the CSV file's folder (absolute paths are kept); ``label`` is a class
name or an integer. When every label is an expression name (``happy``, ``Happiness``...) the
classes map onto the canonical expression order; any other label set is kept as written, in
ImageFolder order: label strings sorted as Python sorts strings, or, when every label is an
integer, the integers in numeric order (``0..K-1`` stay ``0..K-1``). ``label_order`` says that
integer labels are expression ids of a known order instead (``raf`` is 1-based as in RAF-DB
files; ``affectnet``, ``fer2013`` and ``ferplus`` are 0-based); ``taxonomy=expressions`` refuses
labels that are not expression names. ``split`` is train/val/test (common spellings accepted); without the
column the split is a seeded stratified ratio split (``val_ratio``, ``test_ratio``). The optional
``x,y,w,h`` columns give a face box to crop. The sample name is ``path`` as written.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from dnfer.data.classes import (
    AFFECTNET_ORDER,
    FER2013_ORDER,
    FERPLUS_ORDER,
    RAF_ORDER,
    TAXONOMIES,
    expression_name,
    order_class_names,
)
from dnfer.data.records import (
    Record,
    RecordIndex,
    opt_choice,
    opt_float,
    register_adapter,
    seeded_split,
    split_name,
)
from dnfer.errors import DataError
from dnfer.io_safety import read_utf8_text

ORDERS = {"raf": (RAF_ORDER, 1), "affectnet": (AFFECTNET_ORDER, 0), "fer2013": (FER2013_ORDER, 0), "ferplus": (FERPLUS_ORDER, 0)}
OPTIONS = {
    "label_order": "names (default: labels are class names; integers are their own classes, in numeric order) "
                   "or raf|affectnet|fer2013|ferplus for integer expression ids",
    "taxonomy": "auto (default: expression labels map to the canonical order, any other labels are kept as "
                "written, sorted) or expressions (refuse labels that are not expression names)",
    "val_ratio": "without a split column: fraction per class held out as val (default 0)",
    "test_ratio": "without a split column: fraction per class held out as test (default 0.2)",
}


@register_adapter("csv", OPTIONS)
def index_csv(path: Path, options: dict[str, str], seed: int) -> RecordIndex:
    """A list file ``path,label[,split]`` of images anywhere on disk."""
    order_name = opt_choice("csv", options, "label_order", ("names", *ORDERS), "names")
    taxonomy = opt_choice("csv", options, "taxonomy", TAXONOMIES, "auto")
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
            if not lab_text:
                raise DataError(f"{where}: empty label")
            if taxonomy == "expressions" and expression_name(lab_text) is None:
                hint = " (integer labels need --data-option label_order=raf|affectnet|fer2013|ferplus)" if lab_text.lstrip("-").isdigit() else ""
                raise DataError(f"{where}: unknown class {lab_text!r} (taxonomy=expressions){hint}")
            cls = lab_text  # named below, once every label is known
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
    classes, to_class = order_class_names((r[1] for r in raw), where=f"{path}: labels", numeric=True)
    index = {c: i for i, c in enumerate(classes)}
    records = [
        Record(name=rel, label=index[to_class[cls]], split=split or "train", file=str(base / rel), box=box, origin=where)
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
