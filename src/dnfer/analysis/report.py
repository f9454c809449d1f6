"""One self-contained HTML report of a training run (``dnfer report RUN_DIR``).

Everything is inline: matplotlib plots and image thumbnails are PNG ``data:`` URIs, the style is
one ``<style>`` block, there is no script, and a Content-Security-Policy meta tag forbids any
other source, so opening the file makes no network request. Sections: run summary, training
curves, per-class threshold traces, selected fraction per class, selection precision/recall over
epochs, the last epoch's test confusion matrix and per-class accuracy, and the label audit (score
histogram and a grid of the most suspect training images with given -> suggested labels).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dnfer.analysis.audit import (
    DEFAULT_SCORE,
    AuditResult,
    audit_run,
    audit_scores,
    load_dynamics,
    selection_rate,
)
from dnfer.analysis.tensorboard import plot_text
from dnfer.config import comparable_config
from dnfer.errors import DataError, DnferError
from dnfer.io_safety import write_text_atomic

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2f4f;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;opacity:.8;font-size:13px}
main{max-width:1180px;margin:0 auto;padding:10px 24px 40px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);margin:18px 0;padding:14px 20px}
h2{font-size:17px;margin:4px 0 10px;color:#1d2f4f}p.note{font-size:13px;color:#555;margin:4px 0 10px}
table.kv{border-collapse:collapse;font-size:13px}table.kv td{padding:3px 14px 3px 0;border-bottom:1px solid #eee}
table.kv td:first-child{color:#666}
img.plot{max-width:100%;height:auto;display:block;margin:6px auto}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(132px,1fr));gap:10px}
figure{margin:0;background:#fafbfc;border:1px solid #e3e6ea;border-radius:6px;padding:6px;text-align:center}
figure img{width:96px;height:96px;image-rendering:auto;border-radius:4px}
figcaption{font-size:11.5px;line-height:1.35;margin-top:4px;overflow-wrap:anywhere}
.given{color:#b3261e;font-weight:600}.sugg{color:#146c2e;font-weight:600}.lbl{display:block;white-space:nowrap}.meta{color:#777}
.tag{display:inline-block;font-size:10px;border-radius:3px;padding:0 4px;margin-top:2px}
.tag.noisy{background:#fde2e1;color:#8c1d18}.tag.clean{background:#e3f1e6;color:#1e5631}
"""


def _png_uri(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _thumb_uri(image: np.ndarray, size: int = 96) -> str:
    """PNG data URI of a uint8 ``(H, W, 3)`` image scaled to ``size`` px (bicubic: tiny inputs stay legible)."""
    from PIL import Image

    im = Image.fromarray(np.ascontiguousarray(image))
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The epoch records of ``metrics.jsonl``, in epoch order (a repeated epoch keeps its last line)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise DataError(f"{path} does not exist: `dnfer report` needs a run directory written by `dnfer train`")
    by_epoch: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            by_epoch[int(rec["epoch"])] = rec
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path} line {n} is not a JSON epoch record") from None
    if not by_epoch:
        raise DataError(f"{path} is empty: the run has not finished an epoch")
    return [by_epoch[e] for e in sorted(by_epoch)]


def _series(records: list[dict[str, Any]], key: str) -> np.ndarray:
    """float ``(E,)`` of a scalar key (NaN where missing)."""
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in records])


def _per_class(records: list[dict[str, Any]], key: str, k: int) -> np.ndarray | None:
    """float ``(E, K)`` of a per-class list key, or None if no epoch has it."""
    if not any(isinstance(r.get(key), list) for r in records):
        return None
    out = np.full((len(records), k), np.nan)
    for e, r in enumerate(records):
        vals = r.get(key)
        if isinstance(vals, list):
            out[e, : len(vals)] = [np.nan if v is None else float(v) for v in vals[:k]]
    return out


def _views(records: list[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in records:
        for key in r:
            if key.startswith("threshold_") and key.removeprefix("threshold_") not in seen:
                seen.append(key.removeprefix("threshold_"))
    return seen


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.grid": True, "grid.alpha": 0.3,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _epoch_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def _class_colors(k: int) -> list[Any]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(k)]


def plot_curves(records: list[dict[str, Any]]) -> str:
    plt = _plt()
    ep = _series(records, "epoch")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.1))
    axes[0].plot(ep, _series(records, "train_loss"), "o-", color="#1f77b4", ms=3)
    axes[0].set_title("training loss")
    for key, label, color in (("train_acc_given", "train (given labels)", "#999999"), ("val_acc", "validation", "#ff7f0e"),
                              ("test_acc", "test (clean)", "#2ca02c")):
        s = _series(records, key)
        if np.isfinite(s).any():
            axes[1].plot(ep, 100 * s, "o-", label=label, color=color, ms=3)
    axes[1].set_title("accuracy (%)")
    axes[1].legend(fontsize=8)
    for key, label in (("lr", "backbone"), ("head_lr", "head")):
        s = _series(records, key)
        if np.isfinite(s).any() and (s > 0).all():
            axes[2].plot(ep, s, "o-", label=label, ms=3)
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    axes[2].legend(fontsize=8)
    for ax in axes:
        _epoch_axis(ax)
    fig.tight_layout()
    return _png_uri(fig)


def plot_per_class_traces(records: list[dict[str, Any]], prefix: str, class_names: list[str], title: str,
                          warmup: int | None, percent: bool = False) -> str | None:
    """One panel per view: a line per class of ``<prefix><view>`` over epochs."""
    views = [v for v in _views(records) if _per_class(records, f"{prefix}{v}", len(class_names)) is not None]
    if not views:
        return None
    plt = _plt()
    ep = _series(records, "epoch")
    colors = _class_colors(len(class_names))
    fig, axes = plt.subplots(1, len(views), figsize=(5.6 * len(views) + 1.6, 3.2), squeeze=False)
    for ax, v in zip(axes[0], views, strict=True):
        vals = _per_class(records, f"{prefix}{v}", len(class_names))
        assert vals is not None
        for c, name in enumerate(class_names):
            ax.plot(ep, 100 * vals[:, c] if percent else vals[:, c], "o-", ms=2.5, color=colors[c], label=plot_text(name))
        if warmup and warmup < ep.max():
            ax.axvline(warmup + 0.5, color="#888", ls="--", lw=1)
            ax.text(warmup + 0.6, ax.get_ylim()[1], "end of warm-up", fontsize=7, color="#666", va="top")
        ax.set_title(f"{title} — {v} view")
        _epoch_axis(ax)
    axes[0][-1].legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return _png_uri(fig)


def plot_selection_quality(records: list[dict[str, Any]], warmup: int | None) -> str | None:
    views = [v for v in _views(records) if np.isfinite(_series(records, f"selection_precision_{v}")).any()]
    if not views:
        return None
    plt = _plt()
    ep = _series(records, "epoch")
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    styles = {"precision": "-", "recall": "--", "f1": ":"}
    colors = {v: c for v, c in zip(views, ("#1f77b4", "#d62728", "#2ca02c", "#9467bd"), strict=False)}
    for v in views:
        for part, ls in styles.items():
            ax.plot(ep, 100 * _series(records, f"selection_{part}_{v}"), ls, marker="o", ms=2.5, color=colors[v],
                    label=f"{v} {part}")
    if warmup and warmup < ep.max():
        ax.axvline(warmup + 0.5, color="#888", ls="--", lw=1)
    ax.set_title("clean-sample selection vs the truth (%)")
    _epoch_axis(ax)
    ax.legend(fontsize=7.5, ncol=len(views), loc="lower right")
    fig.tight_layout()
    return _png_uri(fig)


def plot_confusion(record: dict[str, Any], class_names: list[str]) -> str | None:
    from dnfer.analysis.tensorboard import confusion_figure

    cm = record.get("test_confusion")
    if cm is None:
        return None
    _plt()
    return _png_uri(confusion_figure(np.asarray(cm), class_names, title=f"test confusion, epoch {record['epoch']}"))


def plot_per_class_accuracy(record: dict[str, Any], class_names: list[str]) -> str | None:
    acc = record.get("test_per_class_acc")
    if not acc:
        return None
    plt = _plt()
    vals = np.array([np.nan if a is None else 100 * float(a) for a in acc])
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.barh(range(len(class_names)), np.nan_to_num(vals), color=_class_colors(len(class_names)))
    ax.set_yticks(range(len(class_names)), [plot_text(c) for c in class_names])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    for i, v in enumerate(vals):
        ax.text(min(np.nan_to_num(v) + 1, 88), i, "-" if np.isnan(v) else f"{v:.1f}", va="center", fontsize=8)
    ax.set_title(f"test accuracy per class (%), epoch {record['epoch']}")
    fig.tight_layout()
    return _png_uri(fig)


def plot_score_histogram(result: AuditResult) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    bins = np.linspace(0, 1, 26)
    noisy = result.is_noisy
    if noisy is None:
        ax.hist(result.score, bins=bins, color="#1f77b4")
    else:
        ax.hist(result.score[~noisy], bins=bins, alpha=0.7, color="#2ca02c", label=f"label correct ({int((~noisy).sum())})")
        ax.hist(result.score[noisy], bins=bins, alpha=0.7, color="#d62728", label=f"label wrong ({int(noisy.sum())})")
        ax.legend(fontsize=8)
    ax.axvline(result.flag_threshold, color="#444", ls="--", lw=1)
    ax.set_xlabel("label-issue score (higher = more suspect)")
    ax.set_ylabel("training samples")
    ax.set_title("audit score distribution")
    fig.tight_layout()
    return _png_uri(fig)


def _fallback_audit(run_dir: Path, why: str) -> AuditResult:
    """Audit from train_dynamics.npz alone (augmented last-epoch posteriors; no images)."""
    dyn = load_dynamics(run_dir)
    given = np.asarray(dyn["given_labels"], np.int64)
    probs = np.asarray(dyn["last_probs"], np.float32)
    rate = selection_rate(dyn["selection_history"]) if "selection_history" in dyn else None
    truth = dyn.get("true_labels")
    return AuditResult(names=[str(n) for n in dyn["names"]], class_names=[str(c) for c in dyn["class_names"]],
                       given=given, probs=probs, score=audit_scores(probs, given, rate, DEFAULT_SCORE),
                       selection_rate=rate,
                       true_labels=None if truth is None else np.asarray(truth, np.int64),
                       source=f"{run_dir} (recorded dynamics only: {why})", score_kind=DEFAULT_SCORE)


def _kv_table(rows: list[tuple[str, str]]) -> str:
    return "<table class='kv'>" + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"


def _pct(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * float(v):.2f}%"


def _img(uri: str | None, alt: str) -> str:
    return "" if uri is None else f"<img class='plot' src='{uri}' alt='{html.escape(alt)}'>"


def thumbnails_html(result: AuditResult, top: int) -> str:
    images = result.extra.get("images")
    if images is None:
        return "<p class='note'>Images unavailable (the run's data could not be loaded), so no thumbnails.</p>"
    sugg = result.suggested
    noisy = result.is_noisy
    cells = []
    for rank, i in enumerate(result.order()[:top], start=1):
        g, s = result.class_names[result.given[i]], result.class_names[sugg[i]]
        tag = ""
        if noisy is not None:
            truth = result.class_names[result.true_labels[i]]  # type: ignore[index]
            tag = (f"<br><span class='tag noisy'>really {html.escape(truth)}</span>" if noisy[i]
                   else "<br><span class='tag clean'>label was right</span>")
        name = html.escape(result.names[i])
        cells.append(
            f"<figure><img src='{_thumb_uri(np.asarray(images[np.array([i])][0]))}' alt='{name}' title='{name}'>"
            f"<figcaption><span class='lbl'><span class='given'>{html.escape(g)}</span> &rarr; "
            f"<span class='sugg'>{html.escape(s)}</span></span><span class='meta'>#{rank} · score {result.score[i]:.2f}</span>{tag}</figcaption></figure>")
    return "<div class='grid'>" + "".join(cells) + "</div>"


def render_report(run_dir: str | Path, *, out: str | Path | None = None, top: int = 48, which: str = "last",
                  device: str = "auto", log: Callable[[str], None] = print, progress: bool = False) -> Path:
    """Write ``RUN/report.html`` (or ``out``) and return its path.

    ``progress``: progress bars on stderr (a terminal only) over the audit's inference pass and the figures.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {str(run_dir)!r} does not exist")
    records = read_metrics(run_dir)
    summary: dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        except (ValueError, OSError) as e:  # UnicodeDecodeError is a ValueError
            raise DataError(f"{run_dir / 'summary.json'} is not a valid summary ({type(e).__name__}: {e}); "
                            "delete it or rerun `dnfer train --resume`") from None
        if not isinstance(summary, dict):
            raise DataError(f"{run_dir / 'summary.json'} is not a valid summary (not a JSON object)")
    try:
        result: AuditResult | None = audit_run(run_dir, which=which, device=device, log=log, progress=progress)
    except DataError as e:
        if not (run_dir / "train_dynamics.npz").is_file():
            result = None
            log(f"report: no label audit ({e})")
        else:
            result = _fallback_audit(run_dir, str(e))
            log(f"report: audit from recorded dynamics only ({e})")
    except DnferError as e:
        result = None
        log(f"report: no label audit ({e})")
    class_names = result.class_names if result is not None else summary.get("class_names") or [
        str(i) for i in range(len(records[-1].get("test_per_class_acc") or []))]
    method = (result.extra.get("method") if result is not None else None) or summary.get("method", "?")
    warmup = _warmup(run_dir)
    last = records[-1]
    from dnfer.progress import progress_bar

    bar = progress_bar(5, "report: figures", enabled=progress)
    rows = [("run", str(run_dir)), ("method", str(method)), ("dataset", str(summary.get("dataset", "?"))),
            ("noise (realised)", f"{summary.get('noise', '?')} ({_pct(summary.get('noise_realised_rate'))})"),
            ("model", str(summary.get("model", "?"))), ("epochs", str(last["epoch"])),
            ("final test accuracy", _pct(last.get("test_acc"))),
            ("best-val epoch / its test accuracy", f"{summary.get('best_val_epoch', '-')} / {_pct(summary.get('best_val_test_acc'))}")]
    parts = [f"<section><h2>Run</h2>{_kv_table(rows)}</section>",
             "<section><h2>Training curves</h2>" + _img(plot_curves(records), "training curves") + "</section>"]
    bar.update(1)
    thr = plot_per_class_traces(records, "threshold_", class_names, "class thresholds", warmup)
    if thr:
        parts.append("<section><h2>Per-class thresholds</h2><p class='note'>Mean over the epoch's mini-batches of the "
                     "threshold each class's given-label posterior had to reach to count as clean.</p>"
                     + _img(thr, "threshold traces") + "</section>")
    frac = plot_per_class_traces(records, "selected_fraction_per_class_", class_names, "selected (%)", warmup, percent=True)
    sq = plot_selection_quality(records, warmup)
    bar.update(2)
    if frac or sq:
        parts.append("<section><h2>Clean-sample selection</h2><p class='note'>Share of each class's training samples "
                     "selected as clean; precision = share of selected samples whose label is right, recall = share "
                     "of right labels selected.</p>" + _img(frac, "selected fraction") + _img(sq, "selection quality")
                     + "</section>")
    parts.append("<section><h2>Test set, last epoch</h2><div style='display:flex;flex-wrap:wrap;gap:10px;"
                 "justify-content:center;align-items:center'>" + _img(plot_confusion(last, class_names), "confusion matrix")
                 + _img(plot_per_class_accuracy(last, class_names), "per-class accuracy") + "</div></section>")
    bar.update(1)
    if result is not None:
        q = result.quality()
        note = (f"Score = {'mean of (1 - post-warm-up selection rate) and ' if result.score_kind == 'combined' else ''}"
                f"(1 - posterior of the given label); source: {result.source}. "
                f"{int(result.flagged.sum())} of {len(result.given)} samples flagged.")
        if q is not None:
            note += (f" Against the known truth ({q['n_noisy']} wrong labels): AUROC {q['auroc']:.3f}, "
                     f"precision@{q['n_noisy']} {q['precision_at_n_noisy']:.3f}.")
        parts.append(f"<section><h2>Label audit</h2><p class='note'>{html.escape(note)}</p>"
                     + _img(plot_score_histogram(result), "score histogram") + "</section>")
        parts.append(f"<section><h2>Top {min(top, len(result.given))} suspected mislabelled images</h2>"
                     "<p class='note'>Given label &rarr; suggested label (the model's argmax), most suspect first."
                     "</p>" + thumbnails_html(result, top) + "</section>")
    bar.update(1)
    bar.close()
    title = f"dnfer report — {html.escape(run_dir.name or str(run_dir))}"
    doc = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
           f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
           f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{title}</title>"
           f"<style>{_CSS}</style></head><body><header><h1>{title}</h1><p>{html.escape(str(method))} · "
           f"{len(records)} epochs · {len(class_names)} classes</p></header><main>{''.join(parts)}</main></body></html>\n")
    path = Path(out) if out else run_dir / "report.html"
    write_text_atomic(path, doc)
    return path


def _warmup(run_dir: Path) -> int | None:
    """The run's selection warm-up in epochs (methods with a ``warmup_epochs`` option), else None."""
    import yaml

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return None
    try:
        # every option's value, defaults included, in the current layout (older runs migrate)
        params = comparable_config(yaml.safe_load(cfg_path.read_text()) or {}, source=str(cfg_path))["method"]["params"]
        value = params.get("warmup_epochs")
        return None if value is None else int(value)
    except (yaml.YAMLError, DnferError, TypeError, ValueError, AttributeError):
        return None
