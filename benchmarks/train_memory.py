"""Peak memory of `dnfer train` reading a prepared cache, for caches of different sizes.

Run:  .venv/bin/python benchmarks/train_memory.py [--sizes 10000 100000] [--image-size 64]
      [--model tiny_cnn] [--batch-size 256] [--epochs 1] [--malloc auto|system]
Results: docs/performance.md, "Memory vs dataset size".

For each size N a cache of N training images (+ ``--n-test`` test images) of random pixels is
written directly (no decoding), under the parameters of the ``synthetic`` dataset with
``n_train=N``, so ``dnfer train --data synthetic --data-option n_train=N --cache DIR`` reuses it
instead of generating faces. Then a fresh process runs that training for ``--epochs`` full
epochs (every image read and augmented, validation and test evaluated, checkpoints and
training dynamics written) and reports its peak RSS (``ru_maxrss``). The model is small
on purpose: the question is what the input pipeline and the trainer's per-sample state cost,
not the network. Last line: peak RSS of the largest size / of the smallest.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dnfer.data.cache import CacheWriter, build_params, write_cache
from dnfer.data.classes import BASIC7
from dnfer.data.spec import DataSpec

CHILD = r"""
import argparse, json, resource, sys, time
import torch
from dnfer.commands import train  # only the train command (as `dnfer train` runs it)
t0 = time.perf_counter()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
ap = argparse.ArgumentParser()
train.add_parser(ap.add_subparsers())
args = ap.parse_args(sys.argv[1:])
rc = args.run(args)
print("RESULT " + json.dumps({"rc": rc, "rss_after_import_mb": round(rss0, 1),
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "seconds": round(time.perf_counter() - t0, 1)}))
"""


def write_random_cache(folder: Path, n_train: int, n_test: int, size: int, seed: int) -> tuple[Path, dict[str, str]]:
    """A cache that ``dnfer train --data synthetic`` with the returned options will reuse."""
    options = {"n_train": str(n_train), "n_test": str(n_test)}
    out = folder / f"cache_{n_train}"
    out.mkdir(parents=True)
    writer = CacheWriter(out, size)
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (1000, size, size, 3), dtype=np.uint8)  # repeated: content does not matter
    n = n_train + n_test
    for a in range(0, n, 1000):
        writer.append(block[: min(1000, n - a)])
    labels = np.arange(n) % len(BASIC7)
    splits = np.r_[np.zeros(n_train, np.int8), np.full(n_test, 2, np.int8)]
    write_cache(out, class_names=list(BASIC7), names=[f"{i:07d}" for i in range(n)], labels=labels,
                splits=splits, writer=writer, params=build_params(DataSpec("synthetic", None, options), size, seed, True),
                sources=[], meta={"dataset": "synthetic", "note": "random pixels written by benchmarks/train_memory.py"},
                true_labels=labels)
    return out, options


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--model", default="tiny_cnn")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc", choices=["auto", "system"], default="auto",
                    help="train.malloc of the trainings (auto keeps freed memory in the process)")
    ap.add_argument("--workdir", help="where to write the caches (default: a temporary folder)")
    args = ap.parse_args()

    seed = 1
    results = []
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.sizes:
            t0 = time.perf_counter()
            cache, options = write_random_cache(Path(tmp), n, args.n_test, args.image_size, seed)
            cache_mb = sum(f.stat().st_size for f in cache.glob("*")) / 2**20
            cmd = [sys.executable, "-c", CHILD, "train", "--data", "synthetic", "--cache", str(cache),
                   "--image-size", str(args.image_size), "--model", args.model, "--batch-size", str(args.batch_size),
                   "--epochs", str(args.epochs), "--threads", str(args.threads), "--seed", str(seed), "--malloc", args.malloc,
                   # DNFER's warm-up must leave an epoch that selects
                   "--warmup-epochs", str(min(5, args.epochs - 1)),
                   "--no-progress", "--out", str(Path(tmp) / f"run_{n}")]
            for k, v in options.items():
                cmd += ["--data-option", f"{k}={v}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            if r.returncode != 0 or not lines:
                print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(lines[-1][7:])
            if res["rc"] != 0 or "reusing" not in r.stdout:
                print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
                print(f"training on the {n}-image cache failed or did not reuse the cache", file=sys.stderr)
                return 1
            res.update(n_train=n, cache_mb=round(cache_mb, 1), wall_s=round(time.perf_counter() - t0, 1))
            results.append(res)
            print(json.dumps(res))
            sys.stdout.flush()
    print(f"\n{'train images':>12}{'cache MiB':>11}{'RSS after import':>18}{'peak RSS MiB':>14}{'train s':>9}")
    for r in results:
        print(f"{r['n_train']:>12}{r['cache_mb']:>11.0f}{r['rss_after_import_mb']:>18.0f}{r['peak_rss_mb']:>14.0f}"
              f"{r['seconds']:>9.0f}")
    print(f"peak RSS {results[-1]['n_train']} / {results[0]['n_train']} images: "
          f"{results[-1]['peak_rss_mb'] / results[0]['peak_rss_mb']:.2f}x "
          f"(cache {results[-1]['cache_mb'] / results[0]['cache_mb']:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
