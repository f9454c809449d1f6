"""Synthetic-face generation speed on ONE core (images/s), by image size and supersampling.

Usage: ``python benchmarks/synth_speed.py [--n 2000] [--repeats 3]``
Results: docs/synthetic.md, "Speed".

Pins itself to one CPU (``os.sched_setaffinity``) and sets cv2 to one thread, so the number is a
per-core rate: generation parallelises over processes (``workers``), since image i depends only
on (seed, split, i). Reports the median of ``--repeats`` runs of both wall-clock and process CPU
time; on a shared machine the CPU-time rate is the steadier of the two (it excludes time the
process waited for the core), but cache contention from other jobs still lowers it.
The last line is the key number: images/s at 64x64 (CPU time, median).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import cv2
import numpy as np

from dnfer.data.synthetic import generate, labels_for, sample_expression_params


def _rate(fn, n: int, repeats: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(n / (time.perf_counter() - w0))
        cpus.append(n / max(time.process_time() - c0, 1e-9))
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images per timed run")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cv2.setNumThreads(1)
    generate(50, seed=0, image_size=64)  # warm up (imports, noise bank)

    n = args.n
    labels = labels_for(n, seed=0)
    rows = []
    wall, cpu = _rate(lambda: [sample_expression_params(np.random.default_rng([0, 0, i]), int(labels[i]))
                               for i in range(n)], n, args.repeats)
    rows.append(("parameters only", "-", "-", wall, cpu))
    key = 0.0
    for size, ss in ((32, 1), (64, 1), (64, 2), (112, 1), (224, 1)):
        wall, cpu = _rate(lambda s=size, k=ss: generate(n, seed=1, image_size=s, supersample=k), n, args.repeats)
        rows.append(("generate", f"{size}x{size}", str(ss), wall, cpu))
        if size == 64 and ss == 1:
            key = cpu
    print(f"one core, n={n}, median of {args.repeats}")
    print(f"{'stage':18s} {'size':>8s} {'ss':>3s} {'img/s wall':>11s} {'img/s cpu':>10s}")
    for stage, size, ss, wall, cpu in rows:
        print(f"{stage:18s} {size:>8s} {ss:>3s} {wall:11.0f} {cpu:10.0f}")
    print(f"synth_speed: {key:.0f} images/s at 64x64 on one core (CPU time, median)")


if __name__ == "__main__":
    main()
