"""Evaluation metrics as pure numpy functions."""

from __future__ import annotations

import numpy as np


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 ``(K, K)``: rows = true class, columns = predicted class."""
    true = np.asarray(true, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    return np.bincount(true * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(true: np.ndarray, pred: np.ndarray) -> float:
    true = np.asarray(true)
    return float((true == np.asarray(pred)).mean()) if len(true) else float("nan")


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each class (NaN for classes absent from the truth)."""
    support = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def selection_quality(selected: np.ndarray, is_clean: np.ndarray) -> dict[str, float]:
    """Precision/recall/F1 of a "clean" selection against the truth.

    precision = share of selected samples whose label is really clean;
    recall = share of clean samples that were selected.
    """
    selected = np.asarray(selected, bool)
    is_clean = np.asarray(is_clean, bool)
    tp = float((selected & is_clean).sum())
    n_sel = float(selected.sum())
    n_clean = float(is_clean.sum())
    precision = tp / n_sel if n_sel else float("nan")
    recall = tp / n_clean if n_clean else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else float("nan")
    return {"precision": precision, "recall": recall, "f1": f1}


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the bool ``positive`` labels (ties averaged)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
