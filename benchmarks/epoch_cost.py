"""What an epoch of each method costs at the paper's budget, and what a sweep of them would take.

Results: docs/performance.md ("GPU", from benchmarks/gpu_check.sh) and docs/reproduce.md.

Run:  python benchmarks/epoch_cost.py [--device cuda] [--image-size 224] [--batch-size 128]
      [--train-size 12271] [--test-size 3068] [--epochs 2] [--methods ce,gce,...] [--json FILE]
CPU smoke run (seconds):
      python benchmarks/epoch_cost.py --device cpu --image-size 32 --train-size 256 --test-size 64
      --batch-size 32 --model tiny_cnn --threads 2

The training set is the embedded synthetic generator's (``--data synthetic``), made ONCE at the
training size with RAF-DB's split sizes (12,271 training and 3,068 test images,
https://www.whdeng.cn/RAF/model1.html) and written to a prepared cache (``data.cache``, the format
``dnfer prepare`` writes), which every method then reads as a real dataset would be read. Each
method then trains through the public entry point, ``dnfer.engine.trainer.fit``, for
``--epochs`` whole epochs (no step sampling, nothing projected within an epoch) with dnfer's
defaults otherwise: ResNet-18, batch 128, ``precision auto`` (bf16 autocast on a GPU that has
it), channels_last, deterministic kernels, both views in one forward pass where the method uses
two (DNFER), 10% of the noisy training split carved out for validation (as on RAF-DB, so
11,044 images are trained on per epoch), validation + test evaluated and checkpoints written at
every epoch's end. Label noise is ``symmetric:0.2`` and co-teaching's noise rate 0.2 (the cost
does not depend on them). Method options stay at their defaults, except DNFER's warm-up, which
is cut to ``--epochs`` - 1 epochs when longer (a run must leave DNFER an epoch that selects), so
the reported epoch is a selecting one.

Columns, per method (the last epoch run, so with ``--epochs 2`` the one after the warm-up of
kernels and allocator):

  train s/ep  the epoch's training steps alone (images / the trainer's training images/s)
  img/s       training images per second (each image counts once, whatever its views)
  epoch s     the whole epoch as the caller sees it: training, evaluation, metrics, checkpoints
              (time between the trainer's epoch lines; its own ``epoch_seconds`` where missing)
  fit s       the whole ``fit`` call: data opening, model set-up, every epoch, summary
  40 ep min   a 40-epoch run (the paper's budget): fit s + (40 - epochs) x epoch s, in minutes
  train-only  40 x train s/ep, in minutes

Then the sweep's total (every method x 40 epochs) and the grid's (x 6 noise settings x 3 seeds).
A method that fails prints its one-line error and the table goes on. ``--json`` also writes
the table (atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Deterministic cuBLAS (what `dnfer train` sets) before anything touches the GPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

from dnfer.config import Config  # noqa: E402
from dnfer.engine.trainer import fit  # noqa: E402
from dnfer.errors import DnferError  # noqa: E402
from dnfer.registry import METHODS  # noqa: E402

ALL_METHODS = ("ce", "gce", "sce", "coteaching", "scn", "rul", "eac", "dnfer", "dnfer_plus")
#: The sweep the projection is for: symmetric/asymmetric noise at several rates, several seeds.
NOISE_SETTINGS, SEEDS, SWEEP_EPOCHS = 6, 3, 40


def make_config(args: argparse.Namespace, method: str, run_dir: Path, cache_dir: Path) -> Config:
    """The run's config: dnfer's defaults plus the benchmark's data, budget and device."""
    cfg = Config()
    cfg.data.spec = "synthetic"
    # cache=false: the prepared cache below is the one copy (no second .npz of the arrays).
    cfg.data.options = {"n_train": str(args.train_size), "n_test": str(args.test_size),
                        "workers": str(args.gen_workers), "cache": "false"}
    cfg.data.image_size = args.image_size
    cfg.data.cache = str(cache_dir)
    cfg.data.noise = "symmetric:0.2"
    cfg.model.name = args.model
    cfg.method.name = method
    cfg.method.noise_rate = 0.2  # co-teaching needs it; the others ignore it
    if method == "dnfer":
        from dnfer.methods.dnfer import DNFERParams

        cfg.method.params = {"warmup_epochs": min(DNFERParams().warmup_epochs, args.epochs - 1)}
    cfg.train.epochs = args.epochs
    cfg.train.batch_size = args.batch_size
    cfg.train.device = args.device
    cfg.train.precision = args.precision
    cfg.train.progress = False
    if args.threads:
        cfg.train.threads = args.threads
    cfg.out = str(run_dir)
    return cfg


def time_method(args: argparse.Namespace, method: str, run_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Train ``method`` for ``args.epochs`` epochs; returns its row of the table."""
    cfg = make_config(args, method, run_dir, cache_dir)
    epoch_marks: list[float] = []  # when each epoch's line came (after its checkpoints)

    def log(line: str) -> None:
        if line.lstrip().startswith("epoch"):
            epoch_marks.append(time.perf_counter())
        if args.verbose:
            print(f"    {method}: {line}", flush=True)

    chatter = io.StringIO()  # what the data layer prints ("cache ...: reusing"), kept off the table
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(chatter if not args.verbose else sys.stdout):
        summary = fit(cfg, log=log)
    fit_s = time.perf_counter() - t0
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    last = records[-1]
    epochs = len(records)
    images_per_epoch = summary["train_seconds"] * summary["images_per_second"] / max(epochs, 1)
    ips = float(last["train_images_per_second"])
    train_s = images_per_epoch / ips
    if len(epoch_marks) >= 2:
        epoch_s = epoch_marks[-1] - epoch_marks[-2]
    else:  # one epoch, or the trainer's line changed: training + evaluation, checkpoints not counted
        epoch_s = float(last["epoch_seconds"])
    sweep_s = fit_s + (SWEEP_EPOCHS - epochs) * epoch_s
    return {
        "method": method, "views": len(METHODS.get(method).views), "epochs": epochs,
        "images_per_epoch": round(images_per_epoch), "train_s_per_epoch": train_s, "train_images_per_s": ips,
        "epoch_s": epoch_s, "fit_s": fit_s, "projected_40_epoch_min": sweep_s / 60,
        "projected_40_epoch_train_only_min": SWEEP_EPOCHS * train_s / 60,
        "precision": summary["precision"], "device": summary["device"],
    }


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="train.device (cuda, cpu, auto)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-size", type=int, default=12271, help="synthetic training images (RAF-DB: 12,271)")
    ap.add_argument("--test-size", type=int, default=3068, help="synthetic test images (RAF-DB: 3,068)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per method; the last one is reported")
    ap.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated registered methods")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="train.threads (CPU; 0 = torch's default)")
    ap.add_argument("--gen-workers", type=int, default=min(os.cpu_count() or 1, 16),
                    help="processes drawing the synthetic faces (the data do not depend on it)")
    ap.add_argument("--workdir", help="where the cache and run folders go (default: a temporary folder)")
    ap.add_argument("--json", help="also write the table to this file")
    ap.add_argument("--verbose", action="store_true", help="print the trainer's own lines too")
    args = ap.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        ap.error(f"--methods: unknown {unknown or '(none given)'}; registered: {', '.join(METHODS.names())}")
    if args.epochs < 1:
        ap.error("--epochs must be >= 1")

    print(f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}  {platform.node()}"
          f"  python {platform.python_version()}  torch {torch.__version__}  device {args.device}")
    print(f"model {args.model}, {args.image_size} px, batch {args.batch_size}, precision {args.precision}; "
          f"synthetic set: {args.train_size} train + {args.test_size} test images (10% of train held out for "
          f"validation); {args.epochs} epoch(s) per method, the last one reported; methods: {', '.join(methods)}")

    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="epoch_cost-") as tmp:
        cache_dir = Path(tmp) / "cache"
        t0 = time.perf_counter()
        from dnfer.data.pipeline import prepare_data  # fit's own first step: builds the prepared cache

        with contextlib.redirect_stdout(io.StringIO()):
            cfg0 = make_config(args, methods[0], Path(tmp) / "unused", cache_dir)
            ds = prepare_data(cfg0.data, seed=cfg0.train.seed, log=lambda _m: None)
        print(f"data: {len(ds.train) + (len(ds.val) if ds.val is not None else 0)} training images "
              f"(train {len(ds.train)}, val {len(ds.val) if ds.val is not None else 0}), test {len(ds.test)}, "
              f"{args.image_size} px, drawn and cached in {time.perf_counter() - t0:.1f} s (once, not timed below); "
              f"an epoch is {len(ds.train) // args.batch_size} steps of {args.batch_size} (whole batches only)")
        del ds
        # Asked only now: the faces are drawn in forked processes, best forked before CUDA starts.
        gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else None
        if gpu:
            print(f"GPU: {gpu}")
        head = (f"{'method':<12}{'views':>6}{'train s/ep':>12}{'img/s':>9}{'epoch s':>9}{'fit s':>8}"
                f"{'40 ep min':>11}{'train-only':>12}")
        print(head, flush=True)
        for method in methods:
            try:
                row = time_method(args, method, Path(tmp) / f"run-{method}", cache_dir)
            except (DnferError, RuntimeError, ValueError) as e:  # one method's failure must not hide the rest
                failed[method] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                print(f"{method:<12}failed: {failed[method]}", flush=True)
                continue
            finally:
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            rows.append(row)
            print(f"{method:<12}{row['views']:>6}{row['train_s_per_epoch']:>12.2f}{row['train_images_per_s']:>9.0f}"
                  f"{row['epoch_s']:>9.2f}{row['fit_s']:>8.1f}{row['projected_40_epoch_min']:>11.1f}"
                  f"{row['projected_40_epoch_train_only_min']:>12.1f}", flush=True)

    total = sum(r["projected_40_epoch_min"] for r in rows)
    train_only = sum(r["projected_40_epoch_train_only_min"] for r in rows)
    grid = NOISE_SETTINGS * SEEDS
    done = f"{len(rows)} of {len(methods)} methods" + (f" (failed: {', '.join(failed)})" if failed else "")
    print(f"\nsweep, {done} x {SWEEP_EPOCHS} epochs, one after another: {total:.1f} min "
          f"({total / 60:.2f} h; training steps alone {train_only:.1f} min)")
    print(f"grid, x {NOISE_SETTINGS} noise settings x {SEEDS} seeds = {grid * len(rows)} runs: "
          f"{grid * total / 60:.1f} h (training steps alone {grid * train_only / 60:.1f} h)")
    if args.json:
        _write_json_atomic(Path(args.json), {
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "gpu": gpu, "torch": torch.__version__, "args": vars(args), "rows": rows,
            "failed": failed, "sweep_40_epoch_min": total, "sweep_40_epoch_train_only_min": train_only,
            "grid_runs": grid * len(rows), "grid_hours": grid * total / 60,
        })
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
