"""train.malloc: what keeping freed host memory in the process saves a CPU training step.

Run:  .venv/bin/python benchmarks/host_memory.py [--rounds 12] [--steps 4] [--image-size 112]
      [--batch-size 128] [--model resnet18] [--threads 2]
Results: docs/performance.md, "Host memory kept in the process".

Two parts, both in this one process, switching the process-wide setting between measurements
(``engine.cpu_tuning.host_memory.system_malloc`` / ``retain_freed_memory``) so that the host's drift hits
both alike:

1. the mechanism: allocate and fill a 600 MB tensor (about what a ResNet-18 step at 112 px
   frees and allocates again), with glibc's behaviour (mmap for large blocks, so every
   allocation is page-faulted in and zero-filled by the kernel) and with the heap kept;
2. the effect: dnfer's training step exactly as ``benchmarks/throughput.py`` (b) runs it (cache
   read, batched augmentation, both views in one bf16 pass, the trainer's bookkeeping), rounds
   alternating system/retain and retain/system, with the minor page faults per step
   (``getrusage``; the counts include each round's warm-up steps, where a just-trimmed heap
   grows back).

Prints a table per part and, last, the median of the per-round step-time ratios.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dnfer.config import Config
from dnfer.data.cache import build_cache
from dnfer.data.spec import DataSpec
from dnfer.engine.build import seed_everything
from dnfer.engine.cpu_tuning.host_memory import retain_freed_memory, system_malloc
from dnfer.engine.device import default_channels_last, resolve_device, resolve_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402 - its (b) variant, so both benchmarks time the same step

SETTINGS = {"system": system_malloc, "retain": retain_freed_memory}


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def alloc_fill_ms(mb: int, repeats: int) -> tuple[float, float]:
    """Median ms and minor faults of allocating and filling ``mb`` MB (float32), after 3 warm-ups."""
    n = mb * 2**20 // 4
    for _ in range(3):
        torch.empty(n).fill_(1.0)
    times, faults = [], []
    for _ in range(repeats):
        f0, t0 = minor_faults(), time.perf_counter()
        torch.empty(n).fill_(1.0)
        times.append(time.perf_counter() - t0)
        faults.append(minor_faults() - f0)
    return statistics.median(times) * 1e3, statistics.median(faults)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per setting per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=128, help="samples per step (x2 views)")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--alloc-mb", type=int, default=600)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device("cpu")
    precision = resolve_precision("auto", device)
    seed_everything(0, True)
    if not retain_freed_memory():
        print("the C library is not glibc: train.malloc changes nothing here")
        return 0
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  {platform.node()}  torch {torch.__version__}"
          f"  {args.threads} threads; {args.model}, {args.image_size} px, batch {args.batch_size} (x2 views),"
          f" precision {precision.name}")

    print(f"\n1. allocate + fill {args.alloc_mb} MB, median of 9 (ms, minor faults), alternating settings:")
    mech: dict[str, list[tuple[float, float]]] = {k: [] for k in SETTINGS}
    for r in range(4):
        for name in list(SETTINGS)[:: 1 if r % 2 == 0 else -1]:
            SETTINGS[name]()
            mech[name].append(alloc_fill_ms(args.alloc_mb, 9))
    for name, rows in mech.items():
        print(f"  {name:<8}" + "  ".join(f"{ms:6.0f} ms {f:7.0f} faults" for ms, f in rows))

    cfg = Config()
    cfg.model.name = args.model
    b, s = args.batch_size, args.image_size
    rates: dict[str, list[float]] = {k: [] for k in SETTINGS}
    faults: dict[str, list[float]] = {k: [] for k in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        throughput.make_jpegs(root / "jpegs", (args.warmup + args.steps + 1) * b)
        build_cache(DataSpec("folder", root / "jpegs", {}), image_size=s, out=root / "cache", seed=1,
                    skip_bad=False, workers=1)
        step = throughput.Dnfer(cfg, root / "cache", s, b, device, precision, default_channels_last(device),
                                compile_model=False)
        print(f"\n2. dnfer's training step, {args.rounds} rounds of {args.warmup}+{args.steps} steps per setting:")
        for r in range(args.rounds):
            for name in list(SETTINGS)[:: 1 if r % 2 == 0 else -1]:
                SETTINGS[name]()
                f0 = minor_faults()
                dt = step.run(args.warmup, args.steps)
                rates[name].append(args.steps * b / dt)
                faults[name].append((minor_faults() - f0) / (args.warmup + args.steps))
            print(f"  round {r + 1}: " + ", ".join(f"{k} {rates[k][-1]:.1f} img/s ({faults[k][-1]:.0f} faults/step)"
                                                   for k in SETTINGS), flush=True)
    print(f"\n{'setting':<10}{'img/s median':>14}{'min':>8}{'max':>8}{'faults/step median':>20}")
    for k in SETTINGS:
        print(f"{k:<10}{statistics.median(rates[k]):>14.1f}{min(rates[k]):>8.1f}{max(rates[k]):>8.1f}"
              f"{statistics.median(faults[k]):>20.0f}")
    ratios = [x / y for x, y in zip(rates["retain"], rates["system"], strict=True)]
    print(f"step speed retain/system: per-round median {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}; ratio of medians "
          f"{statistics.median(rates['retain']) / statistics.median(rates['system']):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
