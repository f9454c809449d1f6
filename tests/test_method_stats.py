"""Every method's own statistics reach metrics.jsonl: step stats reduced as the method declares,
per-sample scores compared over clean and noisy samples, selected/rejected group purity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.conftest import tiny_config

from dnfer.engine.checkpoint import load_checkpoint
from dnfer.engine.records import EpochStats, method_stats_record, stats_dict
from dnfer.engine.step import StepResults
from dnfer.engine.trainer import fit
from dnfer.methods.base import Method, StepResult
from dnfer.methods.coteaching import forget_rate

TIMING = ("epoch_seconds", "train_images_per_second")


def _fit(tmp_path: Path, method: str, epochs: int, params: dict, noise_rate: float | None = None,
         **train: object) -> tuple[list[dict], Path]:
    cfg = tiny_config(str(tmp_path / method), epochs=epochs, **train)
    cfg.method.name, cfg.method.params, cfg.method.noise_rate = method, params, noise_rate
    fit(cfg, log=lambda m: None)
    run = tmp_path / method
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()], run


def _finite(*values: object) -> bool:
    return all(isinstance(v, float) and math.isfinite(v) for v in values)


def _n_train(run: Path) -> int:
    return len(np.load(run / "train_dynamics.npz")["given_labels"])


def test_dnfer_reports_sup_and_cons_losses_after_warmup(tmp_path) -> None:
    (warm, after), run = _fit(tmp_path, "dnfer", 2, {"warmup_epochs": 1, "alpha": 0.5})
    assert "loss_sup" not in warm and "loss_cons" not in warm  # warm-up: plain CE on both views
    assert _finite(after["loss_sup"], after["loss_cons"], after["dnfer_cons_share"])
    assert after["loss_sup"] > 0 and after["loss_cons"] > 0
    assert 0.0 < after["dnfer_cons_share"] < 1.0
    # noise among the selected is what precision misses
    assert after["noisy_fraction_selected_weak"] == pytest.approx(1 - after["selection_precision_weak"])
    assert 0.0 <= after["noisy_fraction_rejected_weak"] <= 1.0
    assert after["threshold_weak"] and "threshold_weak" not in {k for k in after if k.startswith("threshold/")}


def test_scn_reports_relabel_counts_and_group_purity(tmp_path) -> None:
    # margin_2 = 0: every sample of the low group whose prediction differs from its label is relabelled
    recs, run = _fit(tmp_path, "scn", 2, {"relabel_epoch": 1, "margin_2": 0.0})
    n = _n_train(run)
    first, second = recs
    for rec in recs:
        for key in ("scn_relabelled", "scn_relabelled_total"):
            assert float(rec[key]).is_integer() and 0 <= rec[key] <= n, (key, rec[key])
        for key in ("noisy_fraction_selected_importance", "noisy_fraction_rejected_importance"):
            assert 0.0 <= rec[key] <= 1.0, key
        for key in ("scn_importance_mean", "scn_importance_mean_clean", "scn_importance_mean_noisy"):
            assert 0.0 < rec[key] < 1.0, key  # sigmoid weights
        assert _finite(rec["scn_rank_loss"], rec["scn_weight_mean"])
    # each sample is seen once an epoch and a relabel always changes the label, so epoch 1's
    # relabels are distinct samples; relabels are never undone
    assert first["scn_relabelled_total"] == first["scn_relabelled"] > 0
    assert first["scn_relabelled_total"] <= second["scn_relabelled_total"]
    assert second["scn_relabelled_total"] <= first["scn_relabelled_total"] + second["scn_relabelled"]
    assert second["scn_relabelled_total"] == int((load_checkpoint(run / "last.pt").resume["method"]["relabels"] >= 0).sum())
    # purity recomputed from the run's per-sample dynamics (high group = selected)
    dyn = np.load(run / "train_dynamics.npz")
    high = dyn["selection_history"][-1, :, 0]
    noisy = dyn["given_labels"] != dyn["true_labels"]
    assert second["noisy_fraction_selected_importance"] == pytest.approx(noisy[high == 1].mean())
    assert second["noisy_fraction_rejected_importance"] == pytest.approx(noisy[high == 0].mean())


def test_rul_reports_uncertainty_of_clean_and_noisy_samples(tmp_path) -> None:
    (rec,), run = _fit(tmp_path, "rul", 1, {})
    clean, noisy, mean = rec["rul_uncertainty_mean_clean"], rec["rul_uncertainty_mean_noisy"], rec["rul_uncertainty_mean"]
    assert _finite(clean, noisy, mean) and min(clean, noisy) > 0
    assert min(clean, noisy) - 1e-6 <= mean <= max(clean, noisy) + 1e-6  # a weighted mean of the two
    assert 0.0 < rec["rul_weight_self_mean"] < 1.0


def test_eac_reports_ce_and_cam_losses(tmp_path) -> None:
    (rec,), _ = _fit(tmp_path, "eac", 1, {})
    assert _finite(rec["loss_ce"], rec["loss_cam"]) and rec["loss_ce"] > 0 and rec["loss_cam"] >= 0


def test_coteaching_reports_the_scheduled_forget_rate(tmp_path) -> None:
    recs, _ = _fit(tmp_path, "coteaching", 2, {"tk": 2}, noise_rate=0.4)
    assert recs[0]["coteaching_forget_rate"] == 0.0
    assert forget_rate(1, 0.4, 2) == pytest.approx(0.2)  # 0.4 * (1 / 2)
    assert recs[1]["coteaching_forget_rate"] == pytest.approx(0.2, abs=1e-6)  # stored as float32
    for rec in recs:
        assert _finite(rec["loss_main"], rec["loss_peer"]) and rec["loss_main"] > 0 and rec["loss_peer"] > 0
        for v in ("main", "peer"):
            assert 0.0 <= rec[f"noisy_fraction_selected_{v}"] <= 1.0


class _Interrupt(Exception):
    pass


def test_scn_stats_resume_mid_epoch_exactly(tmp_path, monkeypatch) -> None:
    """Sums, counts, last values and per-sample scores travel in the mid-epoch checkpoint."""
    from dnfer.methods.scn import SCN

    params = {"relabel_epoch": 1, "margin_2": 0.0}
    straight, _ = _fit(tmp_path / "a", "scn", 2, params, save_every_steps=2)
    original, calls = SCN.training_step, [0]

    def interrupting(self, model, batch, ctx):
        calls[0] += ctx.epoch == 1
        if calls[0] == 4:  # epoch 2, step 3: after the step-2 checkpoint
            raise _Interrupt
        return original(self, model, batch, ctx)

    monkeypatch.setattr(SCN, "training_step", interrupting)
    cfg = tiny_config(str(tmp_path / "b" / "scn"), epochs=2, save_every_steps=2)
    cfg.method.name, cfg.method.params = "scn", params
    with pytest.raises(_Interrupt):
        fit(cfg, log=lambda m: None)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "b" / "scn" / "last.pt").resume["state"]["step"] == 2
    fit(cfg, log=lambda m: None, resume=True)
    resumed = [json.loads(ln) for ln in (tmp_path / "b" / "scn" / "metrics.jsonl").read_text().splitlines()]
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    assert [strip(r) for r in straight] == [strip(r) for r in resumed]
    assert "scn_relabelled" in resumed[1] and "scn_importance_mean_noisy" in resumed[1]


def test_step_results_reduce_stats_as_declared_and_keep_sample_scores() -> None:
    """mean over the steps that returned a stat, sum, last value; (K,) stats element-wise;
    per-sample scores land on their rows (NaN where unseen)."""
    n, k = 10, 3
    stats = EpochStats(selected=None, probs=np.zeros((n, k), np.float16))
    reductions = {"c/events": "sum", "c/total": "last"}
    steps = [([0, 1, 2], {"c/loss": 1.0, "c/events": 2.0, "c/total": 2.0, "c/vec": [1.0, 2.0, 3.0]}),
             ([3, 4], {"c/loss": 2.0, "c/events": 1.0, "c/total": 3.0, "c/vec": [3.0, 4.0, 5.0]}),
             ([5, 0], {"c/events": 0.0, "c/total": 3.0})]  # a stat a step does not return
    for i, (rows, values) in enumerate(steps):
        b = len(rows)
        out = StepResult(loss=torch.tensor(0.0), logits=torch.randn(b, k),
                         stats={name: torch.tensor(v) for name, v in values.items()},
                         sample_scores={"c/score": torch.arange(b, dtype=torch.float32) + 10 * i})
        StepResults.start(out, torch.zeros(b, dtype=torch.long), torch.tensor(rows), torch.tensor([0.0, 0.0]),
                          torch.tensor(False), reductions=reductions).add_to(stats, world_size=1)
    assert stats.threshold_sums == {}
    restored = EpochStats(**stats_dict(stats))  # what a mid-epoch checkpoint restores
    for s in (stats, restored):
        rec = method_stats_record(s, _NoTruth())
        assert rec["c_loss"] == 1.5 and rec["c_events"] == 3.0 and rec["c_total"] == 3.0
        assert rec["c_vec"] == [2.0, 3.0, 4.0]
        expect = np.array([21, 1, 2, 10, 11, 20, np.nan, np.nan, np.nan, np.nan], np.float32)
        np.testing.assert_array_equal(s.sample_scores["c/score"], expect)
        assert rec["c_score_mean"] == pytest.approx(np.nanmean(expect))
        assert "c_score_mean_clean" not in rec  # no truth, no clean/noisy split


class _NoTruth:
    class train:  # noqa: N801
        labels = np.zeros(10, np.int64)
        true_labels = None


def test_methods_declare_valid_reductions() -> None:
    with pytest.raises(TypeError, match="stat_reductions"):
        type("Bad", (Method,), {"stat_reductions": {"x": "median"}})
