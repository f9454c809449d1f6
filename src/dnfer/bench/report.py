"""Sweep outputs as pure functions of the results rows: CSV, markdown tables, accuracy plot.

A results row is a dict with the keys of :data:`RESULT_FIELDS` (accuracies as fractions in
[0, 1], None where undefined). Tables aggregate over seeds: mean ± sample standard deviation
(n - 1 in the denominator); a setting with one finished seed shows its value without ± .

A finished cell is *degenerate* (:func:`degenerate_reason`) when its model learned nothing
useful: at the best-validation epoch at least :data:`COLLAPSE_SHARE` of its test predictions
are one class, or its test accuracy is within :data:`LEVEL_MARGIN` of chance (1/K) or no more
than that above the majority-class rate (what always answering the most frequent class scores).
Such cells are marked in the tables and listed in the notes; the plot draws both levels.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dnfer.io_safety import atomic_path, write_text_atomic

if TYPE_CHECKING:
    from dnfer.bench.spec import SweepSpec
    from dnfer.config import Config

#: results.csv columns (``best_test_acc_test_selected`` only with ``--best-on-test``).
RESULT_FIELDS = (
    "method", "noise", "noise_kind", "noise_rate", "seed", "status",
    "final_test_acc", "best_val_test_acc", "best_val_epoch", "selection_precision", "selection_recall",
    "noise_realised_rate", "train_seconds", "epochs", "chance_rate", "majority_rate", "top_prediction_share",
    "degenerate", "run_dir", "best_test_acc_test_selected",
)
#: A cell whose most frequent test prediction takes at least this share of the test set has collapsed.
COLLAPSE_SHARE = 0.95
#: An accuracy within this (absolute, 0.02 = 2 points) of chance, or at most this above the
#: majority-class rate, is no better than guessing.
LEVEL_MARGIN = 0.02
#: Marker appended to a table cell holding a degenerate seed.
DEGENERATE_MARK = " ⚠"
TEST_SELECTED = "best_test_acc_test_selected"
TEST_SELECTED_TITLE = "Best test accuracy over epochs, selected on the TEST set — for parity with papers only (%)"

#: (metric, title, scale, decimals) of the tables, in order.
TABLES: tuple[tuple[str, str, float, int], ...] = (
    ("best_val_test_acc", "Test accuracy at the best validation epoch (%) — model selected on held-out noisy "
                          "training labels", 100.0, 2),
    ("final_test_acc", "Final-epoch test accuracy (%)", 100.0, 2),
    ("selection_precision", "Clean-sample selection precision at the last epoch (%) — share of selected "
                            "samples whose label is clean", 100.0, 1),
    ("selection_recall", "Clean-sample selection recall at the last epoch (%) — share of clean samples selected",
     100.0, 1),
    ("train_seconds", "Training time per run (s)", 1.0, 1),
)


def fields(best_on_test: bool) -> list[str]:
    return [f for f in RESULT_FIELDS if best_on_test or f != TEST_SELECTED]


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path, *, best_on_test: bool = False) -> None:
    cols = fields(best_on_test)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """results.csv back to rows (numbers parsed, empty cells None)."""
    out = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            row: dict[str, Any] = {}
            for k, v in r.items():
                if v == "":
                    row[k] = None
                elif k in ("seed", "best_val_epoch", "epochs"):
                    row[k] = int(float(v))
                elif k in ("method", "noise", "noise_kind", "status", "run_dir", "degenerate"):
                    row[k] = v
                else:
                    row[k] = float(v)
            out.append(row)
    return out


def confusion_levels(confusion: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """``(chance, majority_rate, top_prediction_share)`` of a ``(K, K)`` test confusion matrix
    (rows = true class, columns = prediction): 1/K, the largest true-class share, the largest
    predicted-class share."""
    k = len(confusion)
    total = sum(sum(row) for row in confusion)
    if k == 0 or total <= 0:
        raise ValueError("an empty confusion matrix has no levels")
    majority = max(sum(row) for row in confusion) / total
    top = max(sum(row[j] for row in confusion) for j in range(k)) / total
    return 1.0 / k, majority, top


def degenerate_reason(acc: float | None, chance: float | None, majority: float | None,
                      top_prediction_share: float | None, *, collapse: float = COLLAPSE_SHARE,
                      margin: float = LEVEL_MARGIN) -> str:
    """Why a finished cell learned nothing useful (``""`` when it did, or when the levels are unknown).

    All arguments are fractions in [0, 1]; ``acc`` is the test accuracy at the best-validation epoch.
    """
    reasons = []
    if top_prediction_share is not None and top_prediction_share >= collapse:
        reasons.append(f"collapsed: {100 * top_prediction_share:.1f}% of test predictions are one class")
    if acc is not None and chance is not None and abs(acc - chance) <= margin:
        reasons.append(f"accuracy {100 * acc:.2f}% is within {100 * margin:g} points of chance ({100 * chance:.2f}%)")
    elif acc is not None and majority is not None and acc <= majority + margin:
        reasons.append(f"accuracy {100 * acc:.2f}% is not {100 * margin:g} points above the majority-class rate "
                       f"({100 * majority:.2f}%)")
    return "; ".join(reasons)


def _ordered(values: Iterable[Any]) -> list[Any]:
    seen: dict[Any, None] = {}
    for v in values:
        seen.setdefault(v, None)
    return list(seen)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def format_cell(values: Sequence[float], *, n_total: int, n_failed: int, scale: float, decimals: int) -> str:
    """``"85.31 ± 1.20"``; ``(2/3)`` when some seeds are missing; ``failed`` / ``–`` when none."""
    if not values:
        return "failed" if n_failed else "–"
    m, s = mean_std([v * scale for v in values])
    text = f"{m:.{decimals}f}" if s is None else f"{m:.{decimals}f} ± {s:.{decimals}f}"
    if len(values) < n_total:
        text += f" ({len(values)}/{n_total})"
    return text


def group_cell(group: Sequence[dict[str, Any]], metric: str, *, scale: float, decimals: int) -> str:
    """One (method, noise) group's ``metric`` over its seeds (:func:`format_cell`); ``–`` when the
    metric is undefined for the method (e.g. CE selects nothing)."""
    ok = [r for r in group if r.get("status") == "ok"]
    vals = [float(r[metric]) for r in ok if r.get(metric) not in (None, "")]
    if ok and not vals:
        return "–"
    failed = sum(r.get("status") == "failed" for r in group)
    return format_cell(vals, n_total=len(group), n_failed=failed, scale=scale, decimals=decimals)


def metric_table(rows: Sequence[dict[str, Any]], metric: str, *, scale: float = 100.0, decimals: int = 2,
                 mark_degenerate: bool = False) -> str:
    """Markdown table: methods as rows, noise settings as columns, mean ± std over seeds.

    ``mark_degenerate``: append :data:`DEGENERATE_MARK` to a cell with a degenerate seed.
    """
    methods = _ordered(r["method"] for r in rows)
    noises = _ordered(r["noise"] for r in rows)
    lines = ["| method | " + " | ".join(noises) + " |", "|---|" + "---|" * len(noises)]
    for m in methods:
        cells = []
        for n in noises:
            group = [r for r in rows if r["method"] == m and r["noise"] == n]
            text = group_cell(group, metric, scale=scale, decimals=decimals)
            if text != "–" and mark_degenerate and any(r.get("status") == "ok" and r.get("degenerate") for r in group):
                text += DEGENERATE_MARK
            cells.append(text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: (metric, heading, scale, decimals) of the console summary (:func:`summary_rows`).
SUMMARY_COLUMNS: tuple[tuple[str, str, float, int], ...] = (
    ("best_val_test_acc", "test % at best val", 100.0, 1),
    ("final_test_acc", "final test %", 100.0, 1),
    ("selection_precision", "sel. P %", 100.0, 1),
    ("selection_recall", "sel. R %", 100.0, 1),
    ("train_seconds", "train s", 1.0, 0),
)


def summary_rows(rows: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row per (noise setting, method), methods side by side within a setting: the noise
    label, the method, then :data:`SUMMARY_COLUMNS` as mean ± std over the finished seeds
    (``–`` where a metric is undefined, e.g. selection for CE; ``failed`` where no seed finished)."""
    out = []
    for n in _ordered(r["noise"] for r in rows):
        for m in _ordered(r["method"] for r in rows):
            group = [r for r in rows if r["method"] == m and r["noise"] == n]
            if not group:
                continue
            cells = [group_cell(group, metric, scale=scale, decimals=decimals)
                     for metric, _, scale, decimals in SUMMARY_COLUMNS]
            mark = DEGENERATE_MARK if any(r.get("status") == "ok" and r.get("degenerate") for r in group) else ""
            out.append([n, m + mark, *cells])
    return out


def markdown_report(rows: Sequence[dict[str, Any]], *, best_on_test: bool = False, title: str = "Benchmark",
                    budget: str = "", notes: Sequence[str] = ()) -> str:
    """The whole results.md: one table per metric plus notes on protocol and failures."""
    seeds = _ordered(r["seed"] for r in rows)
    parts = [f"# {title}", ""]
    if budget:
        parts += [f"Shared budget: {budget}", ""]
    parts += [f"Seeds: {', '.join(str(s) for s in seeds)}. Cells: mean ± sample std over seeds; "
              "(k/n) = only k of n seeds finished.", ""]
    tables = list(TABLES)
    if best_on_test:
        tables.append((TEST_SELECTED, TEST_SELECTED_TITLE, 100.0, 2))
    for metric, heading, scale, decimals in tables:
        if metric in ("selection_precision", "selection_recall") and all(r.get(metric) is None for r in rows):
            continue  # no method in the sweep selects samples
        parts += [f"## {heading}", "", metric_table(rows, metric, scale=scale, decimals=decimals,
                                                     mark_degenerate=metric.endswith("acc") or metric == TEST_SELECTED),
                  ""]
    failed = [r for r in rows if r.get("status") == "failed"]
    pending = [r for r in rows if r.get("status") == "pending"]
    notes = list(notes)
    notes.append("Selection precision/recall compare the method's selected set with the dataset's own labels "
                 "before noise injection; '–' = the method selects nothing (e.g. CE).")
    degenerate = [r for r in rows if r.get("status") == "ok" and r.get("degenerate")]
    if degenerate:
        notes.append(f"{DEGENERATE_MARK.strip()} degenerate cells (the model learned nothing useful; "
                     f"collapse = >= {100 * COLLAPSE_SHARE:g}% of test predictions in one class, or accuracy within "
                     f"{100 * LEVEL_MARGIN:g} points of chance or of the majority-class rate): " + "; ".join(
                         f"{r['method']}/{r['noise']}/seed{r['seed']} ({r['degenerate']})" for r in degenerate))
    if failed:
        notes.append("Failed cells (see train.log in each): " + ", ".join(
            f"{r['method']}/{r['noise']}/seed{r['seed']}" for r in failed))
    if pending:
        notes.append(f"{len(pending)} cells have not run yet.")
    parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(parts)


def plot_accuracy_vs_noise(rows: Sequence[dict[str, Any]], path: str | Path, *, metric: str = "best_val_test_acc",
                           title: str = "") -> None:
    """accuracy (%) vs symmetric noise rate, one line per method, error bars = std over seeds.

    Settings of other kinds (asymmetric, pair-flip) get a second panel with one marker per
    method per setting, so they are never drawn on the symmetric line. Dashed horizontal lines
    mark chance (1/K) and the majority-class rate when the rows carry them; the y-axis always
    spans those levels and at least 0-10 points below the lowest of everything drawn, so cells
    sitting at a trivial level look like it.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r.get(metric) is not None]
    methods = _ordered(r["method"] for r in rows)
    sym = [r for r in ok if r["noise_kind"] in ("none", "symmetric")]
    other = [r for r in ok if r["noise_kind"] not in ("none", "symmetric")]
    other_settings = _ordered(r["noise"] for r in rows if r["noise_kind"] not in ("none", "symmetric"))
    ncols = 2 if other_settings else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 + 3.0 * (ncols - 1), 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1]} if ncols == 2 else None, sharey=True)
    ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, m in enumerate(methods):
        color = colors[i % len(colors)]
        xs = sorted({float(r["noise_rate"]) for r in sym if r["method"] == m})
        stats = [mean_std([100 * float(r[metric]) for r in sym if r["method"] == m and float(r["noise_rate"]) == x])
                 for x in xs]
        if xs:
            ax.errorbar([100 * x for x in xs], [s[0] for s in stats], yerr=[s[1] or 0.0 for s in stats],
                        marker="o", capsize=3, label=m, color=color)
        if ncols == 2:
            ax2 = axes[0][1]
            for j, n in enumerate(other_settings):
                vals = [100 * float(r[metric]) for r in other if r["method"] == m and r["noise"] == n]
                if vals:
                    mu, sd = mean_std(vals)
                    off = (i - (len(methods) - 1) / 2) * 0.6 / max(len(methods), 1)
                    ax2.errorbar([j + off], [mu], yerr=[sd or 0.0], marker="s", capsize=3, color=color, linestyle="none")
    levels = plot_levels(ok)
    drawn = [100 * float(r[metric]) for r in ok] + [100 * v for v in levels.values()]
    for (name, value), style in zip(levels.items(), (":", "--"), strict=False):
        for a in axes[0]:
            a.axhline(100 * value, color="0.35", linestyle=style, linewidth=1,
                      label=f"{name} ({100 * value:.1f}%)" if a is ax else None)
    if drawn:
        ax.set_ylim(*y_limits(drawn))
    ax.set_xlabel("symmetric label noise (%)")
    ylabel = {"best_val_test_acc": "test accuracy at best-val epoch (%)",
              "final_test_acc": "final-epoch test accuracy (%)"}.get(metric, metric)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    if ncols == 2:
        ax2 = axes[0][1]
        ax2.set_xticks(range(len(other_settings)))
        ax2.set_xticklabels(other_settings, rotation=20, fontsize=8)
        ax2.set_xlim(-0.6, len(other_settings) - 0.4)
        ax2.set_title("other noise", fontsize=9)
        ax2.grid(alpha=0.3)
    fig.suptitle(title or "accuracy vs label noise (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            fig.savefig(f, dpi=120, format="png")
    finally:
        plt.close(fig)


def plot_levels(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``{"chance": c, "majority class": m}`` (fractions), each the mean over ``rows`` that carry it."""
    out = {}
    for key, name in (("chance_rate", "chance"), ("majority_rate", "majority class")):
        vals = [float(r[key]) for r in rows if r.get(key) is not None]
        if vals:
            out[name] = sum(vals) / len(vals)
    return out


def y_limits(values: Sequence[float]) -> tuple[float, float]:
    """y-axis range (%) of the accuracy plot: 0 (or 10 points under the lowest value drawn, if that is
    above 40) up to 5 points over the highest, within [0, 100]; ``values`` include the levels."""
    lo, hi = min(values), max(values)
    bottom = 0.0 if lo - 10 <= 40 else lo - 10
    return bottom, min(100.0, hi + 5)


def _dnfer_warmup(base: Config) -> int:
    """DNFER's warm-up in the base config (its default when the base does not set it)."""
    from dnfer.methods.dnfer import DNFERParams

    return int(base.method.params.get("warmup_epochs", DNFERParams().warmup_epochs))


def budget_text(spec: SweepSpec) -> str:
    """One line describing what every cell shares."""
    b = spec.base
    opts = ", ".join(f"{k}={v}" for k, v in sorted(b.data.options.items()))
    size = b.data.image_size if b.data.image_size is not None else "default"
    return (f"data `{b.data.spec}`{f' ({opts})' if opts else ''}, {size} px, model `{b.model.name}`"
            f"{' (pretrained ' + b.model.pretrained + ')' if b.model.pretrained else ''}, {b.train.epochs} epochs, "
            f"batch {b.train.batch_size}, {b.optim.name} lr {b.optim.lr:g}/{b.optim.resolved_head_lr(b.model.pretrained):g} x{b.optim.lr_decay:g}"
            f"/epoch, DNFER warm-up {_dnfer_warmup(b)} epochs, val fraction "
            f"{b.data.val_fraction:g}, precision {b.train.precision}.")


def write_reports(rows: Sequence[dict[str, Any]], out: str | Path, *, spec: SweepSpec | None = None,
                  notes: Sequence[str] = (), best_on_test: bool = False) -> dict[str, Path]:
    """Write results.csv, results.md and accuracy_vs_noise.png into ``out``; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "md": out / "results.md", "png": out / "accuracy_vs_noise.png"}
    write_csv(rows, paths["csv"], best_on_test=best_on_test)
    title = f"Benchmark: {Path(spec.source).name}" if spec is not None and spec.source != "defaults" else "Benchmark"
    md = markdown_report(rows, best_on_test=best_on_test, title=title,
                         budget=budget_text(spec) if spec is not None else "", notes=notes)
    write_text_atomic(paths["md"], md)
    plot_accuracy_vs_noise(rows, paths["png"])
    return paths
