"""Label-issue detection: dnfer's one-run audit vs cleanlab on K-fold cross-validated probabilities.

Run:  .venv/bin/python benchmarks/audit_vs_cleanlab.py [--folds 5] [--epochs 15] [--dnfer-epochs 15,10] [--json FILE]
Results: docs/audit.md, "Benchmark: dnfer's one-run audit vs cleanlab".

For each noise setting (default symmetric 20% and 40%, asymmetric 30%) on the embedded synthetic
dataset (same images, same seeded noise for both sides, no validation carve so both audit the
same N samples):

- **dnfer**: one DNFER training run (``fit``) + ``audit_run`` (selection history + un-augmented
  posterior). Timed end to end; the audit's own share is reported too. ``--dnfer-epochs`` lists
  one or more DNFER budgets (default: the same epochs as each cleanlab fold); each is a
  separate run against the same cleanlab result.
- **cleanlab**: K models of the same family trained with cross-entropy (``fit``, same epochs,
  batch size and optimiser) on K stratified folds, each predicting its held-out fold; then
  ``cleanlab.filter.find_label_issues(labels, pred_probs)`` for the flagged set and
  ``1 - cleanlab.rank.get_label_quality_scores`` (self-confidence) as the ranking score.

``--data colour`` swaps in a small learnable control set (see :func:`make_colour_set`), for
budgets where the model does not learn the synthetic faces.

Printed per setting: AUROC of each ranking against ``given != true``, precision/recall of each
flagged set, the compute of each pipeline, plus the AUROC of the audit's two ingredients alone
(the numbers behind the combined score in docs/audit.md). Compute is this process's CPU time
(both pipelines train in this process with ``--threads`` torch threads), which other jobs on a
shared machine disturb far less than wall time; wall time is printed too.

Defaults: the embedded benchmark's budget (configs/bench_embedded.yaml: resnet10_slim, 64 px,
2,000 training images, 15 epochs, warm-up 5, Adam 1e-3), on which the model learns the faces.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dnfer.analysis.audit import audit_run, audit_scores, ranking_quality
from dnfer.config import Config
from dnfer.data.base import FERDataset
from dnfer.data.pipeline import prepare_data
from dnfer.engine.batches import predict_probs
from dnfer.engine.checkpoint import load_checkpoint, load_model
from dnfer.engine.device import resolve_device, resolve_precision
from dnfer.engine.trainer import fit
from dnfer.registry import DATASETS

#: The fold the registered ``auditbench`` loader hands to ``fit`` (set before each fold's run).
_FOLD: dict[str, FERDataset] = {}


def _fold_loader(path: Path | None, *, image_size: int, options: dict[str, str], seed: int, skip_bad: bool) -> FERDataset:
    del path, image_size, options, seed, skip_bad
    return _FOLD["current"]


def make_colour_set(root: Path, per_class: int = 250, size: int = 16, seed: int = 0) -> Path:
    """A learnable control set, ``root/<class>/*.png``: 4 classes that differ by a small colour offset,
    blurred by a per-image colour cast, brightness and pixel noise (tiny_cnn reaches ~60% test
    accuracy in 8 epochs, so both audits have a model that learned something)."""
    from PIL import Image

    offsets = {"happiness": (25, 0, 0), "sadness": (0, 0, 25), "anger": (0, 25, 0), "neutral": (0, 0, 0)}
    rng = np.random.default_rng(seed)
    for name, off in offsets.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array([130, 120, 110], float) + np.array(off) + rng.normal(0, 12, 3)
            img = base[None, None] * rng.uniform(0.75, 1.0) + rng.normal(0, 30, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{name}_{i:03d}.png")
    return root


def base_config(args: argparse.Namespace, noise: str, method: str, out: Path) -> Config:
    cfg = Config()
    cfg.data.spec = args.data
    cfg.data.options = dict(o.split("=", 1) for o in args.data_option)
    if args.data == "synthetic":
        cfg.data.options = {"n_train": str(args.n_train), "n_test": str(args.n_test), **cfg.data.options}
    cfg.data.image_size = args.image_size
    cfg.data.noise = noise
    cfg.data.val_fraction = 0.0
    cfg.model.name = args.model
    cfg.method.name = method
    if method == "dnfer":
        cfg.method.params["warmup_epochs"] = args.warmup_epochs
    cfg.train.epochs = args.epochs
    cfg.train.batch_size = args.batch_size
    cfg.train.precision = args.precision
    cfg.train.seed = args.seed
    cfg.train.progress = False
    cfg.train.threads = args.threads
    cfg.optim.lr, cfg.optim.head_lr = args.lr, args.head_lr
    cfg.out = str(out)
    return cfg


def run_dnfer(args: argparse.Namespace, noise: str, work: Path, epochs: int) -> dict[str, Any]:
    out = work / f"dnfer-{noise.replace(':', '')}-e{epochs}"
    cfg = base_config(args, noise, "dnfer", out)
    cfg.train.epochs = epochs
    cfg.method.params["warmup_epochs"] = min(args.warmup_epochs, epochs)
    t0, c0 = time.perf_counter(), time.process_time()
    fit(cfg, log=lambda _m: None)
    t_fit = time.perf_counter() - t0
    res = audit_run(out, log=lambda _m: None)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    noisy = res.is_noisy
    assert noisy is not None
    parts = {kind: ranking_quality(audit_scores(res.probs, res.given, res.selection_rate, kind), noisy)["auroc"]
             for kind in ("combined", "posterior", "history")}
    # cleanlab's own filter on dnfer's (in-sample) posteriors: what --export-pred-probs feeds it
    from cleanlab.filter import find_label_issues

    cl_in = find_label_issues(res.given, res.probs)
    return {"epochs": epochs, "wall_s": wall, "cpu_s": cpu, "fit_s": t_fit, "audit_s": wall - t_fit,
            "quality": res.quality(),
            "auroc_parts": parts, "cleanlab_filter_on_dnfer_probs": ranking_quality(res.score, noisy, cl_in),
            "noisy": noisy}


def run_cleanlab(args: argparse.Namespace, noise: str, work: Path, noisy_ref: np.ndarray) -> dict[str, Any]:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores
    from sklearn.model_selection import StratifiedKFold

    t0, c0 = time.perf_counter(), time.process_time()
    cfg = base_config(args, noise, "ce", work / "unused")
    ds = prepare_data(cfg.data, seed=cfg.train.seed, log=lambda _m: None)
    labels, truth = ds.train.labels, ds.train.true_labels
    assert truth is not None and np.array_equal(labels != truth, noisy_ref), "both sides must see the same noise"
    pred_probs = np.zeros((len(labels), ds.num_classes), np.float32)
    dev = resolve_device("auto")
    folds = StratifiedKFold(n_splits=args.folds, shuffle=True, random_state=args.seed)
    for f, (tr, te) in enumerate(folds.split(np.zeros(len(labels)), labels)):
        _FOLD["current"] = FERDataset(class_names=ds.class_names, train=ds.train.subset(tr),
                                      test=ds.train.subset(te), val=None, meta={})
        fold_cfg = base_config(args, "none", "ce", work / f"cl-{noise.replace(':', '')}-fold{f}")
        fold_cfg.data.spec = f"auditbench:{work}"
        fold_cfg.data.options = {}
        fit(fold_cfg, log=lambda _m: None)
        ckpt = load_checkpoint(Path(fold_cfg.out) / "last.pt")
        model = load_model(ckpt, dev)
        pre = ckpt.preprocessing
        pred_probs[te] = predict_probs(model, ds.train.images[te], batch_size=256, device=dev, mean=pre.mean,
                                       std=pre.std, precision=resolve_precision(args.precision, dev))
    issues = find_label_issues(labels, pred_probs)
    score = 1.0 - get_label_quality_scores(labels, pred_probs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"wall_s": wall, "cpu_s": cpu, "quality": ranking_quality(score, labels != truth, issues)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--noises", default="symmetric:0.2,symmetric:0.4,asymmetric:0.3")
    p.add_argument("--data", default="synthetic",
                   help="dataset spec (default: the embedded synthetic set); 'colour' = the learnable control set")
    p.add_argument("--folds", type=int, default=5, help="cleanlab's cross-validation folds (5 standard, 3 faster)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--model", default="resnet10_slim")
    p.add_argument("--epochs", type=int, default=15, help="epochs of each cleanlab fold model")
    p.add_argument("--dnfer-epochs", default=None,
                   help="comma list of DNFER run lengths, each audited against the same cleanlab result "
                        "(default: --epochs)")
    p.add_argument("--warmup-epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--precision", default="auto")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data-option", action="append", default=[], metavar="K=V",
                   help="synthetic dataset option (repeatable; default: the embedded set as shipped)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine 2 threads spin against other jobs)")
    p.add_argument("--keep", metavar="DIR", help="keep the run directories here (default: a deleted temp dir)")
    p.add_argument("--json", metavar="FILE", help="also write all numbers as JSON")
    args = p.parse_args()

    if "auditbench" not in DATASETS.names():
        DATASETS.register("auditbench")(_fold_loader)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dnfer-auditbench-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.data == "colour":
            args.data = f"folder:{make_colour_set(work / 'colour-set')}"
        dnfer_epochs = [int(e) for e in (args.dnfer_epochs or str(args.epochs)).split(",")]
        for noise in args.noises.split(","):
            # generate (and cache) the images once, outside both timings
            warm = base_config(args, noise, "dnfer", work / "warm")
            prepare_data(warm.data, seed=warm.train.seed, log=lambda _m: None)
            runs = [run_dnfer(args, noise, work, e) for e in dnfer_epochs]
            noisy = runs[0].pop("noisy")
            for r in runs[1:]:
                r.pop("noisy")
            c = run_cleanlab(args, noise, work, noisy)
            rows.append({"noise": noise, "dnfer": runs, "cleanlab": c})
            cq = c["quality"]
            print(f"{noise}: n={cq['n']} noisy={cq['n_noisy']} | cleanlab ({args.folds} folds x {args.epochs} epochs) "
                  f"AUROC {cq['auroc']:.4f} flagged P/R {cq['flagged_precision']:.3f}/{cq['flagged_recall']:.3f} "
                  f"cpu {c['cpu_s']:.0f} s wall {c['wall_s']:.0f} s", flush=True)
            for d in runs:
                dq = d["quality"]
                print(f"    dnfer {d['epochs']} epochs: AUROC {dq['auroc']:.4f} (posterior "
                      f"{d['auroc_parts']['posterior']:.4f}, history {d['auroc_parts']['history']:.4f}) flagged P/R "
                      f"{dq['flagged_precision']:.3f}/{dq['flagged_recall']:.3f} | cpu {d['cpu_s']:.0f} s wall "
                      f"{d['wall_s']:.0f} s (audit {d['audit_s']:.1f} s) | compute dnfer/cleanlab "
                      f"{d['cpu_s'] / c['cpu_s']:.2f}", flush=True)
    load = os.getloadavg()
    meta = {"args": vars(args), "loadavg_end": load, "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    print(f"machine: {os.cpu_count()} CPUs, load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
