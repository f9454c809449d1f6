"""Label audit: scores, ranking quality, label_issues.csv, cleanlab export, CLI errors, TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import COLOUR_CLASSES as CLASSES
from tests.conftest import colour_run_config, make_colour_dataset

from dnfer.analysis.audit import (
    CSV_COLUMNS,
    AuditResult,
    audit_checkpoint,
    audit_run,
    audit_scores,
    ranking_quality,
    selection_rate,
)
from dnfer.analysis.tensorboard import confusion_markdown, log_epoch, scalar_items
from dnfer.cli import main as cli_main
from dnfer.engine.trainer import fit


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DNFER run on a planted-noise (30% symmetric) micro set, with --tensorboard."""
    tmp = tmp_path_factory.mktemp("audit")
    data = make_colour_dataset(tmp / "data", per_class=50)
    cfg = colour_run_config(data, tmp / "run", epochs=4)
    cfg.train.tensorboard = True
    fit(cfg, log=lambda _m: None)
    return Path(cfg.out)


# ---------------------------------------------------------------- pure pieces


def test_selection_rate_ignores_unseen_and_warmup() -> None:
    h = np.array([  # (E=3, N=3, V=2)
        [[1, 1], [1, 1], [-1, -1]],   # warm-up epoch: everyone selected
        [[1, 0], [0, 0], [-1, -1]],
        [[1, -1], [0, 1], [-1, -1]],
    ], dtype=np.int8)
    r = selection_rate(h, start_epoch=1)
    assert r[0] == pytest.approx(2 / 3)  # 3 seen looks after warm-up, 2 selected
    assert r[1] == pytest.approx(1 / 4)
    assert np.isnan(r[2])
    # a run stopped inside warm-up falls back to all epochs
    assert selection_rate(h, start_epoch=5)[1] == pytest.approx(3 / 6)


def test_scores_hand_computed() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    given = np.array([0, 0, 1])
    rate = np.array([1.0, 0.0, np.nan])
    np.testing.assert_allclose(audit_scores(probs, given, None, "posterior"), [0.1, 0.8, 0.5])
    np.testing.assert_allclose(audit_scores(probs, given, rate, "combined"), [0.05, 0.9, 0.5])
    hist = audit_scores(probs, given, rate, "history")
    assert hist[1] > hist[0] and hist[1] == pytest.approx(1.0, abs=1e-3)


def test_ranking_quality_hand_computed() -> None:
    score = np.array([0.9, 0.8, 0.1, 0.7, 0.2])
    noisy = np.array([True, False, False, True, False])
    flagged = score >= 0.75
    q = ranking_quality(score, noisy, flagged)
    # pairs (noisy, clean) ranked right: 0.9 beats all 3 clean; 0.7 beats 0.1, 0.2 but not 0.8 -> 5/6
    assert q["auroc"] == pytest.approx(5 / 6)
    assert q["precision_at_n_noisy"] == pytest.approx(0.5)  # top 2 = {0.9 noisy, 0.8 clean}
    assert q["flagged_precision"] == pytest.approx(0.5) and q["flagged_recall"] == pytest.approx(0.5)


def test_csv_and_export_round_trip(tmp_path: Path) -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.6, 0.1]], np.float32)
    res = AuditResult(names=["a.jpg", "b,odd.jpg", "c.jpg"], class_names=["fear", "anger", "neutral"],
                      given=np.array([0, 0, 1]), probs=probs,
                      score=audit_scores(probs, np.array([0, 0, 1]), None, "posterior"))
    rows = list(csv.DictReader(open(res.write_csv(tmp_path / "x.csv"), newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [r["name"] for r in rows] == ["b,odd.jpg", "c.jpg", "a.jpg"]  # most suspect first, commas quoted
    assert rows[0]["given_label"] == "fear" and rows[0]["suggested_label"] == "neutral" and rows[0]["flagged"] == "1"
    assert [int(r["index"]) for r in rows] == [1, 2, 0]
    z = np.load(res.export_pred_probs(tmp_path / "pp.npz"))
    np.testing.assert_array_equal(z["labels"], [0, 0, 1])
    np.testing.assert_allclose(z["pred_probs"], probs)
    from cleanlab.filter import find_label_issues  # the export is exactly what cleanlab takes

    assert find_label_issues(z["labels"], z["pred_probs"]).shape == (3,)


def test_tensorboard_scalars_and_confusion() -> None:
    rec = {"epoch": 3, "lr": 1e-3, "head_lr": 1e-2, "train_loss": 0.5, "test_acc": 0.8, "val_acc": None,
           "test_per_class_acc": [1.0, None], "threshold_weak": [0.4, 0.6], "selected_fraction_weak": 0.7,
           "selected_fraction_per_class_weak": [0.5, None], "selection_precision_weak": 0.9,
           "test_confusion": [[3, 1], [0, 0]], "noisy_fraction_rejected_weak": 0.6, "loss_sup": 0.25,
           "scn_relabelled": 4, "skipped_steps": 0}
    items = dict(scalar_items(rec, ["fear", "anger"]))
    assert items["selection/weak/noisy_fraction_rejected"] == 0.6
    assert items["method/loss_sup"] == 0.25 and items["method/scn_relabelled"] == 4.0
    assert items["steps/skipped"] == 0.0
    assert not [t for t in items if t.startswith("method/") and t.split("/")[1] in ("epoch", "lr", "test_acc")]
    assert items["threshold/weak/anger"] == 0.6 and items["selection/weak/precision"] == 0.9
    assert items["selected_fraction/weak"] == 0.7 and items["selected_fraction/weak/fear"] == 0.5
    assert items["accuracy_per_class/fear"] == 1.0 and "accuracy_per_class/anger" not in items
    assert "accuracy/val" not in items and items["lr/head"] == 0.01
    md = confusion_markdown(np.array(rec["test_confusion"]), ["fear", "anger"])
    assert md.splitlines()[2] == "| fear | 3 | 1 |"

    class Writer:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str, int]] = []

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            self.calls.append(("scalar", tag, step))

        def add_text(self, tag: str, text: str, step: int) -> None:
            self.calls.append(("text", tag, step))

        def add_figure(self, tag: str, fig: object, step: int, close: bool = True) -> None:
            self.calls.append(("figure", tag, step))

        def flush(self) -> None:
            pass

    w = Writer()
    log_epoch(w, rec, ["fear", "anger"])
    assert {c[2] for c in w.calls} == {3}
    assert ("figure", "confusion/test", 3) in w.calls and ("text", "confusion/test", 3) in w.calls


# ---------------------------------------------------------------- end to end


def test_audit_ranks_flipped_samples_first(noisy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = audit_run(noisy_run, log=lambda _m: None)
    noisy = res.is_noisy
    assert noisy is not None and 0.15 < noisy.mean() < 0.45  # the planted 30% noise
    q = res.quality()
    assert q is not None and q["auroc"] > 0.8, q
    assert res.selection_rate is not None and res.score_kind == "posterior"  # the default (docs/audit.md)
    # the history alone already separates: flipped samples are selected less often
    assert np.nanmean(res.selection_rate[noisy]) < np.nanmean(res.selection_rate[~noisy])
    for kind in ("combined", "history"):  # the other scores rank flipped samples first too
        other = audit_run(noisy_run, kind=kind, log=lambda _m: None)
        assert other.score_kind == kind and other.quality()["auroc"] > 0.7

    out = tmp_path / "issues.csv"
    pp = tmp_path / "pp.npz"
    assert cli_main(["audit", str(noisy_run), "--out", str(out), "--export-pred-probs", str(pp), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "AUROC" in text and "precision@" in text
    rows = list(csv.DictReader(open(out, newline="")))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == len(res.names)
    assert {r["given_label"] for r in rows} <= set(CLASSES) and {r["suggested_label"] for r in rows} <= set(CLASSES)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    # row -> recorded name and noisy label agree with the run's dynamics
    dyn = np.load(noisy_run / "train_dynamics.npz")
    for r in rows[:20]:
        i = int(r["index"])
        assert r["name"] == str(dyn["names"][i])
        assert r["given_label"] == str(dyn["class_names"][dyn["given_labels"][i]])
    z = np.load(pp)
    assert z["pred_probs"].shape == (len(rows), 4) and np.allclose(z["pred_probs"].sum(1), 1, atol=1e-3)
    # the TensorBoard event file was written by the same run
    assert any((noisy_run / "tensorboard").glob("events.out.tfevents.*"))


def test_audit_checkpoint_posterior_only(noisy_run: Path) -> None:
    res = audit_checkpoint(noisy_run / "last.pt", log=lambda _m: None)
    assert res.score_kind == "posterior" and res.selection_rate is None
    q = res.quality()
    assert q is not None and q["auroc"] > 0.7


def test_audit_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["audit", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "train_dynamics.npz" in err and "\n" not in err
    assert cli_main(["audit", "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["audit", str(tmp_path), "--data", "synthetic"]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    # a checkpoint alone has no selection history: only the default posterior score works
    assert cli_main(["audit", "--checkpoint", str(tmp_path / "m.pt"), "--score", "combined"]) == 2
    err = capsys.readouterr().err
    assert "--score combined needs RUN_DIR" in err and "\n" not in err.strip()
