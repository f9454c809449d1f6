"""Prediction throughput on the CPU: eager PyTorch vs ONNX Runtime, batch 1 and 32.

Times :meth:`dnfer.inference.predictor.Predictor.predict_crops` on ready-made uint8 face crops
(normalisation + model + softmax, i.e. everything after detection and cropping) for a
checkpoint and its ONNX export, with the same thread count for both. A randomly initialised
model of the chosen architecture is used: speed does not depend on the weights. Also times the
Haar detector plus crop on scikit-image's 512x512 astronaut photo (one face), the per-image cost
that comes on top when detection is on. Medians over ``--repeats`` runs after one warm-up; the
load average is printed because the development machine is shared.

Usage: .venv/bin/python benchmarks/predict.py [--model resnet18] [--sizes 112 224] [--batches 1 32]
Results: docs/performance.md, "Prediction".
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from dnfer.config import Config
from dnfer.data.classes import BASIC7
from dnfer.engine.checkpoint import Checkpoint, atomic_save
from dnfer.inference.export import export_checkpoint
from dnfer.inference.predictor import load_predictor
from dnfer.models.factory import create_model


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (first-call allocations, oneDNN/ORT kernel selection)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _checkpoint(path: Path, model_name: str, size: int) -> Path:
    torch.manual_seed(0)
    model = create_model(model_name, len(BASIC7), image_size=size)
    cfg = Config()
    cfg.model.name = model_name
    atomic_save(Checkpoint(model_name, model.state_dict(), model.preprocessing.with_classes(BASIC7), cfg.to_dict()),
                path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--faces", type=int, default=64, help="faces per timed run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} thread(s), "
          f"model {args.model}, median of {args.repeats} runs of {args.faces} faces; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print("| size | batch | eager PyTorch faces/s | ONNX Runtime faces/s | ORT / eager |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            ckpt = _checkpoint(Path(tmp) / f"m{size}.pt", args.model, size)
            onnx_path = export_checkpoint(ckpt, "onnx").path
            eager = load_predictor(ckpt, device="cpu")
            ort = load_predictor(onnx_path, threads=args.threads)
            crops = rng.integers(0, 256, (args.faces, size, size, 3), dtype=np.uint8)
            for batch in args.batches:
                eager.batch_size = ort.batch_size = batch
                n = max(batch, args.faces // batch * batch)
                t_e = _median_seconds(lambda p=eager, c=crops[:n]: p.predict_crops(c), args.repeats)
                t_o = _median_seconds(lambda p=ort, c=crops[:n]: p.predict_crops(c), args.repeats)
                print(f"| {size} | {batch} | {n / t_e:,.0f} | {n / t_o:,.0f} | {t_e / t_o:.2f}x |", flush=True)

        from skimage import data

        photo = data.astronaut()
        det = load_predictor(ckpt, device="cpu", detector="haar")
        t_det = _median_seconds(lambda: det._faces_and_crops(photo, True), args.repeats)
        print(f"\nHaar detection + crop on a 512x512 photo (1 face): {1000 * t_det:.1f} ms/image")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
