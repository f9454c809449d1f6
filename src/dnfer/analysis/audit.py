"""Label audit: rank training samples by how likely their given label is wrong.

Two signals, both available after ONE training run (no K-fold cross-validation):

- **selection history** (DNFER and other selecting methods): ``selection_history`` int8
  ``(E, N, V)`` in ``RUN/train_dynamics.npz`` says, per epoch and view, whether the sample's
  posterior for its given label cleared the method's class threshold (1), did not (0), or the
  sample was not seen (-1). ``selection_rate`` is the share of selected looks after warm-up.
- **posterior**: ``1 - p(given label)`` from the trained model on the UN-augmented image
  (cleanlab's "self-confidence" score).

The default score is the posterior, ``1 - p_given``, in [0, 1]: it ranked wrong labels best in
every measured run (docs/audit.md gives the AUROC of each score). ``history`` is
``1 - selection_rate`` (ties broken by the posterior) and ``combined`` the mean of the two.
Methods without selection history (``ce``) and ``--checkpoint`` audits use the posterior. The
suggested label is the posterior's argmax.
"""

from __future__ import annotations

import csv
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dnfer.engine.metrics import auroc
from dnfer.errors import ConfigError, DataError
from dnfer.io_safety import atomic_path

if TYPE_CHECKING:
    from dnfer.engine.checkpoint import Checkpoint

#: Score kinds: ``posterior`` (the default, below), ``combined`` and ``history`` (need a DNFER run's history).
SCORE_KINDS = ("combined", "posterior", "history")
#: The default ranking score. ``posterior`` (1 - p(given label) of the DNFER-trained model on the
#: un-augmented image) ranked wrong labels best in every measured run: 6 benchmark runs of
#: benchmarks/audit_vs_cleanlab.py and the noisy DNFER cells of the embedded benchmark
#: (docs/audit.md); mixing in the selection history lowered AUROC by 0.005-0.03.
DEFAULT_SCORE = "posterior"
#: Columns of label_issues.csv, in order (the first five are the contract; the rest explain the score).
CSV_COLUMNS = ("index", "name", "given_label", "suggested_label", "score", "p_given", "selection_rate", "flagged")


@dataclass
class AuditResult:
    """Per-sample audit of a training split (rows in training-split order).

    Attributes:
        names: ``N`` sample names.
        class_names: ``K`` class names.
        given: int64 ``(N,)`` given (possibly noisy) labels.
        probs: float32 ``(N, K)`` un-augmented posteriors.
        score: float64 ``(N,)`` label-issue score in [0, 1]; higher = more likely wrong.
        selection_rate: float64 ``(N,)`` post-warm-up selection rate (NaN = no history / never seen), or None.
        true_labels: int64 ``(N,)`` clean labels when known, else None.
        flag_threshold: samples with ``score >= flag_threshold`` and a suggestion != given are flagged.
        source: where the audit came from (run dir / checkpoint), for the report.
    """

    names: list[str]
    class_names: list[str]
    given: np.ndarray
    probs: np.ndarray
    score: np.ndarray
    selection_rate: np.ndarray | None = None
    true_labels: np.ndarray | None = None
    flag_threshold: float = 0.5
    source: str = ""
    score_kind: str = DEFAULT_SCORE
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def suggested(self) -> np.ndarray:
        """int64 ``(N,)``: argmax of the posterior."""
        return self.probs.argmax(1).astype(np.int64)

    @property
    def p_given(self) -> np.ndarray:
        """float64 ``(N,)``: posterior of the given label."""
        return self.probs[np.arange(len(self.given)), self.given].astype(np.float64)

    @property
    def flagged(self) -> np.ndarray:
        """bool ``(N,)``: the audit's label-issue set."""
        return (self.score >= self.flag_threshold) & (self.suggested != self.given)

    @property
    def is_noisy(self) -> np.ndarray | None:
        return None if self.true_labels is None else self.given != self.true_labels

    def order(self) -> np.ndarray:
        """Row indices, most suspicious first (stable for ties)."""
        return np.argsort(-self.score, kind="stable")

    def quality(self) -> dict[str, Any] | None:
        """AUROC, precision@k and flagged-set precision/recall against the truth (None if unknown)."""
        noisy = self.is_noisy
        if noisy is None:
            return None
        return ranking_quality(self.score, noisy, self.flagged)

    def write_csv(self, path: str | Path) -> Path:
        """Write ``label_issues.csv``: every sample, most suspicious first (columns: :data:`CSV_COLUMNS`)."""
        path = Path(path)
        sugg, pg, flagged = self.suggested, self.p_given, self.flagged
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(CSV_COLUMNS)
            for i in self.order():
                rate = "" if self.selection_rate is None or np.isnan(self.selection_rate[i]) else f"{self.selection_rate[i]:.4f}"
                w.writerow([int(i), self.names[i], self.class_names[self.given[i]], self.class_names[sugg[i]],
                            f"{self.score[i]:.6f}", f"{pg[i]:.6f}", rate, int(flagged[i])])
        return path

    def export_pred_probs(self, path: str | Path) -> Path:
        """Write an ``.npz`` with ``pred_probs`` float32 (N, K) and ``labels`` int64 (N,) — the
        arguments of ``cleanlab.filter.find_label_issues(labels, pred_probs)`` — plus names and classes.

        These posteriors are in-sample (the model saw these images), not cleanlab's out-of-sample ones.
        """
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, pred_probs=self.probs.astype(np.float32), labels=self.given.astype(np.int64),
                                names=np.array(self.names), class_names=np.array(self.class_names))
        return path


def ranking_quality(score: np.ndarray, noisy: np.ndarray, flagged: np.ndarray | None = None) -> dict[str, Any]:
    """AUROC of ``score`` for bool ``noisy`` ``(N,)``, precision@k (k = #noisy, 100) and flagged P/R."""
    noisy = np.asarray(noisy, bool)
    order = np.argsort(-np.asarray(score, np.float64), kind="stable")
    n_noisy = int(noisy.sum())
    out: dict[str, Any] = {"n": len(noisy), "n_noisy": n_noisy, "auroc": auroc(score, noisy)}
    for name, k in (("precision_at_n_noisy", n_noisy), ("precision_at_100", min(100, len(noisy)))):
        out[name] = float(noisy[order[:k]].mean()) if k > 0 else float("nan")
    out["k_100"] = min(100, len(noisy))
    if flagged is not None:
        flagged = np.asarray(flagged, bool)
        tp = int((flagged & noisy).sum())
        out["n_flagged"] = int(flagged.sum())
        out["flagged_precision"] = tp / out["n_flagged"] if out["n_flagged"] else float("nan")
        out["flagged_recall"] = tp / n_noisy if n_noisy else float("nan")
    return out


def selection_rate(history: np.ndarray, start_epoch: int = 0) -> np.ndarray:
    """float64 ``(N,)``: share of (epoch, view) looks from ``start_epoch`` on where the sample was selected.

    ``history`` is int8 ``(E, N, V)`` (1 selected, 0 not, -1 unseen); unseen looks are ignored.
    If no epoch is left after ``start_epoch`` (a run stopped inside warm-up), all epochs count.
    Samples never seen get NaN.
    """
    h = np.asarray(history)
    if h.ndim == 2:
        h = h[..., None]
    if h.ndim != 3:
        raise ValueError(f"selection history must be (E, N, V), got shape {h.shape}")
    if start_epoch < len(h):
        h = h[start_epoch:]
    seen = (h >= 0).sum((0, 2))
    sel = (h == 1).sum((0, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(seen > 0, sel / np.maximum(seen, 1), np.nan)


def audit_scores(probs: np.ndarray, given: np.ndarray, rate: np.ndarray | None, kind: str = DEFAULT_SCORE) -> np.ndarray:
    """float64 ``(N,)`` label-issue scores in [0, 1] (higher = more suspect).

    Args:
        probs: float ``(N, K)`` un-augmented posteriors; given: int ``(N,)`` given labels.
        rate: float ``(N,)`` selection rates (NaN = unknown) or None.
        kind: ``combined`` = mean of ``1 - rate`` and ``1 - p_given`` (posterior only where the rate
            is unknown), ``posterior`` = ``1 - p_given``, ``history`` = ``1 - rate`` (ties broken by
            the posterior, so samples with equal rates still rank sensibly).
    """
    if kind not in SCORE_KINDS:
        raise ConfigError(f"audit score {kind!r} is not one of {', '.join(SCORE_KINDS)}")
    probs = np.asarray(probs, np.float64)
    given = np.asarray(given, np.int64)
    post = 1.0 - probs[np.arange(len(given)), given]
    if kind == "posterior" or rate is None:
        if kind == "history":
            raise ConfigError("audit score 'history' needs a run with selection history (method dnfer)")
        return post
    hist = 1.0 - np.asarray(rate, np.float64)
    known = ~np.isnan(hist)
    if kind == "history":
        return np.where(known, 0.999 * hist + 0.001 * post, post)
    return np.where(known, 0.5 * hist + 0.5 * post, post)


# ------------------------------------------------------------------------------------ runs


def load_dynamics(run_dir: str | Path) -> dict[str, Any]:
    """The arrays of ``RUN/train_dynamics.npz`` (see engine/trainer.py) as a dict."""
    path = Path(run_dir) / "train_dynamics.npz"
    if not path.is_file():
        raise DataError(f"{path} does not exist: the run folder must be a directory written by `dnfer train` (after >= 1 epoch)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is unreadable or corrupt ({type(e).__name__}: {e}); "
                        "rerun `dnfer train --resume` to rewrite it") from None


def _model_probs(ckpt: Checkpoint, images: np.ndarray, *, device: str, batch_size: int,
                 progress: bool = False) -> np.ndarray:
    """float32 ``(N, K)`` posteriors of the checkpoint's model on uint8 ``(N, H, W, 3)`` images."""
    from dnfer.engine.batches import predict_probs
    from dnfer.engine.checkpoint import load_model
    from dnfer.engine.device import resolve_device

    dev = resolve_device(device)
    pre = ckpt.preprocessing
    return predict_probs(load_model(ckpt, dev), images, batch_size=batch_size, device=dev, mean=pre.mean,
                         std=pre.std, precision=ckpt.inference_precision(dev),
                         progress="audit: posteriors" if progress else None)


def _pick_checkpoint(run_dir: Path, which: str) -> Path:
    if which not in ("last", "best"):
        raise ConfigError(f"--which {which!r}: expected last or best")
    path = run_dir / f"{which}.pt"
    if not path.is_file():
        other = run_dir / ("best.pt" if which == "last" else "last.pt")
        if other.is_file():
            return other
        raise DataError(f"{run_dir} has no last.pt or best.pt: the run folder must be a directory written by `dnfer train`")
    return path


def audit_run(run_dir: str | Path, *, which: str = "last", kind: str = DEFAULT_SCORE, device: str = "auto",
              batch_size: int = 256, flag_threshold: float = 0.5, log: Callable[[str], None] = print,
              trust_checkpoint: bool = False, progress: bool = False) -> AuditResult:
    """Audit a training run: its checkpoint's un-augmented posteriors + its selection history.

    The training split (images, noisy labels, truth) is rebuilt with ``prepare_data`` from the
    checkpoint's config — the same seed reproduces the same noise and validation carve — and
    checked against the names recorded during training.
    """
    import time

    from dnfer.data.pipeline import prepare_data
    from dnfer.engine.checkpoint import load_checkpoint
    from dnfer.methods.base import parse_params
    from dnfer.registry import METHODS

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run folder {str(run_dir)!r} is not a directory")
    dyn = load_dynamics(run_dir)
    ckpt_path = _pick_checkpoint(run_dir, which)
    ckpt = load_checkpoint(ckpt_path, trust=trust_checkpoint)
    cfg = ckpt.cfg()
    cfg.data.image_size = ckpt.image_size
    ds = prepare_data(cfg.data, seed=cfg.train.seed, log=lambda m: log(f"audit {m}"))
    names = [str(n) for n in dyn["names"]]
    if list(ds.train.names) != names:
        raise DataError(f"{run_dir}: the rebuilt training split differs from the one recorded in train_dynamics.npz "
                        "(dataset files changed since training?)")
    given = np.asarray(dyn["given_labels"], np.int64)
    if not np.array_equal(given, ds.train.labels):
        raise DataError(f"{run_dir}: the rebuilt noisy labels differ from the recorded ones (noise settings changed?)")
    probs = _model_probs(ckpt, ds.train.images, device=device, batch_size=batch_size, progress=progress)
    rate = None
    if "selection_history" in dyn:
        method = METHODS.get(cfg.method.name)
        params = parse_params(method, cfg.method.params, noise_rate=cfg.method.noise_rate)
        warmup = method.selection_warmup_epochs(params)
        rate = selection_rate(dyn["selection_history"], warmup)
    score = audit_scores(probs, given, rate, kind)
    truth = dyn.get("true_labels")
    return AuditResult(names=names, class_names=[str(c) for c in dyn["class_names"]], given=given,
                       probs=probs.astype(np.float32), score=score, selection_rate=rate,
                       true_labels=None if truth is None else np.asarray(truth, np.int64),
                       flag_threshold=flag_threshold, source=f"{run_dir} ({ckpt_path.name})",
                       score_kind=kind if rate is not None else "posterior", seconds=time.perf_counter() - t0,
                       extra={"epochs_done": int(dyn.get("epochs_done", 0)), "method": cfg.method.name,
                              "noise": ds.meta.get("noise"), "images": ds.train.images})


def audit_checkpoint(checkpoint: str | Path, *, data: str | None = None, data_options: dict[str, str] | None = None,
                     device: str = "auto", batch_size: int = 256, flag_threshold: float = 0.5,
                     log: Callable[[str], None] = print, trust_checkpoint: bool = False,
                     progress: bool = False) -> AuditResult:
    """Posterior-only audit of a checkpoint on a dataset's TRAIN split (no selection history).

    With ``data`` the split keeps that dataset's own labels (its truth is unknown unless the
    adapter supplies one); without it the checkpoint's own training data is rebuilt (with its
    noise and truth) via ``prepare_data``.
    """
    import time

    from dnfer.data.pipeline import load_source, prepare_data
    from dnfer.data.spec import parse_data_spec
    from dnfer.engine.checkpoint import load_checkpoint
    from dnfer.engine.evaluate import match_classes

    t0 = time.perf_counter()
    ckpt = load_checkpoint(checkpoint, trust=trust_checkpoint)
    cfg = ckpt.cfg()
    image_size = cfg.data.image_size = ckpt.image_size
    class_names = ckpt.class_names
    if data:
        spec = parse_data_spec(data, dict(data_options or {}))
        ds = load_source(cfg.data, spec, image_size, seed=cfg.train.seed)
        log(f"audit data: {spec} | train {len(ds.train)} | {image_size}px")
    else:
        ds = prepare_data(cfg.data, seed=cfg.train.seed, log=lambda m: log(f"audit {m}"))
    ds = match_classes(ds, class_names, data)
    if len(ds.train) == 0:
        raise DataError(f"--data {data}: the training split is empty")
    probs = _model_probs(ckpt, ds.train.images, device=device, batch_size=batch_size, progress=progress)
    given = ds.train.labels
    score = audit_scores(probs, given, None, "posterior")
    truth = ds.train.true_labels
    return AuditResult(names=list(ds.train.names), class_names=class_names, given=given, probs=probs.astype(np.float32),
                       score=score, selection_rate=None, true_labels=truth, flag_threshold=flag_threshold,
                       source=str(checkpoint), score_kind="posterior", seconds=time.perf_counter() - t0,
                       extra={"images": ds.train.images})


def summary_lines(result: AuditResult, top: int = 10) -> list[str]:
    """Human-readable lines: counts, quality against the truth (when known) and the top suspects."""
    lines = [f"audited {len(result.given)} training samples from {result.source} (score: {result.score_kind})",
             f"flagged {int(result.flagged.sum())} as likely mislabelled (score >= {result.flag_threshold} "
             "and the model suggests another class)"]
    q = result.quality()
    if q is not None:
        lines.append(f"against the known truth ({q['n_noisy']} noisy labels): AUROC {q['auroc']:.4f} | "
                     f"precision@{q['n_noisy']} {q['precision_at_n_noisy']:.4f} | "
                     f"precision@{q['k_100']} {q['precision_at_100']:.4f} | "
                     f"flagged precision {q['flagged_precision']:.4f} recall {q['flagged_recall']:.4f}")
    sugg = result.suggested
    for r, i in enumerate(result.order()[:top], start=1):
        lines.append(f"  {r:3d}. {result.names[i]}: {result.class_names[result.given[i]]} -> "
                     f"{result.class_names[sugg[i]]} (score {result.score[i]:.3f})")
    return lines


def quality_json(result: AuditResult) -> str:
    q = result.quality()
    return json.dumps({k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in (q or {}).items()})
