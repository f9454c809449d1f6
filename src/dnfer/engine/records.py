"""What a run writes about itself: the per-epoch accumulators, ``metrics.jsonl``, the console
line, ``train_dynamics.npz`` (per-sample dynamics for the label audit) and ``summary.json``.

The trainer fills an :class:`EpochStats` during an epoch (through
:class:`dnfer.engine.step.StepResults`), then turns it into one record per epoch here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dnfer import io_safety
from dnfer.config import Config
from dnfer.data.base import FERDataset
from dnfer.engine.device import Precision
from dnfer.engine.metrics import accuracy, confusion_matrix, per_class_accuracy, selection_quality
from dnfer.errors import ConfigError, DnferError
from dnfer.registry import METHODS


@dataclass
class EpochStats:
    """Per-epoch accumulators; per-sample arrays index the training split.

    Attributes:
        threshold_sums: view -> float32 ``(K,)`` sum of the method's thresholds over the steps.
        selected: int8 ``(N, V)`` selection of each sample in each view this epoch (-1 = unseen).
        probs: float16 ``(N, K)`` weak-view posterior of each sample this epoch.
        stat_sums, stat_counts, stat_last: per method statistic (``StepResult.stats`` other than
            thresholds): float64 sum of its values (scalar ``(1,)`` or ``(K,)``), the number of
            steps that returned it, and its last value.
        stat_reductions: per method statistic, ``mean``, ``sum`` or ``last`` (``Method.stat_reductions``).
        sample_scores: per-sample score name -> float32 ``(N,)`` last value of each sample this
            epoch (NaN = unseen).
    """

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    steps: int = 0
    skipped_steps: int = 0
    threshold_sums: dict[str, np.ndarray] = field(default_factory=dict)
    selected: np.ndarray | None = None
    probs: np.ndarray | None = None
    stat_sums: dict[str, np.ndarray] = field(default_factory=dict)
    stat_counts: dict[str, int] = field(default_factory=dict)
    stat_last: dict[str, np.ndarray] = field(default_factory=dict)
    stat_reductions: dict[str, str] = field(default_factory=dict)
    sample_scores: dict[str, np.ndarray] = field(default_factory=dict)


def stats_dict(stats: EpochStats) -> dict[str, Any]:
    """A copy of ``stats`` as plain data for the checkpoint (no pickled class, no aliasing)."""
    return {f.name: copy.deepcopy(getattr(stats, f.name)) for f in dataclasses.fields(stats)}


class MetricsLog:
    """Appends one JSON object per epoch to ``metrics.jsonl`` (and TensorBoard scalars if asked).

    ``lines`` holds every finished epoch's line (its JSON text, without the newline): checkpoints
    carry them, so that ``--resume`` can rebuild a damaged log exactly (:meth:`resume`). Text,
    not dicts: the rebuilt file is the same bytes, and hashing a checkpoint costs one update per
    epoch rather than one per number.
    """

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.lines: list[str] = []
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install 'dnfer[tensorboard]'") from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any], class_names: list[str]) -> None:
        line = json.dumps(record)
        self.lines.append(line)
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(line + "\n")
        if self.tb is not None:
            from dnfer.analysis.tensorboard import log_epoch

            log_epoch(self.tb, record, class_names)

    def start_fresh(self) -> None:
        """Empty the log: a fresh run never appends to an older run's metrics."""
        self.lines = []
        if self.enabled and self.path.exists():
            io_safety.write_text_atomic(self.path, "")

    def resume(self, epoch: int, saved: list[str] | None, checkpoint: str) -> str | None:
        """Continue the log of a run resumed from a checkpoint taken after ``epoch`` finished epochs.

        Lines of later epochs (written after the checkpoint) and a torn last line (a kill while
        writing it) are dropped silently. Anything else that keeps the file from holding exactly
        one line per epoch 1..``epoch``, in order, equal to the checkpoint's, is damage: a line
        that is not valid JSON, a missing, repeated or changed line, a missing file. Then the log
        is rebuilt from ``saved`` (the checkpoint's line of every finished epoch) and a one-line
        warning naming the damage is returned.

        Args:
            saved: the checkpoint's lines of epochs 1..``epoch``; None for a checkpoint written
                before checkpoints carried them.
            checkpoint: the checkpoint's path, for the messages.

        Raises:
            DnferError: damage, and no ``saved`` lines to rebuild from (names the file and line).
        """
        if not (isinstance(saved, list) and len(saved) == epoch and all(isinstance(t, str) for t in saved)):
            saved = None  # an older checkpoint's (or not this run's): nothing to rebuild from
        if not self.enabled:  # another rank writes the log
            self.lines = list(saved or [])
            return None
        kept, problems, dropped = self._scan(epoch)
        if saved is not None:
            if not problems:  # well formed: every line must also say what the checkpoint says
                problems = [f"{self.path}:{n} differs from the checkpoint's line of epoch {e}"
                            for e, (n, text) in sorted(kept.items()) if text != saved[e - 1]]
            if problems:
                io_safety.write_text_atomic(self.path, "".join(t + "\n" for t in saved))
                self.lines = list(saved)
                more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
                return (f"warning: {'; '.join(problems[:2])}{more}; rebuilt "
                        f"{f'epochs 1-{epoch}' if epoch > 1 else 'epoch 1'} from {checkpoint}")
        elif problems:
            raise DnferError(
                f"--resume: {problems[0]}; {checkpoint} was written by an older dnfer without the epochs' lines, "
                f"so the log cannot be rebuilt: repair {self.path.name} by hand (one JSON line per epoch 1-{epoch}, "
                "in order) or start over with --overwrite")
        if dropped:
            io_safety.write_text_atomic(self.path, "".join(text + "\n" for _, text in sorted(kept.values())))
        self.lines = list(saved) if saved is not None else [t for _, t in sorted(kept.values())]
        return None

    def _scan(self, epoch: int) -> tuple[dict[int, tuple[int, str]], list[str], bool]:
        """Read the log against a checkpoint after ``epoch`` epochs.

        Returns ``(kept, problems, dropped)``: epoch -> (line number, text) of the lines to keep,
        one message per damage found (naming file and line), and whether lines were dropped.
        """
        if not self.path.exists():
            return {}, ([f"{self.path} is missing"] if epoch > 0 else []), False
        lines = self.path.read_bytes().split(b"\n")
        if lines[-1] == b"":  # the file ends with a newline
            lines.pop()
        kept: dict[int, tuple[int, str]] = {}
        problems: list[str] = []
        dropped, torn, unexplained = False, 0, 0  # unexplained: bad lines since the last kept one
        for n, blob in enumerate(lines, 1):
            text, e = _epoch_of(blob)
            if e is None:
                if n == len(lines):  # torn by a kill mid-write; damage only if an epoch is missing
                    torn, dropped = n, True
                    continue
                problems.append(f"{self.path}:{n} {'was not valid JSON' if text is None else 'is not an epoch record'}")
                unexplained += 1
            elif e > epoch:  # written after the checkpoint
                dropped = True
            elif e in kept:
                problems.append(f"{self.path}:{n} repeats epoch {e}")
            elif kept and e < max(kept):
                problems.append(f"{self.path}:{n} holds epoch {e} after epoch {max(kept)}")
            else:
                expected = max(kept, default=0) + 1
                if e - expected > unexplained:
                    problems.append(f"{self.path} has no line for {_epochs_text(expected, e - 1)} (line {n} holds epoch {e})")
                kept[e], unexplained = (n, text), 0
        last = max(kept, default=0)
        if last < epoch:
            if torn:
                problems.append(f"{self.path}:{torn} was not valid JSON")
                unexplained += 1
            if epoch - last > unexplained:
                problems.append(f"{self.path} has no line for {_epochs_text(last + 1, epoch)}")
        return kept, problems, dropped

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _epoch_of(blob: bytes) -> tuple[str | None, int | None]:
    """A metrics line's text and epoch: (None, None) if it is not JSON, (text, None) if it is no
    epoch record."""
    try:
        text = blob.decode("utf-8")
        rec = json.loads(text)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError
        return None, None
    e = rec.get("epoch") if isinstance(rec, dict) else None
    return text, e if isinstance(e, int) and not isinstance(e, bool) and e >= 1 else None


def _epochs_text(first: int, last: int) -> str:
    return f"epoch {first}" if first == last else f"epochs {first}-{last}"


def epoch_record(epoch: int, stats: EpochStats, ds: FERDataset, views: tuple[str, ...], val_probs: np.ndarray | None,
                  test_probs: np.ndarray, lrs: list[float], seconds: float, train_images_per_s: float,
                  selection_ran: bool = True) -> dict[str, Any]:
    """The per-epoch diagnostics written to metrics.jsonl (accuracies as fractions).

    ``selection_ran`` False (DNFER's warm-up epochs, whose masks steer nothing) writes the
    selection fields as null: a number there would report a selection that did not happen.
    """
    k = ds.num_classes
    rec: dict[str, Any] = {"epoch": epoch + 1, "lr": lrs[0], "head_lr": lrs[1] if len(lrs) > 1 else lrs[0]}
    rec["train_loss"] = stats.loss_sum / max(stats.steps - stats.skipped_steps, 1)
    rec["train_acc_given"] = stats.correct / max(stats.seen, 1)
    rec["skipped_steps"] = stats.skipped_steps
    if val_probs is not None and ds.val is not None:
        rec["val_acc"] = accuracy(ds.val.labels, val_probs.argmax(1))
    test_pred = test_probs.argmax(1)
    cm = confusion_matrix(ds.test.labels, test_pred, k)
    rec["test_acc"] = accuracy(ds.test.labels, test_pred)
    rec["test_per_class_acc"] = [None if math.isnan(a) else float(a) for a in per_class_accuracy(cm)]
    rec["test_confusion"] = cm.tolist()
    for v, sums in stats.threshold_sums.items():
        rec[f"threshold_{v}"] = (sums / max(stats.steps - stats.skipped_steps, 1)).tolist()
    if stats.selected is not None and views and not selection_ran:
        keys = ["selected_fraction", "selected_fraction_per_class", "selection_precision", "selection_recall",
                "selection_f1"] + (["noisy_fraction_selected", "noisy_fraction_rejected"]
                                   if ds.train.true_labels is not None else [])
        for v in views:
            for key in keys:
                rec[f"{key}_{v}"] = None
    elif stats.selected is not None and views:
        seen = stats.selected[:, 0] >= 0
        labels = ds.train.labels[seen]
        clean = (ds.train.labels == ds.train.true_labels)[seen] if ds.train.true_labels is not None else None
        for j, v in enumerate(views):
            sel = stats.selected[seen, j] == 1
            rec[f"selected_fraction_{v}"] = float(sel.mean()) if len(sel) else float("nan")
            rec[f"selected_fraction_per_class_{v}"] = [
                float(sel[labels == c].mean()) if (labels == c).any() else None for c in range(k)
            ]
            if clean is not None:
                q = selection_quality(sel, clean)
                rec[f"selection_precision_{v}"], rec[f"selection_recall_{v}"], rec[f"selection_f1_{v}"] = (
                    q["precision"], q["recall"], q["f1"])
    if ds.train.true_labels is not None and stats.selected is not None and views and selection_ran:
        # how noisy the selected and the rejected groups are (SCN: high / low importance group)
        seen = stats.selected[:, 0] >= 0
        noisy = (ds.train.labels != ds.train.true_labels)[seen]
        for j, v in enumerate(views):
            sel = stats.selected[seen, j] == 1
            rec[f"noisy_fraction_selected_{v}"] = float(noisy[sel].mean()) if sel.any() else float("nan")
            rec[f"noisy_fraction_rejected_{v}"] = float(noisy[~sel].mean()) if (~sel).any() else float("nan")
    rec.update(method_stats_record(stats, ds))
    rec["epoch_seconds"] = seconds
    rec["train_images_per_second"] = train_images_per_s
    return {k2: (None if isinstance(v2, float) and math.isnan(v2) else v2) for k2, v2 in rec.items()}


def stat_key(name: str) -> str:
    """The ``metrics.jsonl`` key of a method statistic or score: ``loss/sup`` -> ``loss_sup``."""
    return name.replace("/", "_")


def method_stats_record(stats: EpochStats, ds: FERDataset) -> dict[str, Any]:
    """The method's own statistics of the epoch: each ``StepResult.stats`` entry reduced as the
    method declares (mean over the steps that returned it, sum, or last value; ``(K,)`` values
    as lists), and for each per-sample score its mean over the samples seen this epoch, and over
    the clean and the noisy ones when the true labels are known (injected or synthetic noise)."""
    rec: dict[str, Any] = {}
    for name, total in stats.stat_sums.items():
        how = stats.stat_reductions.get(name, "mean")
        value = (stats.stat_last[name] if how == "last" else total if how == "sum"
                 else total / max(stats.stat_counts[name], 1))
        rec[stat_key(name)] = (float(value[0]) if value.size == 1
                               else [None if math.isnan(x) else x for x in value.tolist()])
    clean = ds.train.labels == ds.train.true_labels if ds.train.true_labels is not None else None
    for name, scores in stats.sample_scores.items():
        seen = ~np.isnan(scores)
        key = stat_key(name)
        rec[f"{key}_mean"] = float(scores[seen].mean(dtype=np.float64)) if seen.any() else float("nan")
        if clean is not None:
            for part, mask in (("clean", seen & clean), ("noisy", seen & ~clean)):
                rec[f"{key}_mean_{part}"] = float(scores[mask].mean(dtype=np.float64)) if mask.any() else float("nan")
    return rec


def epoch_line(rec: dict[str, Any], views: tuple[str, ...]) -> str:
    """The console line of an epoch's record (when no progress bar is shown)."""
    parts = [f"epoch {rec['epoch']:3d}", f"loss {rec['train_loss']:.4f}"]
    if rec.get("val_acc") is not None:
        parts.append(f"val {rec['val_acc']:.4f}")
    parts.append(f"test {rec['test_acc']:.4f}")
    if views and rec.get(f"selection_precision_{views[0]}") is not None:
        parts.append(f"sel P/R {rec[f'selection_precision_{views[0]}']:.3f}/{rec[f'selection_recall_{views[0]}']:.3f}")
    parts.append(f"{rec['train_images_per_second']:.0f} img/s")
    return " | ".join(parts)


def human_duration(seconds: float) -> str:
    """``12 s``, ``2 min 40 s``, ``25 min``, ``3 h 05 min``: rounded to what an estimate can promise."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 600:
        return f"{s // 60} min {s % 60} s" if s % 60 else f"{s // 60} min"
    m = round(s / 60)
    return f"{m} min" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def human_bytes(n: int) -> str:
    """``512 B``, ``4.7 MB``, ``1.2 GB`` (powers of 1000, as disk sizes are quoted)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def cost_line(epoch: int, epoch_seconds: float, remaining_epochs: int, checkpoint: Path) -> str:
    """The one estimate printed after the first epoch a process trains: time left, checkpoint size.

    E.g. ``epoch 1 took 12 s; about 2 min 48 s for the remaining 14 epochs; each checkpoint
    (last.pt) takes 9.9 MB``.
    """
    line = f"epoch {epoch + 1} took {human_duration(epoch_seconds)}"
    if remaining_epochs > 0:
        plural = "s" if remaining_epochs != 1 else ""
        line += f"; about {human_duration(epoch_seconds * remaining_epochs)} for the remaining {remaining_epochs} epoch{plural}"
    if checkpoint.is_file():
        line += f"; each checkpoint ({checkpoint.name}) takes {human_bytes(checkpoint.stat().st_size)}"
    return line


#: Models sized for CPU training (docs/performance.md); the others get a cost warning on a CPU.
CPU_SIZED_MODELS = ("resnet10_slim", "tiny_cnn")
#: Training samples/s of ResNet-18 at 64 px on the 2-core development CPU with two views per
#: sample (127 images/s, bf16, docs/performance.md); the cost grows with the pixel count.
RESNET18_CPU_SAMPLES_PER_S_64PX = 60.0


def cpu_cost_warning(device_type: str, model: str, image_size: int, num_train: int, epochs: int) -> str | None:
    """A warning line for a run of a full-size model that will take half an hour or more on a
    CPU (estimated at ResNet-18's speed, a lower bound for larger models), or None."""
    if device_type != "cpu" or model in CPU_SIZED_MODELS:
        return None
    seconds = num_train * epochs * (image_size / 64) ** 2 / RESNET18_CPU_SAMPLES_PER_S_64PX
    if seconds < 1800:
        return None
    return (f"warning: {model} at {image_size} px on a CPU: {num_train} images x {epochs} epochs takes about "
            f"{human_duration(seconds)} or more; --model resnet10_slim trains about 8x faster (the first epoch's "
            "time is printed after it)")


def save_dynamics(run_dir: Path, ds: FERDataset, history: np.ndarray | None, stats: EpochStats, epoch: int) -> None:
    """Per-sample training dynamics for the label audit: selection history and last posteriors."""
    arrays: dict[str, Any] = {
        "names": np.array(ds.train.names), "given_labels": ds.train.labels, "last_probs": stats.probs,
        "class_names": np.array(ds.class_names), "epochs_done": np.array(epoch + 1),
    }
    if ds.train.true_labels is not None:
        arrays["true_labels"] = ds.train.true_labels
    if history is not None:
        arrays["selection_history"] = history[: epoch + 1]
    with io_safety.atomic_path(run_dir / "train_dynamics.npz") as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    skipped = ds.meta.get("skipped")
    if skipped:
        import csv

        with open(run_dir / "skipped.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for rec in skipped for k in rec)))
            w.writeheader()
            w.writerows(skipped)


def run_summary(cfg: Config, ds: FERDataset, state: dict[str, Any], precision: Precision, device: torch.device,
             run_dir: Path, views: tuple[str, ...]) -> dict[str, Any]:
    """The run's ``summary.json``: its settings, final and best-on-validation scores, speed.

    The selection precision/recall are those of the last epoch in which selection ran
    (``selection_epoch``); null, with ``selection_note`` saying why, when there is none.
    """
    rec = state.get("last_record") or {}
    v = views[0] if views else None
    sel = state.get("last_selection_record") or {}
    best_test_at_val = state["best_test_at_val"]
    note = None
    if v and sel.get(f"selection_precision_{v}") is None:
        note = ("selection never ran (every epoch was warm-up)" if not sel
                else "no true labels to score the selection against (no injected noise)")
    summary = {
        "method": cfg.method.name,
        "method_title": METHODS.get(cfg.method.name).title,
        "noise": ds.meta.get("noise"),
        "noise_realised_rate": ds.meta.get("noise_realised_rate"),
        "dataset": ds.meta.get("spec"),
        "class_names": ds.class_names,
        "image_size": ds.meta.get("image_size"),
        "model": cfg.model.name,
        "epochs": state["epoch"],
        "seed": cfg.train.seed,
        "final_test_acc": rec.get("test_acc"),
        "final_val_acc": rec.get("val_acc"),
        "best_val_epoch": state["best_epoch"] or None,
        "best_val_acc": state["best_val"] if state["best_val"] >= 0 else None,
        "best_val_test_acc": None if math.isnan(best_test_at_val) else best_test_at_val,
        "best_test_acc_test_selected": state["best_test"],
        "selection_precision": sel.get(f"selection_precision_{v}") if v else None,
        "selection_recall": sel.get(f"selection_recall_{v}") if v else None,
        "selection_epoch": sel.get("epoch") if v and sel.get(f"selection_precision_{v}") is not None else None,
        "lr": cfg.optim.lr,
        "head_lr": cfg.optim.resolved_head_lr(cfg.model.pretrained),
        "train_seconds": state["train_seconds"],
        "images_per_second": state["images_seen"] / max(state["train_seconds"], 1e-9),
        "skipped_steps": state["skipped_total"],
        "skipped_images": len(ds.meta.get("skipped") or []),  # undecodable images left out (--skip-bad)
        "precision": precision.name,
        "device": str(device),
        "run_dir": str(run_dir),
    }
    if note:
        summary["selection_note"] = note
    return summary


__all__ = ["EpochStats", "MetricsLog", "cost_line", "cpu_cost_warning", "epoch_line", "epoch_record", "human_bytes",
           "human_duration", "method_stats_record", "run_summary", "save_dynamics", "stat_key", "stats_dict"]
