"""The record index every file-based adapter produces, and its materialisation into a FERDataset.

An adapter only *reads its metadata* (list files, CSVs, folder trees) into a
:class:`RecordIndex`: one :class:`Record` per image with its name, label, split and where its
pixels are (a file, optionally a crop box, or inline pixels). Decoding is done here, once, by
:func:`materialize` (into RAM) or by :mod:`dnfer.data.cache` (into the prepared cache); both use
:func:`dnfer.data.decode.decode_image`, so both give identical pixels.

``register_adapter`` registers the adapter twice: its index function in :data:`INDEXERS` (the
cache builder needs the records, not decoded arrays) and a ``DatasetLoader`` in ``DATASETS``.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dnfer.data.base import FERDataset, Split, class_counts
from dnfer.data.classes import CANONICAL_CLASSES, canonical_name, class_key, is_expression_list
from dnfer.data.decode import Box, DecodeError, decode_image
from dnfer.errors import ConfigError, DataError, choices_text
from dnfer.registry import DATASETS

#: Split names in the order records (and cache rows) are stored.
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Options every file-based adapter accepts besides its own.
COMMON_OPTIONS: dict[str, str] = {
    "workers": "decode processes (default: 1 below 2000 images, else the CPU count, at most 8)",
    "max_ram_gb": "refuse to decode more than this many GiB into RAM without --cache (default 8)",
}
#: How many bad files an error message lists before "and N more".
MAX_LISTED = 20

#: Image file extensions (lower case) dataset folders and ``dnfer predict`` take: what Pillow decodes.
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)


@dataclass
class Record:
    """One image of a dataset before decoding.

    Attributes:
        name: the sample name as the dataset spells it (unique per split).
        label: index into the index's ``class_names``.
        split: ``train``, ``val`` or ``test``.
        file: absolute image path, or None for inline pixels.
        pixels: inline pixels (e.g. FER2013's ``(48, 48)`` uint8 rows), or None.
        box: face box ``(x, y, w, h)`` in source pixels, or None.
        soft: float32 ``(K,)`` label distribution summing to 1, or None.
        origin: where the record came from, ``"file:line"``, for messages.
        bad: a problem found while indexing (e.g. a malformed pixel row): the record is an
            unreadable image, reported (or skipped with ``--skip-bad``) like a corrupt file.
    """

    name: str
    label: int
    split: str
    file: str | None = None
    pixels: np.ndarray | None = None
    box: Box | None = None
    soft: np.ndarray | None = None
    origin: str = ""
    bad: str | None = None

    @property
    def where(self) -> str:
        """The file (or file:line for inline pixels) a message should name."""
        return self.file if self.file is not None else self.origin


@dataclass
class RecordIndex:
    """What an adapter read from a dataset's metadata.

    Attributes:
        class_names: the dataset's classes: canonical names in canonical order for expression
            classes, else the names as written in ImageFolder order (``classes.order_class_names``).
        records: one per image (any split order; :func:`validate_index` sorts them).
        sources: metadata files the records were read from (list files, CSVs); with the image
            files and their folders they make the cache's source fingerprint.
        meta: protocol description, dropped-row counts, etc. (goes into ``FERDataset.meta``).
        uses_seed: the split assignment depends on the seed (a seeded ratio split).
    """

    class_names: list[str]
    records: list[Record]
    sources: list[Path] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    uses_seed: bool = False


IndexFn = Callable[[Path, dict[str, str], int], RecordIndex]
#: name -> (index function, the adapter's own option keys with help).
INDEXERS: dict[str, tuple[IndexFn, dict[str, str]]] = {}


# --- options ----------------------------------------------------------------------------------


def check_options(dataset: str, options: dict[str, str], valid: dict[str, str]) -> None:
    """Raise ConfigError for an option key the adapter does not know."""
    allowed = {**valid, **COMMON_OPTIONS}
    for key in options:
        if key not in allowed:
            raise ConfigError(
                f"--data-option {key!r} is not an option of dataset {dataset!r}; valid keys: "
                + "; ".join(f"{k} ({v})" for k, v in sorted(allowed.items()))
            )


def opt_choice(dataset: str, options: dict[str, str], key: str, choices: Sequence[str], default: str) -> str:
    value = options.get(key, default).strip().lower()
    if value not in choices:
        raise ConfigError(f"--data-option {key}={value!r} for {dataset!r}: valid values are {', '.join(choices)}")
    return value


def opt_bool(dataset: str, options: dict[str, str], key: str, default: bool) -> bool:
    value = options.get(key, "true" if default else "false").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"--data-option {key}={value!r} for {dataset!r}: expected true or false")


def opt_float(dataset: str, options: dict[str, str], key: str, default: float, lo: float, hi: float) -> float:
    text = options.get(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--data-option {key}={text!r} for {dataset!r} is not a number") from None
    if not lo <= value < hi:
        raise ConfigError(f"--data-option {key}={text!r} for {dataset!r} must lie in [{lo:g}, {hi:g})")
    return value


def common_options(options: dict[str, str], n_images: int) -> tuple[int, float]:
    """``(workers, max_ram_bytes)`` from the common options."""
    w = options.get("workers", "auto").strip().lower()
    if w == "auto":
        workers = 1 if n_images < 2000 else min(os.cpu_count() or 1, 8)
    elif w.isdigit() and int(w) >= 1:
        workers = int(w)
    else:
        raise ConfigError(f"--data-option workers={w!r}: expected a positive integer or auto")
    try:
        gb = float(options.get("max_ram_gb", "8"))
    except ValueError:
        raise ConfigError(f"--data-option max_ram_gb={options['max_ram_gb']!r} is not a number") from None
    return workers, gb * 2**30


# --- registration -----------------------------------------------------------------------------


def register_adapter(name: str, valid_options: dict[str, str]) -> Callable[[IndexFn], IndexFn]:
    """Register an index function as adapter ``name`` (in INDEXERS and as a DATASETS loader)."""

    def add(index_fn: IndexFn) -> IndexFn:
        INDEXERS[name] = (index_fn, valid_options)

        def loader(
            path: Path | None, *, image_size: int, options: dict[str, str], seed: int, skip_bad: bool
        ) -> FERDataset:
            index = build_index(name, path, options, seed)
            workers, max_bytes = common_options(options, len(index.records))
            ds = materialize(index, image_size=image_size, skip_bad=skip_bad, workers=workers, max_bytes=max_bytes)
            ds.meta["dataset"] = name
            return ds

        loader.__doc__ = index_fn.__doc__
        loader.__name__ = f"load_{name}"
        DATASETS.register(name)(loader)
        return index_fn

    return add


def build_index(name: str, path: Path | None, options: dict[str, str], seed: int) -> RecordIndex:
    """Run adapter ``name``'s index function on ``path`` and validate the result."""
    if name not in INDEXERS:
        raise ConfigError(f"dataset {name!r} has no file index; file-based datasets: {choices_text(list(INDEXERS))}")
    index_fn, valid = INDEXERS[name]
    check_options(name, options, valid)
    if path is None:
        raise ConfigError(f"dataset {name!r} needs a path, as --data {name}:PATH")
    own = {k: v for k, v in options.items() if k not in COMMON_OPTIONS}
    # Absolute paths: the cache's source fingerprint must not depend on the working directory.
    index = index_fn(Path(os.path.abspath(path)), own, seed)
    validate_index(index, where=f"{name}:{path}")
    return index


def seeded_split(records: list[Record], *, num_classes: int, val_ratio: float, test_ratio: float, seed: int) -> None:
    """Assign ``split`` to every record: per class (stratified), a seeded shuffle, then the
    first ``round(n * test_ratio)`` go to test and the next ``round(n * val_ratio)`` to val (at
    least one each when the ratio is positive and the class has >= 2 images, never all)."""
    rng = np.random.default_rng(seed)
    labels = np.array([r.label for r in records], np.int64)
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        n = len(members)
        n_test = int(round(n * test_ratio)) if n >= 2 else 0
        n_val = int(round(n * val_ratio)) if n >= 3 else 0
        if test_ratio > 0 and n >= 2:
            n_test = max(n_test, 1)
        if val_ratio > 0 and n >= 3:
            n_val = max(n_val, 1)
        while n_test + n_val >= n and (n_test > 0 or n_val > 0):  # keep >= 1 training image
            if n_val > 0:
                n_val -= 1
            else:
                n_test -= 1
        for j, i in enumerate(members):
            records[i].split = "test" if j < n_test else ("val" if j < n_test + n_val else "train")


def split_name(text: str) -> str | None:
    """``train``/``val``/``test`` for a split folder or column value (common spellings), else None."""
    t = text.strip().lower()
    return {
        "train": "train", "training": "train",
        "val": "val", "valid": "val", "validation": "val", "publictest": "val",
        "test": "test", "testing": "test", "privatetest": "test",
    }.get(t)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


# --- validation -------------------------------------------------------------------------------


def canonical_subset(names: Iterable[str]) -> list[str]:
    """The canonical classes among ``names``, in canonical order."""
    present = {canonical_name(n) for n in names}
    return [c for c in CANONICAL_CLASSES if c in present]


def validate_index(index: RecordIndex, *, where: str, required: Sequence[str] = ("train", "test")) -> None:
    """Check splits, labels and name uniqueness; sort records by split (stable). Raises DataError."""
    k = len(index.class_names)
    by_split: dict[str, list[Record]] = {s: [] for s in SPLITS}
    for r in index.records:
        if r.split not in by_split:
            raise DataError(f"{r.origin or where}: unknown split {r.split!r}; valid: {', '.join(SPLITS)}")
        if not 0 <= r.label < k:  # adapters map labels by name; this guards their bugs
            raise DataError(f"{r.origin or where}: label index {r.label} outside 0..{k - 1}")
        by_split[r.split].append(r)
    for split, recs in by_split.items():
        seen: dict[str, Record] = {}
        dups: list[str] = []
        for r in recs:
            if r.name in seen:
                dups.append(f"{r.name!r} ({seen[r.name].origin or seen[r.name].where} and {r.origin or r.where})")
            else:
                seen[r.name] = r
        if dups:
            more = f" and {len(dups) - MAX_LISTED} more" if len(dups) > MAX_LISTED else ""
            raise DataError(
                f"{where}: {len(dups)} duplicate sample name(s) in split {split!r}: "
                + "; ".join(dups[:MAX_LISTED]) + more + "; names must be unique per split"
            )
    for split in required:
        if not by_split[split]:
            raise DataError(f"{where}: split {split!r} is empty (no usable images found)")
    index.records = [r for s in SPLITS for r in by_split[s]]


# --- decoding ---------------------------------------------------------------------------------


def _decode_chunk(
    items: list[tuple[Any, Box | None, str | None]], size: int
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode ``items`` into uint8 ``(k, size, size, 3)``; bad ones are zero rows listed in errors."""
    out = np.zeros((len(items), size, size, 3), np.uint8)
    errors: list[tuple[int, str]] = []
    for j, (src, box, known_bad) in enumerate(items):
        if known_bad is not None:
            errors.append((j, known_bad))
            continue
        try:
            out[j] = decode_image(src, size=size, box=box)
        except DecodeError as e:
            errors.append((j, e.reason))
    return out, errors


def decode_records(
    records: Sequence[Record], *, image_size: int, workers: int = 1, chunk: int = 256
) -> Iterator[tuple[int, np.ndarray, list[tuple[int, str]]]]:
    """Decode records in order, in chunks: yields ``(start, images (k,S,S,3), [(i, reason)])``.

    With ``workers > 1`` chunks go to a process pool with a bounded number in flight (so RAM
    stays bounded); results are yielded in record order, so the output is deterministic.
    """
    items = [(r.file if r.file is not None else r.pixels, r.box, r.bad) for r in records]
    starts = list(range(0, len(items), chunk))
    if workers <= 1 or len(starts) <= 1:
        for s in starts:
            imgs, errs = _decode_chunk(items[s : s + chunk], image_size)
            yield s, imgs, [(s + j, why) for j, why in errs]
        return
    # forkserver: forking a process that already runs torch's threads can deadlock the child.
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else None)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: list[tuple[int, Future]] = []
        it = iter(starts)
        for s in it:
            pending.append((s, pool.submit(_decode_chunk, items[s : s + chunk], image_size)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            s, fut = pending.pop(0)
            imgs, errs = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(_decode_chunk, items[nxt : nxt + chunk], image_size)))
            yield s, imgs, [(s + j, why) for j, why in errs]


def bad_files_error(bad: Sequence[dict[str, str]], total: int) -> DataError:
    """ONE error listing the undecodable files (first MAX_LISTED) and the ``--skip-bad`` hint."""
    listed = "; ".join(f"{b['file']} ({b['reason']})" for b in bad[:MAX_LISTED])
    more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return DataError(
        f"{len(bad)} of {total} images cannot be read: {listed}{more}; fix or remove them, "
        "or pass --skip-bad to skip them (they are then counted and listed in the run directory)"
    )


def split_meta(class_names: Sequence[str], splits: dict[str, Split]) -> dict[str, Any]:
    """``{split: {"total": n, "per_class": {name: n}}}`` for the run summary."""
    out: dict[str, Any] = {}
    for name, sp in splits.items():
        cc = class_counts(sp.labels, len(class_names))
        out[name] = {"total": int(len(sp)), "per_class": {c: int(n) for c, n in zip(class_names, cc, strict=True)}}
    return out


def estimate_bytes(n: int, image_size: int) -> int:
    return n * image_size * image_size * 3


def materialize(
    index: RecordIndex, *, image_size: int, skip_bad: bool, workers: int = 1, max_bytes: float = 8 * 2**30
) -> FERDataset:
    """Decode every record into RAM and build the FERDataset (records must be validated).

    Raises:
        DataError: the images would not fit ``max_bytes`` (use the prepared cache), or some
            images are bad and ``skip_bad`` is False (one error listing them all).
    """
    recs = index.records
    need = estimate_bytes(len(recs), image_size)
    if need > max_bytes:
        raise DataError(
            f"decoding {len(recs)} images at {image_size}px needs {need / 2**30:.1f} GiB of RAM, more than "
            f"max_ram_gb={max_bytes / 2**30:g}; prepare a cache once with `dnfer prepare --data SPEC "
            f"--image-size {image_size} --out DIR` and train with --cache DIR (or raise --data-option max_ram_gb)"
        )
    images = np.zeros((len(recs), image_size, image_size, 3), np.uint8)
    bad_idx: list[int] = []
    bad: list[dict[str, str]] = []
    for start, imgs, errs in decode_records(recs, image_size=image_size, workers=workers):
        images[start : start + len(imgs)] = imgs
        for i, why in errs:
            bad_idx.append(i)
            bad.append({"file": recs[i].where, "reason": why, "split": recs[i].split, "name": recs[i].name})
    if bad and not skip_bad:
        raise bad_files_error(bad, len(recs))
    keep = np.ones(len(recs), bool)
    keep[bad_idx] = False
    return assemble(index, images, keep, skipped=bad)


def assemble(index: RecordIndex, images: Any, keep: np.ndarray, *, skipped: list[dict[str, str]]) -> FERDataset:
    """Build the FERDataset from decoded ``images`` (indexable like the record list) and a keep mask."""
    recs = index.records
    k = len(index.class_names)
    splits: dict[str, Split] = {}
    for s in SPLITS:
        rows = np.array([i for i, r in enumerate(recs) if r.split == s and keep[i]], np.int64)
        if s == "val" and not any(r.split == "val" for r in recs):
            continue
        soft = None
        if len(rows) and recs[rows[0]].soft is not None:
            soft = np.stack([recs[i].soft for i in rows]).astype(np.float32)
        elif any(r.soft is not None for r in recs):
            soft = np.zeros((0, k), np.float32)
        if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
            sub_images = images[int(rows[0]) : int(rows[-1]) + 1]  # a view: records are sorted by split
        elif len(rows):
            sub_images = images[rows]
        else:
            sub_images = np.zeros((0, *images.shape[1:]), np.uint8)
        splits[s] = Split(
            images=sub_images,
            labels=np.array([recs[i].label for i in rows], np.int64),
            names=[recs[i].name for i in rows],
            soft_labels=soft,
        )
        if s != "val" and len(rows) == 0:
            raise DataError(f"split {s!r} is empty after skipping {len(skipped)} unreadable image(s)")
    meta = dict(index.meta)
    meta["class_names"] = list(index.class_names)
    meta["counts"] = split_meta(index.class_names, splits)
    meta["skipped"] = list(skipped)
    meta["num_skipped"] = len(skipped)
    return FERDataset(
        class_names=list(index.class_names), train=splits["train"], test=splits["test"], val=splits.get("val"), meta=meta
    )


# --- class selection --------------------------------------------------------------------------


def remap_classes(ds: FERDataset, class_names: list[str], mapping: dict[str, str]) -> FERDataset:
    """Keep/merge classes by name (the result of ``parse_class_selection``).

    Args:
        ds: the dataset in its own class space.
        class_names: the new class list (targets of ``mapping``).
        mapping: ``source class name -> target class name``; rows whose (given) class is not a
            key are dropped.

    Soft labels ``(N, K)`` become ``(N, K')`` by summing the columns merged into each target,
    then each row is renormalised to sum 1 (mass on dropped classes is removed). True labels
    whose class was dropped (possible only for a kept row with a noisy given label) become -1.
    Images are subset with ``Split.subset``, so a cache-backed split stays on disk.
    """
    expressions = is_expression_list(ds.class_names)
    src_names = [class_key(c, expressions) for c in ds.class_names]
    norm_map = {class_key(s, expressions): t for s, t in mapping.items()}
    for s, t in norm_map.items():
        if s not in src_names:
            raise ConfigError(f"--classes: class {s!r} is not in this dataset; its classes are {', '.join(src_names)}")
        if t not in class_names:
            raise ConfigError(f"--classes: target {t!r} is not in the class list {class_names}")
    lut = np.array([class_names.index(norm_map[c]) if c in norm_map else -1 for c in src_names], np.int64)
    merge = np.zeros((len(src_names), len(class_names)), np.float32)
    for i in range(len(src_names)):
        if lut[i] >= 0:
            merge[i, lut[i]] = 1.0

    def one(sp: Split) -> Split:
        rows = np.flatnonzero(lut[sp.labels] >= 0)
        sub = sp.subset(rows)
        sub.labels = lut[sub.labels]
        if sub.true_labels is not None:
            t = sub.true_labels
            sub.true_labels = np.where(t >= 0, lut[np.maximum(t, 0)], -1)
        if sub.soft_labels is not None:
            soft = sub.soft_labels @ merge
            tot = soft.sum(1, keepdims=True)
            sub.soft_labels = np.where(tot > 0, soft / np.where(tot > 0, tot, 1), soft).astype(np.float32)
        return sub

    splits = {"train": one(ds.train), "test": one(ds.test)}
    if ds.val is not None:
        splits["val"] = one(ds.val)
    for name in ("train", "test"):
        if len(splits[name]) == 0:
            raise DataError(f"--classes leaves the {name} split empty; classes in the data: {', '.join(src_names)}")
    meta = dict(ds.meta)
    meta["class_names"] = list(class_names)
    meta["class_mapping"] = dict(norm_map)
    meta["counts"] = split_meta(class_names, splits)
    dropped = Counter(src_names[y] for y in ds.train.labels if lut[y] < 0)
    if dropped:
        meta["dropped_by_class_selection"] = dict(dropped)
    return FERDataset(list(class_names), splits["train"], splits["test"], splits.get("val"), meta)
