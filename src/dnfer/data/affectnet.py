"""AffectNet adapter: ``--data affectnet:PATH`` (both public releases).

1. CSV release: ``Manually_Annotated_file_lists/training.csv`` and ``validation.csv`` (or the
   two files directly in PATH), columns ``subDirectory_filePath, face_x, face_y, face_width,
   face_height, facial_landmarks, expression, valence, arousal``; images under
   ``Manually_Annotated_Images/`` (also ``Manually_Annotated/Manually_Annotated_Images/``).
   The face is cropped with the box ``(face_x, face_y, face_width, face_height)``.
2. NPY release: ``train_set/images/N.jpg`` + ``train_set/annotations/N_exp.npy``, same for
   ``val_set`` (faces are already cropped).

Expression ids are in AffectNet order (0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear,
5 Disgust, 6 Anger, 7 Contempt, 8 None, 9 Uncertain, 10 No-Face) and are mapped by name onto
the canonical order. ``classes=7`` keeps 0..6, ``classes=8`` keeps 0..7; the rest are dropped
and counted. The validation set (500 per class) is the test split; there is no val split.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np

from dnfer.data.classes import AFFECTNET_ORDER
from dnfer.data.records import Record, RecordIndex, canonical_subset, opt_bool, opt_choice, register_adapter
from dnfer.errors import DataError
from dnfer.io_safety import read_utf8_text

OPTIONS = {
    "classes": "7 (default) or 8 (with contempt)",
    "crop": "true (default) to crop the CSV release's face box; false if the images are already faces",
}
#: Expression ids that are not an expression (None, Uncertain, No-Face).
NON_EXPRESSION = {8: "none", 9: "uncertain", 10: "no_face"}
CSV_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression")


def _first(paths: list[Path], kind: str) -> Path | None:
    for p in paths:
        if (p.is_file() if kind == "file" else p.is_dir()):
            return p
    return None


@register_adapter("affectnet", OPTIONS)
def index_affectnet(path: Path, options: dict[str, str], seed: int) -> RecordIndex:
    """AffectNet 7 (about 283,901 train / 3,500 test) or 8 classes (4,000 test)."""
    n_cls = int(opt_choice("affectnet", options, "classes", ("7", "8"), "7"))
    crop = opt_bool("affectnet", options, "crop", True)
    classes = canonical_subset(AFFECTNET_ORDER[:n_cls])
    lists = [path / "Manually_Annotated_file_lists", path / "Manually_Annotated" / "Manually_Annotated_file_lists", path]
    list_dir = next((d for d in lists if (d / "training.csv").is_file() and (d / "validation.csv").is_file()), None)
    if list_dir is not None:
        img_dir = _first(
            [path / "Manually_Annotated_Images", path / "Manually_Annotated" / "Manually_Annotated_Images",
             list_dir.parent / "Manually_Annotated_Images"], "dir",
        )
        if img_dir is None:
            raise DataError(f"AffectNet: found {list_dir / 'training.csv'} but no Manually_Annotated_Images/ folder under {str(path)!r}")
        index = _index_csv_release(list_dir, img_dir, classes, n_cls, crop)
    elif (path / "train_set").is_dir() and (path / "val_set").is_dir():
        index = _index_npy_release(path, classes, n_cls)
    else:
        raise DataError(
            f"AffectNet: {str(path)!r} holds neither Manually_Annotated_file_lists/training.csv + validation.csv "
            "nor train_set/ + val_set/ folders"
        )
    index.meta["protocol"] = f"AffectNet-{n_cls} ({index.meta['release']} release), validation set as test" + (
        ", face box crop" if index.meta.get("crop") else ""
    )
    return index


def _label(expr: int, n_cls: int, classes: list[str], dropped: dict[str, int]) -> int | None:
    if expr in NON_EXPRESSION:
        dropped[NON_EXPRESSION[expr]] = dropped.get(NON_EXPRESSION[expr], 0) + 1
        return None
    if expr >= n_cls:
        dropped["contempt"] = dropped.get("contempt", 0) + 1
        return None
    return classes.index(AFFECTNET_ORDER[expr])


def _parse_expr(text: str, where: str) -> int:
    t = text.strip()
    try:
        v = float(t)
    except ValueError:
        v = math.nan
    if not math.isfinite(v) or v != int(v) or not 0 <= v <= 10:
        raise DataError(f"{where}: expression {t!r} out of range 0..10 (AffectNet ids)")
    return int(v)


def _index_csv_release(list_dir: Path, img_dir: Path, classes: list[str], n_cls: int, crop: bool) -> RecordIndex:
    records: list[Record] = []
    dropped: dict[str, int] = {}
    sources = []
    for fname, split in (("training.csv", "train"), ("validation.csv", "test")):
        csv_path = list_dir / fname
        sources.append(csv_path)
        with io.StringIO(read_utf8_text(csv_path), newline="") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise DataError(f"{csv_path}:1: missing column(s) {', '.join(missing)}; expected {', '.join(CSV_COLUMNS)}")
            col = {c: header.index(c) for c in CSV_COLUMNS}
            for lineno, row in enumerate(reader, start=2):
                if not row or not "".join(row).strip():
                    continue
                where = f"{csv_path}:{lineno}"
                if len(row) < len(header):
                    raise DataError(f"{where}: expected {len(header)} fields, got {len(row)}")
                label = _label(_parse_expr(row[col["expression"]], where), n_cls, classes, dropped)
                if label is None:
                    continue
                rel = row[col["subDirectory_filePath"]].strip()
                box = None
                if crop:
                    try:
                        box = tuple(float(row[col[c]]) for c in ("face_x", "face_y", "face_width", "face_height"))
                    except ValueError:
                        raise DataError(f"{where}: face box fields must be numbers") from None
                    if not all(math.isfinite(b) for b in box) or box[2] <= 0 or box[3] <= 0:
                        raise DataError(f"{where}: face box {box} has a non-positive or missing size")
                records.append(Record(name=rel, label=label, split=split, file=str(img_dir / rel), box=box, origin=where))
    return RecordIndex(classes, records, sources, {"release": "csv", "crop": crop, "dropped_rows": dropped})


def _index_npy_release(path: Path, classes: list[str], n_cls: int) -> RecordIndex:
    records: list[Record] = []
    dropped: dict[str, int] = {}
    for sub, split in (("train_set", "train"), ("val_set", "test")):
        img_dir, ann_dir = path / sub / "images", path / sub / "annotations"
        if not img_dir.is_dir() or not ann_dir.is_dir():
            raise DataError(f"AffectNet: {str(path / sub)!r} needs images/ and annotations/ folders")
        names = sorted(os.listdir(img_dir), key=lambda n: (len(n), n))  # numeric order for N.jpg
        for name in names:
            stem = os.path.splitext(name)[0]
            ann = ann_dir / f"{stem}_exp.npy"
            if not ann.is_file():
                raise DataError(f"AffectNet: {img_dir / name} has no annotation {ann}")
            try:
                value = np.load(ann, allow_pickle=False)
                text = str(value.item() if value.ndim == 0 else value.reshape(-1)[0])
            except Exception as e:  # noqa: BLE001 - any unreadable .npy is the same user error
                raise DataError(f"{ann}: cannot read the expression ({e})") from None
            label = _label(_parse_expr(text, str(ann)), n_cls, classes, dropped)
            if label is None:
                continue
            records.append(Record(name=name, label=label, split=split, file=str(img_dir / name), origin=str(ann)))
    return RecordIndex(
        classes, records, [path / "train_set" / "annotations", path / "val_set" / "annotations"],
        {"release": "npy", "crop": False, "dropped_rows": dropped},
    )
