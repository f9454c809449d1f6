"""TensorBoard logging of one epoch's diagnostics (the record ``metrics.jsonl`` holds).

Tags (step = epoch number):

- ``loss/train``, ``accuracy/{train_given,val,test}``, ``lr/{backbone,head}``
- ``accuracy_per_class/<class>`` (test recall per class)
- ``threshold/<view>/<class>``: the method's mean per-class threshold in that view
- ``selected_fraction/<view>`` and ``selected_fraction/<view>/<class>``
- ``selection/<view>/{precision,recall,f1,noisy_fraction_selected,noisy_fraction_rejected}``
  when the truth is known
- ``method/<field>``: every other scalar of the record (the method's own statistics, e.g.
  ``method/loss_sup``, ``method/scn_relabelled``)
- ``steps/skipped``: steps skipped for a non-finite loss or gradient
- ``confusion/test``: the test confusion matrix as an image (row-normalised, counts written in)
  and as a markdown table (text tab)
- ``speed/{epoch_seconds,train_images_per_second}``
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Fields logged under their own tags (or not at all, ``epoch`` being the step).
_OWN_TAGS = ("epoch", "threshold_", "selected_fraction_", "selection_", "noisy_fraction_", "test_")

_SCALARS = {
    "train_loss": "loss/train", "train_acc_given": "accuracy/train_given", "val_acc": "accuracy/val",
    "test_acc": "accuracy/test", "lr": "lr/backbone", "head_lr": "lr/head", "epoch_seconds": "speed/epoch_seconds",
    "train_images_per_second": "speed/train_images_per_second", "skipped_steps": "steps/skipped",
}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def scalar_items(record: dict[str, Any], class_names: list[str]) -> list[tuple[str, float]]:
    """All ``(tag, value)`` scalars of one epoch record (None / NaN entries are skipped)."""
    items: list[tuple[str, float]] = [(tag, float(record[key])) for key, tag in _SCALARS.items()
                                      if _finite(record.get(key))]
    for c, a in zip(class_names, record.get("test_per_class_acc") or [], strict=False):
        if _finite(a):
            items.append((f"accuracy_per_class/{c}", float(a)))
    for key, value in record.items():
        if key.startswith("threshold_") and isinstance(value, list):
            view = key.removeprefix("threshold_")
            items += [(f"threshold/{view}/{c}", float(t)) for c, t in zip(class_names, value, strict=False) if _finite(t)]
        elif key.startswith("selected_fraction_per_class_") and isinstance(value, list):
            view = key.removeprefix("selected_fraction_per_class_")
            items += [(f"selected_fraction/{view}/{c}", float(s)) for c, s in zip(class_names, value, strict=False)
                      if _finite(s)]
        elif key.startswith("selected_fraction_") and _finite(value):
            items.append((f"selected_fraction/{key.removeprefix('selected_fraction_')}", float(value)))
        elif key.startswith(("selection_", "noisy_fraction_")):
            for part in ("precision", "recall", "f1", "noisy_fraction_selected", "noisy_fraction_rejected"):
                prefix = part + "_" if part.startswith("noisy") else f"selection_{part}_"
                if key.startswith(prefix) and _finite(value):
                    items.append((f"selection/{key.removeprefix(prefix)}/{part}", float(value)))
        elif key not in _SCALARS and not key.startswith(_OWN_TAGS) and _finite(value):
            items.append((f"method/{key}", float(value)))
    return items


def confusion_markdown(cm: np.ndarray, class_names: list[str]) -> str:
    """Markdown table of an int ``(K, K)`` confusion matrix (rows true, columns predicted)."""
    head = "| true \\ predicted | " + " | ".join(class_names) + " |"
    sep = "|---" * (len(class_names) + 1) + "|"
    rows = [f"| {c} | " + " | ".join(str(int(v)) for v in row) + " |" for c, row in zip(class_names, cm, strict=True)]
    return "\n".join([head, sep, *rows])


def plot_text(name: str) -> str:
    """A class name as matplotlib should print it: ``$`` escaped, so ``$5-$10`` is not mathtext."""
    return name.replace("$", r"\$")


def confusion_figure(cm: np.ndarray, class_names: list[str], title: str = "test confusion (row-normalised)"):
    """A matplotlib figure of a ``(K, K)`` confusion matrix: colour = row share, text = count."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.float64)
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(class_names)
    size = 1.6 + 0.55 * k
    fig, ax = plt.subplots(figsize=(size + 0.8, size), dpi=100)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), [plot_text(c) for c in class_names], rotation=45, ha="right")
    ax.set_yticks(range(k), [plot_text(c) for c in class_names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.55 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def log_epoch(writer: Any, record: dict[str, Any], class_names: list[str]) -> None:
    """Write one epoch record to a ``SummaryWriter`` (step = ``record['epoch']``)."""
    step = int(record["epoch"])
    for tag, value in scalar_items(record, class_names):
        writer.add_scalar(tag, value, step)
    cm = record.get("test_confusion")
    if cm is not None:
        cm_arr = np.asarray(cm)
        writer.add_text("confusion/test", confusion_markdown(cm_arr, class_names), step)
        import matplotlib.pyplot as plt

        fig = confusion_figure(cm_arr, class_names, title=f"test confusion, epoch {step}")
        writer.add_figure("confusion/test", fig, step, close=True)
        plt.close(fig)
    writer.flush()
