"""Does dnfer's default precision cost accuracy? The same DNFER run in fp32 and with --precision auto.

Run:  .venv/bin/python benchmarks/precision_accuracy.py [--n-train 2000] [--image-size 48] [--epochs 6]

Trains twice on the embedded synthetic benchmark (same seed, data, noise and budget), one run
after the other, each in a fresh process: ``--precision fp32`` and ``--precision auto`` (bf16
autocast on CPUs with native bf16 and on recent GPUs). Prints the final-epoch test accuracy, the
test accuracy at the best-validation epoch and the training throughput of each; the last line is
the accuracy difference auto - fp32 (percentage points).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import argparse, sys
from dnfer.commands import train  # only the train command, as `dnfer train` runs it
ap = argparse.ArgumentParser()
train.add_parser(ap.add_subparsers())
args = ap.parse_args(sys.argv[1:])
sys.exit(args.run(args))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--warmup-epochs", type=int, default=2)
    ap.add_argument("--noise", default="symmetric:0.2")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    # From scratch the paper's 10x head rate stalls training (docs/reproduce.md): head lr = lr.
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", help="where to put the two run directories (default: a temporary folder)")
    args = ap.parse_args()

    results = {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for precision in ("fp32", "auto"):
            out = Path(tmp) / f"run_{precision}"
            cmd = [sys.executable, "-c", CHILD, "train", "--data", "synthetic",
                   "--data-option", f"n_train={args.n_train}", "--data-option", f"n_test={args.n_test}",
                   "--image-size", str(args.image_size), "--epochs", str(args.epochs),
                   "--warmup-epochs", str(args.warmup_epochs), "--noise", args.noise, "--model", args.model,
                   "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--threads", str(args.threads),
                   "--head-lr", str(args.head_lr),
                   "--device", args.device, "--precision", precision, "--no-progress", "--out", str(out)]
            print("$ dnfer " + " ".join(cmd[3:]), flush=True)
            r = subprocess.run(cmd, text=True, capture_output=True)
            if r.returncode != 0:
                print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
                return 1
            s = json.loads((out / "summary.json").read_text())
            results[precision] = s
            print(f"  {s['precision']}: final test {100 * s['final_test_acc']:.2f}%, test at best val "
                  f"{100 * (s['best_val_test_acc'] or float('nan')):.2f}% (epoch {s['best_val_epoch']}), "
                  f"{s['images_per_second']:.1f} img/s, {s['train_seconds']:.0f} s training", flush=True)
    a, f = results["auto"], results["fp32"]
    print(f"\n{'precision':<10}{'final test %':>14}{'test@best-val %':>17}{'img/s':>9}")
    for name, s in (("fp32", f), (f"auto={a['precision']}", a)):
        print(f"{name:<10}{100 * s['final_test_acc']:>14.2f}{100 * (s['best_val_test_acc'] or float('nan')):>17.2f}"
              f"{s['images_per_second']:>9.1f}")
    print(f"auto - fp32: final {100 * (a['final_test_acc'] - f['final_test_acc']):+.2f} pp, at best val "
          f"{100 * ((a['best_val_test_acc'] or 0) - (f['best_val_test_acc'] or 0)):+.2f} pp; "
          f"throughput {a['images_per_second'] / f['images_per_second']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
