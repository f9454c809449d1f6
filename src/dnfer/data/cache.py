"""The prepared cache: images decoded, cropped and resized once into a sharded uint8 store.

Layout of a cache folder::

    dnfer_cache.json     manifest: format/version, build parameters, source fingerprint,
                         class names, split row ranges, shards (file, rows, sha256), dataset
                         meta (protocol, skipped)
    index.npz            names (str), labels (int64), split (int8: 0 train, 1 val, 2 test),
                         optional soft_labels (float32 (N, K)) and true_labels (int64)
    sources.txt.gz       the files and folders whose size/mtime make the source fingerprint
    shard_00000.u8 ...   raw C-order uint8 rows ``(rows, S, S, 3)``; ``np.memmap(f, np.uint8,
                         "r", shape=(rows, S, S, 3))`` maps one

Rows are stored train, then val, then test, so a split is a contiguous row range.
:class:`ShardedImages` reads a batch with one ``preadv`` per run of consecutive rows instead of
mapping the files: mapped pages that were touched count in the process's RSS until the kernel
needs them back, while ``pread`` leaves them in the page cache only, so RSS stays flat whatever
the dataset size (measured in docs/performance.md).

Writes are atomic: the cache is built in a temporary sibling folder and renamed into place, and
the manifest is written last, so a half-built folder is never mistaken for a cache.

Integrity: the manifest records each shard's sha256, computed while it is written, and
:func:`open_cache` checks every shard's size and sha256 once when a process opens the cache (not
on each read: batches read scattered rows; the check costs about 1 s per GB on the 2-core CPU,
docs/reliability.md §7). Caches written before the checksums were added open without it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dnfer.data.base import FERDataset, Split
from dnfer.data.records import (
    COMMON_OPTIONS,
    INDEXERS,
    SPLITS,
    Record,
    RecordIndex,
    bad_files_error,
    build_index,
    check_options,
    common_options,
    decode_records,
    split_meta,
)
from dnfer.data.spec import DataSpec, load_data_spec
from dnfer.errors import DataError
from dnfer.io_safety import sweep_temporaries

FORMAT = "dnfer-cache"
VERSION = 1
MANIFEST = "dnfer_cache.json"
DEFAULT_SHARD_SIZE = 4096
try:  # the most buffers one preadv call takes
    _IOV_MAX = max(int(os.sysconf("SC_IOV_MAX")), 1)
except (AttributeError, ValueError, OSError):  # pragma: no cover - platforms without it
    _IOV_MAX = 1024

Log = Callable[[str], None]


# --- reading ------------------------------------------------------------------------------------


class ShardedImages:
    """Read-only uint8 ``(N, S, S, 3)`` image store over the shard files of a cache.

    Satisfies ``ImageArray``: ``len``, ``shape`` and ``store[int_array] -> (k, S, S, 3)``
    (also an int -> ``(S, S, 3)`` and a slice). Rows ``start..stop`` of the concatenated shards
    are exposed, so each split is a view without index arrays. File descriptors are opened per
    process (a forked DataLoader worker reopens them), so it is safe to share.
    """

    def __init__(self, files: list[Path], rows: list[int], image_size: int, start: int = 0, stop: int | None = None):
        self.files = [Path(f) for f in files]
        self.rows = list(rows)
        self.image_size = image_size
        self.bounds = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)
        total = int(self.bounds[-1])
        self.start = start
        self.stop = total if stop is None else stop
        if not 0 <= self.start <= self.stop <= total:
            raise ValueError(f"row range {start}..{stop} outside 0..{total}")
        self.row_bytes = image_size * image_size * 3
        self.shape = (self.stop - self.start, image_size, image_size, 3)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.shape[0]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = {}
        return state

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in getattr(self, "_fds", {}).values():
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._fds = {}

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: never share a parent's descriptors
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self.files[shard], os.O_RDONLY)
            self._fds[shard] = fd
        return fd

    def _read_rows(self, shard: int, row: int, rows: list[np.ndarray]) -> None:
        """Read consecutive rows ``row, row + 1, ...`` of ``shard`` into the buffers ``rows``
        (one C-contiguous row each, anywhere in memory): one scattering ``preadv`` per
        ``IOV_MAX`` rows, so the bytes go from the page cache straight to their final place."""
        views = [memoryview(r.reshape(-1)).cast("B") for r in rows]
        offset = row * self.row_bytes
        fd = self._fd(shard)
        while views:
            if hasattr(os, "preadv"):
                n = os.preadv(fd, views[:_IOV_MAX], offset)
            else:  # pragma: no cover - non-Linux
                data = os.pread(fd, len(views[0]), offset)
                n = len(data)
                views[0][:n] = data
            if n <= 0:
                raise DataError(f"cache shard {self.files[shard]} is shorter than its manifest says; rebuild the cache")
            offset += n
            while n and views:  # drop what was filled; a short read leaves the rest of a row
                take = min(n, len(views[0]))
                views[0] = views[0][take:]
                n -= take
                if not len(views[0]):
                    views.pop(0)

    def _index(self, index: Any) -> np.ndarray:
        idx = np.asarray(index, dtype=np.int64)
        if idx.ndim != 1:
            raise IndexError("cache images take a 1-D index array")
        n = len(self)
        idx = np.where(idx < 0, idx + n, idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"index out of range for {n} images")
        return idx

    def read_into(self, index: Any, out: np.ndarray) -> np.ndarray:
        """Fill uint8 ``out`` ``(k, S, S, 3)`` (C-contiguous, e.g. a pinned buffer's numpy view)
        with rows ``index``, in ``index`` order; returns ``out``.

        The file is read in ascending row order (runs of consecutive rows with one call) and each
        row lands directly in its place in ``out``: no staging buffer, no permutation copy.
        """
        idx = self._index(index)
        s = self.image_size
        if out.shape != (len(idx), s, s, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError(f"read_into needs a C-contiguous uint8 ({len(idx)}, {s}, {s}, 3) array, "
                             f"got {out.dtype} {out.shape}")
        if not len(idx):
            return out
        g = idx + self.start
        order = np.argsort(g, kind="stable")
        gs = g[order]
        shard_of = np.searchsorted(self.bounds, gs, side="right") - 1
        breaks = np.flatnonzero((np.diff(gs) != 1) | (np.diff(shard_of) != 0)) + 1
        for a, b in zip(np.r_[0, breaks], np.r_[breaks, len(gs)], strict=True):
            sh = int(shard_of[a])
            self._read_rows(sh, int(gs[a] - self.bounds[sh]), [out[k] for k in order[a:b]])
        return out

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, (int, np.integer)):
            return self[np.array([index])][0]
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        idx = np.asarray(index, dtype=np.int64)  # read_into validates it (1-D, in range)
        s = self.image_size
        return self.read_into(idx, np.empty((idx.shape[0] if idx.ndim else 0, s, s, 3), np.uint8))

    def view(self, start: int, stop: int) -> ShardedImages:
        """Rows ``start..stop`` of this store as a new store (shares nothing mutable)."""
        return ShardedImages(self.files, self.rows, self.image_size, self.start + start, self.start + stop)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    f = path / MANIFEST
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def file_sha256(path: Path, chunk: int = 8 * 1024**2) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk``-byte pieces."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def verify_shards(path: Path, shards: list[dict[str, Any]], image_size: int) -> None:
    """Check each shard's size and (when the manifest has it) sha256. Raises DataError naming the
    first damaged shard. Shards are hashed on up to 4 threads (hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    row_bytes = image_size * image_size * 3
    for s in shards:
        f = path / s["file"]
        try:
            size = f.stat().st_size
        except OSError:
            raise DataError(f"cache shard {f} is missing; rebuild the cache with `dnfer prepare --rebuild`") from None
        if size != s["rows"] * row_bytes:
            raise DataError(f"cache shard {f} has {size} bytes, its manifest says {s['rows'] * row_bytes}; "
                            "rebuild the cache with `dnfer prepare --rebuild`")
    hashed = [s for s in shards if "sha256" in s]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(hashed)))) as pool:
        digests = list(pool.map(lambda s: file_sha256(path / s["file"]), hashed))
    for s, got in zip(hashed, digests, strict=True):
        if got != s["sha256"]:
            raise DataError(f"cache shard {path / s['file']} fails its checksum (sha256 differs from the manifest's): "
                            "the file is damaged; rebuild the cache with `dnfer prepare --rebuild`")


def open_cache(path: Path, *, verify: bool = True) -> FERDataset:
    """Open a built cache as a FERDataset whose images stay on disk (RAM independent of N).

    ``verify`` checks every shard's size and sha256 first (see the module doc).
    """
    path = Path(path)
    m = _read_manifest(path)
    if m is None:
        raise DataError(f"{path} is not a dnfer cache (no valid {MANIFEST}); build one with `dnfer prepare`")
    if m.get("version") != VERSION:
        raise DataError(f"{path}: cache format version {m.get('version')} is not {VERSION}; rebuild it with `dnfer prepare --rebuild`")
    if verify:
        verify_shards(path, m["shards"], m["params"]["image_size"])
    try:
        with np.load(path / "index.npz", allow_pickle=False) as z:
            names = [str(x) for x in z["names"]]
            labels = z["labels"]
            soft = z["soft_labels"] if "soft_labels" in z.files else None
            true = z["true_labels"] if "true_labels" in z.files else None
        store = ShardedImages([path / s["file"] for s in m["shards"]], [s["rows"] for s in m["shards"]],
                              m["params"]["image_size"])
        splits: dict[str, Split] = {}
        for name, (a, b) in m["ranges"].items():
            splits[name] = Split(
                images=store.view(a, b), labels=labels[a:b], names=names[a:b],
                true_labels=None if true is None else true[a:b],
                soft_labels=None if soft is None else soft[a:b],
            )
        meta = dict(m.get("meta", {}))
        meta["cache"] = {"path": str(path), "built": m.get("created"), "bytes": m.get("bytes")}
        return FERDataset(list(m["class_names"]), splits["train"], splits["test"], splits.get("val"), meta)
    except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: the cache index is corrupt ({type(e).__name__}: {e}); "
                        "rebuild it with `dnfer prepare --rebuild`") from None


# --- fingerprints -------------------------------------------------------------------------------


def _stat_line(p: str) -> str:
    try:
        st = os.stat(p)
    except OSError:
        return f"{p}\tmissing"
    return f"{p}\t{st.st_size}\t{st.st_mtime_ns}"


def source_paths(index: RecordIndex) -> list[str]:
    """Metadata files, every image file and every folder holding one (a new or removed file
    changes its folder's mtime)."""
    files = [r.file for r in index.records if r.file is not None]
    dirs = sorted({os.path.dirname(f) for f in files})
    return [str(p) for p in index.sources] + dirs + files


def fingerprint(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(_stat_line(p).encode())
        h.update(b"\n")
    return h.hexdigest()


def build_params(spec: DataSpec, image_size: int, seed: int, uses_seed: bool) -> dict[str, Any]:
    """What the cache content depends on besides the source files."""
    return {
        "dataset": spec.name,
        "path": None if spec.path is None else str(Path(spec.path).resolve()),
        "options": {k: v for k, v in sorted(spec.options.items()) if k not in COMMON_OPTIONS},
        "image_size": int(image_size),
        "seed": int(seed) if uses_seed else None,
    }


# --- writing ------------------------------------------------------------------------------------


class CacheWriter:
    """Append uint8 ``(k, S, S, 3)`` batches into shard files of ``shard_size`` rows."""

    def __init__(self, folder: Path, image_size: int, shard_size: int = DEFAULT_SHARD_SIZE) -> None:
        if shard_size < 1:
            raise ValueError("shard_size must be >= 1")
        self.folder, self.image_size, self.shard_size = Path(folder), image_size, shard_size
        self.shards: list[dict[str, Any]] = []
        self._f: Any = None
        self._hash: Any = None  # sha256 of the open shard's bytes so far
        self.bytes = 0

    def append(self, images: np.ndarray) -> None:
        s = self.image_size
        if images.dtype != np.uint8 or images.shape[1:] != (s, s, 3):
            raise ValueError(f"expected uint8 (k, {s}, {s}, 3), got {images.dtype} {images.shape}")
        i = 0
        while i < len(images):
            if self._f is None or self.shards[-1]["rows"] == self.shard_size:
                self._roll()
            k = min(self.shard_size - self.shards[-1]["rows"], len(images) - i)
            data = np.ascontiguousarray(images[i : i + k]).tobytes()
            self._f.write(data)
            self._hash.update(data)
            self.shards[-1]["rows"] += k
            self.bytes += k * s * s * 3
            i += k

    def _roll(self) -> None:
        self.close()
        name = f"shard_{len(self.shards):05d}.u8"
        self._f = open(self.folder / name, "wb")  # noqa: SIM115 - closed in _roll/close
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "rows": 0})

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
            self.shards[-1]["sha256"] = self._hash.hexdigest()


def write_cache(
    tmp: Path,
    *,
    class_names: list[str],
    names: list[str],
    labels: np.ndarray,
    splits: np.ndarray,
    writer: CacheWriter,
    params: dict[str, Any],
    sources: list[str],
    meta: dict[str, Any],
    soft_labels: np.ndarray | None = None,
    true_labels: np.ndarray | None = None,
    seconds: float = 0.0,
) -> None:
    """Write index, sources and (last) the manifest of a cache whose shards ``writer`` wrote.

    ``splits`` is int8 ``(N,)`` (0 train, 1 val, 2 test), non-decreasing.
    """
    writer.close()
    if len(splits) and np.any(np.diff(splits) < 0):
        raise ValueError("cache rows must be ordered train, val, test")
    arrays: dict[str, np.ndarray] = {
        "names": np.array(names, dtype=str) if names else np.zeros(0, "<U1"),
        "labels": np.asarray(labels, np.int64),
        "split": np.asarray(splits, np.int8),
    }
    if soft_labels is not None:
        arrays["soft_labels"] = np.asarray(soft_labels, np.float32)
    if true_labels is not None:
        arrays["true_labels"] = np.asarray(true_labels, np.int64)
    np.savez(tmp / "index.npz", **arrays)
    with gzip.open(tmp / "sources.txt.gz", "wt") as f:
        f.write("\n".join(sources))
    ranges = {}
    for code, name in enumerate(SPLITS):
        rows = np.flatnonzero(arrays["split"] == code)
        if len(rows) or name != "val":
            ranges[name] = [int(rows[0]), int(rows[-1]) + 1] if len(rows) else [0, 0]
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "params": params,
        "fingerprint": fingerprint(sources),
        "class_names": class_names,
        "ranges": ranges,
        "shards": writer.shards,
        "bytes": writer.bytes,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "build_seconds": round(seconds, 2),
        "meta": meta,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"cache path {out} exists and is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and _read_manifest(out) is None:
        raise DataError(
            f"{out} exists, is not empty and is not a dnfer cache (no {MANIFEST}); refusing to overwrite it, "
            "choose a new or empty folder"
        )


def _install(tmp: Path, out: Path) -> None:
    """Atomically move the built ``tmp`` to ``out`` (replacing an old cache or empty folder)."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
        else:
            out.rmdir()
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_cache(
    spec: DataSpec,
    *,
    image_size: int,
    out: Path,
    seed: int,
    skip_bad: bool,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    log: Log | None = None,
    progress: bool = False,
) -> Path:
    """Decode ``spec`` once into a cache at ``out`` (atomically); returns ``out``.

    ``progress``: a bar over the decoded images on stderr (a terminal only; file-based adapters).

    File-based adapters are decoded record by record (in ``workers`` processes, deterministic
    order) straight into the shards, so RAM stays bounded. Other datasets (e.g. synthetic) are
    loaded with their loader and written as they come.

    Raises:
        DataError: ``out`` holds something that is not a dnfer cache, or bad images without
            ``skip_bad`` (one error listing them), or a split left empty.
    """
    out = Path(out)
    _check_target(out)
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(out.parent, out.name)  # half-built caches of killed earlier builds
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        writer = CacheWriter(tmp, image_size, shard_size)
        if spec.name in INDEXERS:
            index = build_index(spec.name, spec.path, dict(spec.options), seed)
            recs = index.records
            n_workers = workers if workers is not None else common_options(spec.options, len(recs))[0]
            if log:
                log(f"prepare: decoding {len(recs)} images at {image_size}px with {n_workers} worker(s)")
            keep = np.ones(len(recs), bool)
            bad: list[dict[str, str]] = []
            from dnfer.progress import progress_bar

            bar = progress_bar(len(recs), "prepare: decoding", enabled=progress, unit="img")
            for start, imgs, errs in decode_records(recs, image_size=image_size, workers=n_workers):
                bar.update(len(imgs))
                mask = np.ones(len(imgs), bool)
                for i, why in errs:
                    keep[i] = mask[i - start] = False
                    bad.append({"file": recs[i].where, "reason": why, "split": recs[i].split, "name": recs[i].name})
                if bad and not skip_bad:
                    continue  # keep decoding only to list every bad file in one error
                writer.append(imgs[mask])
            bar.close()
            if bad and not skip_bad:
                raise bad_files_error(bad, len(recs))
            kept: list[Record] = [r for r, k in zip(recs, keep, strict=True) if k]
            code = {s: i for i, s in enumerate(SPLITS)}
            split_codes = np.array([code[r.split] for r in kept], np.int8)
            for s in ("train", "test"):
                if not np.any(split_codes == code[s]):
                    raise DataError(f"{spec}: split {s!r} is empty after skipping {len(bad)} unreadable image(s)")
            soft = np.stack([r.soft for r in kept]) if kept and kept[0].soft is not None else None
            labels = np.array([r.label for r in kept], np.int64)
            meta = dict(index.meta)
            meta.update(dataset=spec.name, spec=str(spec), class_names=list(index.class_names), skipped=bad,
                        num_skipped=len(bad))
            meta["counts"] = {
                s: {"total": int((split_codes == code[s]).sum()),
                    "per_class": {c: int(((split_codes == code[s]) & (labels == j)).sum())
                                  for j, c in enumerate(index.class_names)}}
                for s in SPLITS if s != "val" or np.any(split_codes == code["val"])
            }
            params = build_params(spec, image_size, seed, index.uses_seed)
            write_cache(
                tmp, class_names=list(index.class_names), names=[r.name for r in kept], labels=labels,
                splits=split_codes, writer=writer, params=params, sources=source_paths(index), meta=meta,
                soft_labels=soft, seconds=time.perf_counter() - t0,
            )
        else:
            ds = load_data_spec(spec, image_size=image_size, seed=seed, skip_bad=skip_bad)
            _write_dataset(tmp, ds, writer, build_params(spec, image_size, seed, True), time.perf_counter() - t0)
        _install(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_dataset(tmp: Path, ds: FERDataset, writer: CacheWriter, params: dict[str, Any], seconds: float) -> None:
    """Write an already loaded dataset (datasets without a file index)."""
    parts = [(i, sp) for i, (name, sp) in enumerate(zip(SPLITS, (ds.train, ds.val, ds.test), strict=True)) if sp is not None]
    for _, sp in parts:
        for a in range(0, len(sp), 1024):
            writer.append(np.asarray(sp.images[np.arange(a, min(a + 1024, len(sp)))], np.uint8))
    has_soft = all(sp.soft_labels is not None for _, sp in parts)
    has_true = all(sp.true_labels is not None for _, sp in parts)
    meta = dict(ds.meta)
    meta["counts"] = split_meta(ds.class_names, {SPLITS[i]: sp for i, sp in parts})
    write_cache(
        tmp, class_names=list(ds.class_names), names=[n for _, sp in parts for n in sp.names],
        labels=np.concatenate([sp.labels for _, sp in parts]),
        splits=np.concatenate([np.full(len(sp), i, np.int8) for i, sp in parts]), writer=writer, params=params,
        sources=[], meta=meta,
        soft_labels=np.concatenate([sp.soft_labels for _, sp in parts]) if has_soft else None,
        true_labels=np.concatenate([sp.true_labels for _, sp in parts]) if has_true else None,
        seconds=seconds,
    )


def cache_status(spec: DataSpec, *, image_size: int, cache_dir: Path, seed: int) -> str:
    """``"valid"`` or the reason the cache at ``cache_dir`` must be (re)built. Raises DataError
    when the folder holds something that is not a dnfer cache."""
    cache_dir = Path(cache_dir)
    if spec.name in INDEXERS:  # a typo in an option is an error, not a reason to rebuild
        check_options(spec.name, spec.options, INDEXERS[spec.name][1])
    if not cache_dir.exists() or (cache_dir.is_dir() and not any(cache_dir.iterdir())):
        return "no cache yet"
    _check_target(cache_dir)
    m = _read_manifest(cache_dir)
    assert m is not None
    if m.get("version") != VERSION:
        return f"cache format version {m.get('version')} differs from {VERSION}"
    uses_seed = m["params"].get("seed") is not None
    want = build_params(spec, image_size, seed, uses_seed)
    for key, value in want.items():
        if m["params"].get(key) != value:
            return f"parameter {key} changed ({m['params'].get(key)!r} -> {value!r})"
    try:
        with gzip.open(cache_dir / "sources.txt.gz", "rt") as f:
            text = f.read()
    except OSError:
        return "the source list is unreadable"
    sources = text.split("\n") if text else []
    if fingerprint(sources) != m.get("fingerprint"):
        return "the source files changed (a list file or image was modified, added or removed)"
    return "valid"


def load_or_build_cache(
    spec: DataSpec,
    *,
    image_size: int,
    cache_dir: Path,
    seed: int,
    skip_bad: bool,
    rebuild: bool = False,
    log: Log | None = print,
) -> FERDataset:
    """Reuse the cache at ``cache_dir`` when it matches ``spec`` and the parameters, else (re)build it.

    A cache built with ``skip_bad`` that skipped files is refused when ``skip_bad`` is False
    (the same error as decoding directly would give).
    """
    cache_dir = Path(cache_dir)
    status = "rebuild requested" if rebuild else cache_status(spec, image_size=image_size, cache_dir=cache_dir, seed=seed)
    if status != "valid":
        if log:
            log(f"cache {cache_dir}: building ({status})")
        build_cache(spec, image_size=image_size, out=cache_dir, seed=seed, skip_bad=skip_bad, log=log)
    elif log:
        log(f"cache {cache_dir}: reusing")
    ds = open_cache(cache_dir)
    skipped = ds.meta.get("skipped") or []
    if skipped and not skip_bad:
        total = sum(len(sp) for sp in ds.splits().values()) + len(skipped)
        raise bad_files_error(skipped, total)
    ds.meta["cache"]["status"] = "reused" if status == "valid" else f"built ({status})"
    return ds
