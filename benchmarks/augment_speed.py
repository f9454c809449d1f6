"""Throughput of the paper's weak/strong views: per-sample (torchvision v2) vs batched (BatchAugment).

Per-sample = what one DataLoader worker does: call the transform on each uint8 (3, S, S) image
and stack. Batched = one BatchAugment call on the uint8 (B, 3, S, S) batch. Both on the CPU with
the same torch thread count (default 1 = one worker's share of a core). Times are medians over
``--repeats`` runs after one warm-up,
the two implementations timed alternately.

Usage: .venv/bin/python benchmarks/augment_speed.py [--sizes 64 112] [--batches 64 128]
Results: docs/performance.md, "Augmentation".
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from dnfer.data.transforms import BatchAugment, strong_transform, weak_transform


def _interleaved_medians(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each function, timed alternately so that load from other processes
    hits all of them alike (the ratio stays meaningful on a shared machine)."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def _per_sample(tf: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """What a DataLoader worker does for one batch: transform each image, then collate."""
    return torch.stack([tf(img) for img in x])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 112])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for both implementations")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} runs, images/s")
    print(f"{'view':<7}{'size':>5}{'batch':>6}{'per-sample':>12}{'batched':>10}{'speed-up':>10}")
    ratios = []
    for size in args.sizes:
        for batch in args.batches:
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
            for view, tf, aug in (
                ("weak", weak_transform(size), BatchAugment(size, strong=False)),
                ("strong", strong_transform(size), BatchAugment(size, strong=True)),
            ):
                t_per, t_bat = _interleaved_medians(
                    [partial(_per_sample, tf, x), partial(aug, x, g)], args.repeats
                )
                ratios.append(t_per / t_bat)
                print(
                    f"{view:<7}{size:>5}{batch:>6}{batch / t_per:>12.0f}{batch / t_bat:>10.0f}{t_per / t_bat:>9.1f}x"
                )
    print(
        f"batched/per-sample throughput ratio: median {statistics.median(ratios):.1f}x "
        f"(min {min(ratios):.1f}x, max {max(ratios):.1f}x)"
    )


if __name__ == "__main__":
    main()
