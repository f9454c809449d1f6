"""Data pipeline benchmark: per-file decoding vs the prepared cache, and RAM while iterating a cache.

Run:  .venv/bin/python benchmarks/data_pipeline.py [--quick] [--size 112] [--files 1000]
Results: docs/performance.md, "Data pipeline".

1. Throughput (images/s) at the training size:
   - per-file decoding (``decode_image``: open, convert, resize) of RAF-like 100x100 JPEGs and
     of AffectNet-like 640x480 JPEGs with a face-box crop, one process;
   - building a cache from the RAF-like files (1 and 2 worker processes);
   - reading shuffled batches of 128 from the cache (``ShardedImages``).
2. Peak RSS of a fresh process iterating one epoch of shuffled batches over a synthetic
   10k-image and a 100k-image cache (64 px, written directly), with the cache reader (pread)
   and, for contrast, with plain ``np.memmap`` fancy indexing.

Synthetic images are random-textured; absolute numbers depend on the machine and on other
load, so each timing is the median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import dnfer.data.folder  # noqa: F401 - registers the folder adapter
from dnfer.data.cache import CacheWriter, build_cache, open_cache, write_cache
from dnfer.data.decode import decode_image
from dnfer.data.spec import DataSpec


def make_jpegs(folder: Path, n: int, wh: tuple[int, int], seed: int = 0) -> list[Path]:
    """``n`` smooth random JPEGs (quality 90) under ``folder/train|test/happy|sad``."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        small = rng.integers(0, 256, (wh[1] // 8 + 1, wh[0] // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(wh, Image.Resampling.BILINEAR)
        split = "test" if i % 5 == 0 else "train"
        p = folder / split / ("happy" if i % 2 else "sad") / f"{i:06d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, quality=90)
        paths.append(p)
    return paths


def median_rate(fn, n: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def throughput(tmp: Path, n_files: int, size: int, repeats: int) -> dict[str, float]:
    raf = make_jpegs(tmp / "raf", n_files, (100, 100))
    aff = make_jpegs(tmp / "aff", max(n_files // 5, 20), (640, 480), seed=1)
    out: dict[str, float] = {}
    out["decode_raf_like_img_s"] = median_rate(lambda: [decode_image(p, size=size) for p in raf], len(raf), repeats)
    box = (200.0, 120.0, 240.0, 240.0)
    out["decode_affectnet_like_crop_img_s"] = median_rate(
        lambda: [decode_image(p, size=size, box=box) for p in aff], len(aff), repeats)
    spec = DataSpec("folder", tmp / "raf", {})
    for w in (1, 2):
        out[f"build_cache_{w}_workers_img_s"] = median_rate(
            lambda w=w: build_cache(spec, image_size=size, out=tmp / "cache", seed=1, skip_bad=False, workers=w),
            n_files, repeats)
    ds = open_cache(tmp / "cache")
    imgs = ds.train.images
    rng = np.random.default_rng(0)

    def epoch() -> None:
        perm = rng.permutation(len(imgs))
        for a in range(0, len(perm), 128):
            imgs[perm[a : a + 128]]

    out["cache_read_shuffled_batches_img_s"] = median_rate(epoch, len(imgs), repeats)
    return out


def synthetic_cache(folder: Path, n: int, size: int) -> Path:
    """A cache of ``n`` random images written directly (no decoding), all in the train split
    except 1% test."""
    tmp = folder / f"cache_{n}"
    tmp.mkdir(parents=True)
    w = CacheWriter(tmp, size)
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (1000, size, size, 3), dtype=np.uint8)
    for a in range(0, n, 1000):
        w.append(block[: min(1000, n - a)])
    n_test = n // 100
    splits = np.r_[np.zeros(n - n_test, np.int8), np.full(n_test, 2, np.int8)]
    write_cache(tmp, class_names=["happiness", "sadness"], names=[f"{i:07d}.jpg" for i in range(n)],
                labels=np.arange(n) % 2, splits=splits, writer=w,
                params={"dataset": "synthetic-bench", "image_size": size}, sources=[], meta={})
    return tmp


CHILD = r"""
import json, resource, sys, numpy as np
from dnfer.data.cache import open_cache
path, mode = sys.argv[1], sys.argv[2]
def rss_mb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
ds = open_cache(path)
imgs = ds.train.images
if mode == "memmap":
    m = imgs  # the same rows through np.memmap fancy indexing
    shards = [np.memmap(f, np.uint8, "r", shape=(r, m.image_size, m.image_size, 3)) for f, r in zip(m.files, m.rows)]
    bounds = m.bounds
    def get(idx):
        s = np.searchsorted(bounds, idx, side="right") - 1
        out = np.empty((len(idx), m.image_size, m.image_size, 3), np.uint8)
        for k in np.unique(s):
            sel = s == k
            out[sel] = shards[k][idx[sel] - bounds[k]]
        return out
else:
    get = imgs.__getitem__
before = rss_mb()
perm = np.random.default_rng(0).permutation(len(imgs))
total = 0
for a in range(0, len(perm), 256):
    total += int(get(perm[a:a + 256])[:, 0, 0, 0].sum())
print(json.dumps({"rss_before_mb": round(before, 1), "peak_rss_mb": round(rss_mb(), 1), "images": len(imgs)}))
"""


def rss(tmp: Path, sizes: list[int], size: int) -> dict[str, dict[str, float]]:
    out = {}
    for n in sizes:
        path = synthetic_cache(tmp, n, size)
        for mode in ("pread", "memmap"):
            r = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], capture_output=True, text=True, check=True)
            out[f"{n}_{mode}"] = json.loads(r.stdout)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=1000, help="RAF-like JPEGs for the throughput part")
    ap.add_argument("--size", type=int, default=112, help="training image size for the throughput part")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-sizes", default="10000,100000", help="cache sizes for the RSS part")
    ap.add_argument("--rss-image-size", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="tiny settings (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.files, args.repeats, args.rss_sizes = 100, 1, "1000,3000"
    with tempfile.TemporaryDirectory(prefix="dnfer-bench-") as d:
        tmp = Path(d)
        res = {"throughput": throughput(tmp, args.files, args.size, args.repeats)}
        res["rss"] = rss(tmp, [int(x) for x in args.rss_sizes.split(",")], args.rss_image_size)
    res["settings"] = vars(args)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
