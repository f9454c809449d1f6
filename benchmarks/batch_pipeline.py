"""Training's input pipeline on its own (no model): where the time of a batch goes, part by part.

Run:  python benchmarks/batch_pipeline.py [--device cuda] [--image-size 224] [--batch-size 128]
      [--repeats 15] [--epochs 3]
Results: docs/performance.md, "GPU" (run by benchmarks/gpu_check.sh).

Parts, median ms per batch of ``--batch-size`` images from a prepared cache (synchronised on
CUDA before and after each, so they add up to the in-line cost of a batch):

  read         ``gather_uint8``: cache rows into (pinned, on CUDA) host memory
  to device    the uint8 batch's copy to the device
  weak view / strong view   ``BatchAugment`` on the device; "host ms" is the time until the
               call returns (Python + kernel launches), "ms" until the device has finished
  normalise    both views to float32

Then whole epochs of ``TrainBatches`` with no model: prefetch (a helper thread; on CUDA it also
copies and augments on a side stream) vs everything in line, in batches/s; and on CUDA the host
<->device synchronisations one in-line batch makes (``torch.cuda.set_sync_debug_mode``), with
``train.deterministic`` on (the default) and off. The last line gives the in-line batch time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import dnfer.data.folder  # noqa: F401 - registers the folder adapter
from dnfer.data.cache import build_cache, open_cache
from dnfer.data.spec import DataSpec
from dnfer.engine.batches import AugmentSettings, TrainBatches, gather_uint8
from dnfer.engine.device import resolve_device

sys.path.insert(0, str(Path(__file__).parent))
from throughput import make_jpegs  # noqa: E402 - the same RAF-like JPEGs as the throughput benchmark


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float]:
    """Median (host ms until ``fn`` returns, ms until the device is done) over ``repeats`` calls."""
    fn()
    host, done = [], []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        _sync(device)
        done.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(host), 1e3 * statistics.median(done)


def count_syncs(fn: Callable[[], object]) -> int:
    """Host<->device synchronisations ``fn`` makes (CUDA only)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def measure_parts(images: object, labels: np.ndarray, device: torch.device, size: int, batch: int, repeats: int,
                  *, deterministic: bool) -> list[tuple[str, float, float]]:
    """``(part, host ms, ms)`` rows for one batch (see the module docstring)."""
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    tb = TrainBatches(images, labels, views=("weak", "strong"), batch_size=batch, device=device,
                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), aug=AugmentSettings(size), seed=1,
                      channels_last=True, prefetch=False)
    idx = np.random.default_rng(0).permutation(len(labels))[:batch]
    pin = device.type == "cuda"
    host = gather_uint8(images, idx, pin=pin)
    x = host.to(device)

    def whole_batch() -> object:
        return tb._device_batch(gather_uint8(images, idx, pin=pin), idx, 0, 0)

    parts: dict[str, Callable[[], object]] = {
        "weak view": lambda: tb.batch_aug["weak"](x, generator=torch.Generator().manual_seed(3)),
        "strong view": lambda: tb.batch_aug["strong"](x, generator=torch.Generator().manual_seed(3)),
        "normalise": lambda: tb._finish({"weak": x, "strong": x}),
        "whole batch, in line": whole_batch,
    }
    if deterministic:  # no device kernels here that determinism could change
        parts = {"read": lambda: gather_uint8(images, idx, pin=pin),
                 "to device": lambda: host.to(device, non_blocking=True), **parts}
    tag = "" if deterministic else " (deterministic off)"
    rows = [(name + tag, *timed(fn, device, repeats)) for name, fn in parts.items()]
    if device.type == "cuda":
        print(f"host<->device synchronisations in one in-line batch{tag}: {count_syncs(whole_batch)}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=3, help="whole epochs per prefetch setting")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    s, b = args.image_size, args.batch_size
    n = 8 * b
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", torch {torch.__version__}, {s} px, batch {b}, cache of {n} images, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_jpegs(root / "jpegs", n)
        build_cache(DataSpec("folder", root / "jpegs", {}), image_size=s, out=root / "cache", seed=1,
                    skip_bad=False, workers=1)
        ds = open_cache(root / "cache")
        images, labels = ds.train.images, ds.train.labels
        mean = std = (0.5, 0.5, 0.5)
        rows: list[tuple[str, float, float]] = []
        for deterministic in (True, False):
            rows += measure_parts(images, labels, device, s, b, args.repeats, deterministic=deterministic)
        torch.use_deterministic_algorithms(True, warn_only=True)
        print(f"\n{'part':<46}{'host ms':>9}{'ms':>9}")
        for name, h, d in rows:
            print(f"{name:<46}{h:>9.2f}{d:>9.2f}")

        print("\nwhole epochs, no model (batches/s):")
        rates: dict[bool, list[float]] = {True: [], False: []}
        for e in range(args.epochs):
            for prefetch in (True, False) if e % 2 == 0 else (False, True):
                tb = TrainBatches(images, labels, views=("weak", "strong"), batch_size=b, device=device, mean=mean,
                                  std=std, aug=AugmentSettings(s), seed=1, channels_last=True, prefetch=prefetch)
                _sync(device)
                t0 = time.perf_counter()
                count = sum(1 for _ in tb.epoch(e))
                _sync(device)
                rates[prefetch].append(count / (time.perf_counter() - t0))
        for prefetch in (True, False):
            r = statistics.median(rates[prefetch])
            label = "prefetch (helper thread" + (" + side stream)" if device.type == "cuda" else ")")
            print(f"  {label if prefetch else 'in line':<40}{r:>8.1f} batches/s = {r * b:>8.0f} img/s")
        inline = next(d for name, _, d in rows if name == "whole batch, in line")
        print(f"in-line batch: {inline:.2f} ms; prefetch/in-line epoch rate: "
              f"{statistics.median(rates[True]) / statistics.median(rates[False]):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
