"""What verified checkpoints and cache checksums cost: save, load, hash, open a cache.

Run:  .venv/bin/python benchmarks/checkpoint_io.py [--model resnet18] [--rounds 3]
      [--cache-images 8800] [--cache-size 112]

Builds a ``last.pt``-sized checkpoint in memory (the model's weights and an Adam state of the
same shapes, as training writes it), then times, median of ``--rounds`` each:

1. ``atomic_save`` (digest + ``torch.save`` + fsync + rename) against a bare ``torch.save``;
2. ``load_checkpoint`` (``weights_only`` load + sha256 + finiteness check) against a bare
   ``torch.load(weights_only=True)``, and the digest alone;
3. opening a prepared cache of ``--cache-images`` synthetic images with and without the shard
   checksums (``open_cache(verify=...)``).

Numbers in docs/reliability.md §6.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dnfer.config import Config
from dnfer.data.cache import build_cache, open_cache
from dnfer.data.classes import BASIC7
from dnfer.data.spec import DataSpec
from dnfer.engine.checkpoint import Checkpoint, atomic_save, digest, load_checkpoint
from dnfer.models.factory import create_model


def timed(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def training_checkpoint(model_name: str) -> Checkpoint:
    model = create_model(model_name, len(BASIC7), image_size=112)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 112, 112)).sum().backward()
    opt.step()  # creates exp_avg / exp_avg_sq for every parameter
    cfg = Config()
    cfg.model.name = model_name
    resume = {"optimizer": opt.state_dict(), "state": {"epoch": 1, "step": 0}}
    return Checkpoint(model_name, model.state_dict(), model.preprocessing.with_classes(BASIC7), cfg.to_dict(), resume)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache-images", type=int, default=8800)
    ap.add_argument("--cache-size", type=int, default=112)
    args = ap.parse_args()
    print(f"{datetime.date.today()} | {platform.processor() or platform.machine()} | torch {torch.__version__} | "
          f"{torch.get_num_threads()} threads")
    ck = training_checkpoint(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path, bare = root / "last.pt", root / "bare.pt"
        atomic_save(ck, path)
        payload = torch.load(path, weights_only=True)
        mb = path.stat().st_size / 1e6
        print(f"\n{args.model} checkpoint with Adam state: {mb:.1f} MB")
        rows = [
            ("atomic_save (digest, save, fsync, rename)", timed(lambda: atomic_save(ck, path), args.rounds)),
            ("bare torch.save", timed(lambda: torch.save(payload, bare), args.rounds)),
            ("load_checkpoint (load, sha256, finite check)", timed(lambda: load_checkpoint(path), args.rounds)),
            ("bare torch.load(weights_only=True)", timed(lambda: torch.load(path, weights_only=True), args.rounds)),
            ("digest of the loaded payload", timed(lambda: digest(payload), args.rounds)),
        ]
        for name, s in rows:
            print(f"  {name:<48} {s:7.3f} s")
        n_test = max(args.cache_images // 11, 1)
        spec = DataSpec("synthetic", None, {"n_train": str(args.cache_images - n_test), "n_test": str(n_test)})
        cache = build_cache(spec, image_size=args.cache_size, out=root / "cache", seed=1, skip_bad=False, log=None)
        size = sum(f.stat().st_size for f in cache.iterdir()) / 2**20
        print(f"\nprepared cache: {args.cache_images} images at {args.cache_size} px, {size:.0f} MiB")
        for verify in (False, True):
            s = timed(lambda v=verify: open_cache(cache, verify=v), args.rounds)
            print(f"  open_cache(verify={verify!s:<5}) {s:7.3f} s")


if __name__ == "__main__":
    main()
