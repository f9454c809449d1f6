"""FER2013 and FERPlus adapters (one family: both read the ``fer2013.csv`` pixel rows).

- ``--data fer2013:PATH`` (``fer2013.csv`` or its folder): ``emotion,pixels,Usage``; pixels are
  2304 gray values (48x48); Training -> train, PublicTest -> val, PrivateTest -> test; emotion
  0..6 in FER2013 order, mapped by name.
- ``--data ferplus:PATH`` (a folder with ``fer2013.csv`` and FERPlus's ``fer2013new.csv``, in
  it or one level down): the majority-vote protocol of the FERPlus authors (votes <= 1 are
  removed; the top emotion is kept only with more than half the remaining votes, unknown/NF
  included; unknown/NF-dominated images are dropped), 8 or 7 classes (7 drops the contempt
  images), Training/PublicTest/PrivateTest -> train/val/test, optional soft labels from the
  vote distribution.

Sample names are ``fer%07d.png`` with the 0-based row of fer2013.csv: FERPlus's own names, and
the same for FER2013, so one noise file works for both.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

import numpy as np

from dnfer.data.classes import FER2013_ORDER, FERPLUS_ORDER
from dnfer.data.records import (
    Record,
    RecordIndex,
    canonical_subset,
    opt_bool,
    opt_choice,
    register_adapter,
    split_name,
)
from dnfer.errors import DataError
from dnfer.io_safety import read_utf8_text

PIXELS = 48 * 48
USAGES = {"training": "train", "publictest": "val", "privatetest": "test"}

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # a pixels field is ~9 kB


def _find(path: Path, names: tuple[str, ...], what: str) -> Path:
    if path.is_file():
        return path
    for d in (path, *sorted(p for p in path.iterdir() if p.is_dir())) if path.is_dir() else ():
        for n in names:
            if (d / n).is_file():
                return d / n
    raise DataError(f"{what}: no {' or '.join(names)} in {str(path)!r} or its sub-folders")


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    rows = list(csv.reader(io.StringIO(read_utf8_text(path), newline="")))
    if not rows:
        raise DataError(f"{path}: the file is empty")
    return [h.strip() for h in rows[0]], rows[1:]


def _col(header: list[str], name: str, path: Path) -> int:
    low = [h.lower() for h in header]
    if name.lower() not in low:
        raise DataError(f"{path}:1: missing column {name!r}; the header is {', '.join(header)}")
    return low.index(name.lower())


def parse_pixels(text: str) -> tuple[np.ndarray | None, str | None]:
    """A pixels field -> uint8 ``(48, 48)`` or ``(None, reason)``."""
    try:
        vals = np.array(text.split(), dtype=np.int64)
    except ValueError:
        return None, "pixels field holds non-integer values"
    if vals.size != PIXELS:
        return None, f"pixels field has {vals.size} values, expected {PIXELS} (48x48)"
    if vals.min() < 0 or vals.max() > 255:
        return None, "pixel values outside 0..255"
    return vals.astype(np.uint8).reshape(48, 48), None


def read_fer2013(csv_path: Path) -> list[tuple[int, str, str, np.ndarray | None, str | None]]:
    """Rows of fer2013.csv: ``(lineno, emotion text, usage text, pixels or None, problem)``."""
    header, rows = _read_csv(csv_path)
    ie, ip, iu = (_col(header, c, csv_path) for c in ("emotion", "pixels", "Usage"))
    out = []
    for k, row in enumerate(rows):
        lineno = k + 2
        if not row or not "".join(row).strip():
            continue
        if len(row) <= max(ie, ip, iu):
            raise DataError(f"{csv_path}:{lineno}: expected {len(header)} fields, got {len(row)}")
        px, why = parse_pixels(row[ip])
        out.append((lineno, row[ie].strip(), row[iu].strip(), px, why))
    return out


@register_adapter("fer2013", {"train_on": "train (default) or train+valid (PublicTest joins training; no val)"})
def index_fer2013(path: Path, options: dict[str, str], seed: int) -> RecordIndex:
    """FER2013: 7 classes, 28,709 / 3,589 / 3,589 (Training / PublicTest as val / PrivateTest)."""
    train_on = opt_choice("fer2013", options, "train_on", ("train", "train+valid"), "train")
    csv_path = _find(path, ("fer2013.csv", "icml_face_data.csv"), "FER2013")
    classes = canonical_subset(FER2013_ORDER)
    records: list[Record] = []
    for row_i, (lineno, emo, usage, px, why) in enumerate(read_fer2013(csv_path)):
        where = f"{csv_path}:{lineno}"
        if not emo.isdigit() or not 0 <= int(emo) < len(FER2013_ORDER):
            raise DataError(f"{where}: emotion {emo!r} out of range 0..{len(FER2013_ORDER) - 1}")
        split = USAGES.get(usage.lower())
        if split is None:
            raise DataError(f"{where}: Usage {usage!r} is not Training, PublicTest or PrivateTest")
        if split == "val" and train_on == "train+valid":
            split = "train"
        records.append(
            Record(
                name=f"fer{row_i:07d}.png", label=classes.index(FER2013_ORDER[int(emo)]), split=split,
                pixels=px, origin=where, bad=why,
            )
        )
    return RecordIndex(
        classes, records, [csv_path],
        {"protocol": f"FER2013 Training/PublicTest/PrivateTest, train_on={train_on}, 48x48 gray"},
    )


def majority_label(votes: np.ndarray) -> int | None:
    """FERPlus majority rule on one row of 10 vote counts (8 emotions, unknown, NF).

    Votes <= 1 are removed as outliers; the top column wins only with more than half of the
    remaining votes (unknown and NF count); returns its index, or None when nobody wins or the
    winner is unknown/NF (the image is dropped).
    """
    v = np.where(votes <= 1, 0.0, votes.astype(np.float64))
    total = v.sum()
    if total <= 0:
        return None
    top = int(np.argmax(v))
    if v[top] <= 0.5 * total or top >= len(FERPLUS_ORDER):
        return None
    return top


def soft_votes(votes: np.ndarray, keep_cols: list[int]) -> np.ndarray:
    """float32 ``(K,)`` vote distribution over the kept emotion columns (votes <= 1 removed)."""
    v = np.where(votes <= 1, 0.0, votes.astype(np.float64))[keep_cols]
    return (v / v.sum()).astype(np.float32)


FERPLUS_OPTIONS = {
    "classes": "8 (default) or 7 (drop contempt images)",
    "soft_labels": "true to attach the vote distribution as soft labels (default false)",
    "train_on": "train (default) or train+valid (common practice: 28,236 training images, no val)",
}


@register_adapter("ferplus", FERPLUS_OPTIONS)
def index_ferplus(path: Path, options: dict[str, str], seed: int) -> RecordIndex:
    """FERPlus majority protocol: 8 classes 25,045 / 3,191 / 3,137 (train / valid / test)."""
    n_cls = int(opt_choice("ferplus", options, "classes", ("8", "7"), "8"))
    soft = opt_bool("ferplus", options, "soft_labels", False)
    train_on = opt_choice("ferplus", options, "train_on", ("train", "train+valid"), "train")
    new_path = _find(path, ("fer2013new.csv",), "FERPlus")
    old_path = _find(path if path.is_dir() else path.parent, ("fer2013.csv",), "FERPlus (the pixels)")
    pixel_rows = read_fer2013(old_path)
    header, rows = _read_csv(new_path)
    i_usage, i_name = _col(header, "Usage", new_path), _col(header, "Image name", new_path)
    vote_cols = [_col(header, c, new_path) for c in (*FERPLUS_ORDER, "unknown", "NF")]
    rows = [(k + 2, r) for k, r in enumerate(rows) if r and "".join(r).strip()]
    if len(rows) != len(pixel_rows):
        raise DataError(
            f"{new_path} has {len(rows)} rows but {old_path} has {len(pixel_rows)}; FERPlus rows must be "
            "aligned one-to-one with fer2013.csv"
        )
    names_kept = FERPLUS_ORDER[:n_cls]
    classes = canonical_subset(names_kept)
    keep_cols = [FERPLUS_ORDER.index(c) for c in classes]  # vote columns in canonical order
    dropped = {"no_name": 0, "unknown_nf_or_no_majority": 0, "contempt": 0}
    records: list[Record] = []
    for (lineno, row), (old_line, _, usage_old, px, why) in zip(rows, pixel_rows, strict=True):
        where = f"{new_path}:{lineno}"
        if len(row) <= max(i_usage, i_name, *vote_cols):
            raise DataError(f"{where}: expected {len(header)} fields, got {len(row)}")
        usage = row[i_usage].strip()
        split = split_name(usage)
        if split is None:
            raise DataError(f"{where}: Usage {usage!r} is not Training, PublicTest or PrivateTest")
        if usage.lower() != usage_old.lower():
            raise DataError(f"{where}: Usage {usage!r} differs from {usage_old!r} in {old_path}; the files are not aligned")
        name = row[i_name].strip()
        if not name:
            dropped["no_name"] += 1
            continue
        try:
            votes = np.array([float(row[c]) for c in vote_cols])
        except ValueError:
            raise DataError(f"{where}: vote counts must be numbers, got {[row[c] for c in vote_cols]}") from None
        if (votes < 0).any():
            raise DataError(f"{where}: negative vote count")
        top = majority_label(votes)
        if top is None:
            dropped["unknown_nf_or_no_majority"] += 1
            continue
        if FERPLUS_ORDER[top] not in classes:
            dropped["contempt"] += 1
            continue
        if split == "val" and train_on == "train+valid":
            split = "train"
        records.append(
            Record(
                name=name, label=classes.index(FERPLUS_ORDER[top]), split=split, pixels=px, origin=where,
                bad=None if why is None else f"{old_path}:{old_line}: {why}",
                soft=soft_votes(votes, keep_cols) if soft else None,
            )
        )
    return RecordIndex(
        classes, records, [new_path, old_path],
        {
            "protocol": f"FERPlus majority vote, {n_cls} classes, train_on={train_on}, soft_labels={soft}",
            "dropped_rows": dropped,
        },
    )
