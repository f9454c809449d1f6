"""Numerical faults: injected NaN/Inf in the loss or the gradients is caught, reported with
epoch/step/rows, and either stops with a checkpoint or skips the step; gradient clipping.

NaNs are injected by wrapping DNFER's training step (monkeypatch): no test-only option exists
in the product.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tests.conftest import tiny_config

from dnfer.engine.checkpoint import load_checkpoint
from dnfer.engine.trainer import NumericalError, fit
from dnfer.methods.dnfer import DNFER

STEPS_PER_EPOCH = 5  # 84 training rows / batch 16


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        return g * float("nan")


def inject(monkeypatch, kind: str, at_steps: set[int], row: int = 3) -> None:
    """Make DNFER's step at the given global steps produce a non-finite ``kind`` (loss, grad)."""
    original = DNFER.training_step

    def faulty(self, model, batch, ctx):
        out = original(self, model, batch, ctx)
        if ctx.step in at_steps:
            if kind == "loss":  # as if one sample's forward overflowed
                out.logits = out.logits.clone()
                out.logits[row] = float("inf")
                out.loss = out.loss + out.logits[row, 0] - out.logits[row, 1]  # inf - inf = nan
            else:
                out.loss = _NaNGrad.apply(out.loss)
        return out

    monkeypatch.setattr(DNFER, "training_step", faulty)


def test_nan_loss_stops_with_checkpoint_and_names_step_and_rows(tmp_path, monkeypatch) -> None:
    cfg = tiny_config(str(tmp_path / "run"), epochs=3)
    inject(monkeypatch, "loss", {STEPS_PER_EPOCH + 2})  # epoch 2, step 2
    rows_seen: list[int] = []
    original = DNFER.training_step

    def spy(self, model, batch, ctx):
        if ctx.step == STEPS_PER_EPOCH + 2:
            rows_seen.append(int(batch.index[3]))
        return original(self, model, batch, ctx)

    monkeypatch.setattr(DNFER, "training_step", spy)
    with pytest.raises(NumericalError) as err:
        fit(cfg, log=lambda m: None)
    msg = str(err.value)
    assert "non-finite loss" in msg and "epoch 2, step 2 (global step 7)" in msg
    assert f"rows with non-finite outputs [{rows_seen[0]}]" in msg and "\n" not in msg
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    state = ckpt.resume["state"]
    assert (state["epoch"], state["step"]) == (1, 2)  # resumable right before the bad step
    # Regression (step results reach the stats one step late): the saved epoch stats hold both
    # good steps before the bad one, the second of them still in flight when the fault came.
    saved = state["epoch_stats"]
    assert (saved["steps"], saved["seen"], saved["skipped_steps"]) == (2, 2 * 16, 0)
    assert int((saved["probs"].float().sum(1) > 0).sum()) == 2 * 16
    assert all(torch.isfinite(v).all() for v in ckpt.model.values() if v.is_floating_point())
    # Global steps 0-6 updated the weights; neither the faulty step 7 (skipped on the device) nor
    # step 8 (queued before step 7's verdict was read) did.
    assert state["global_step"] == 7
    assert {float(s["step"]) for s in ckpt.resume["optimizer"]["state"].values()} == {7.0}
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1

    # the intended recovery: resume the same run with --nan-policy skip
    cfg.train.nan_policy = "skip"
    summary = fit(cfg, log=lambda m: None, resume=True)
    assert summary["epochs"] == 3 and summary["skipped_steps"] == 1


def test_nan_gradient_skip_policy_counts_and_keeps_outputs_finite(tmp_path, monkeypatch) -> None:
    cfg = tiny_config(str(tmp_path / "run"), epochs=3, nan_policy="skip")
    inject(monkeypatch, "grad", {1, STEPS_PER_EPOCH + 4})
    messages: list[str] = []
    summary = fit(cfg, log=messages.append)
    warnings = [m for m in messages if "step skipped" in m]
    assert len(warnings) == 2 and "non-finite gradient (norm nan) at epoch 1, step 1" in warnings[0]
    assert "epoch 2, step 4" in warnings[1]
    assert summary["skipped_steps"] == 2
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # valid JSON, thresholds from good steps only
    records = [json.loads(ln) for ln in text.splitlines()]
    assert [r["skipped_steps"] for r in records] == [1, 1, 0]
    assert all(math.isfinite(r["train_loss"]) for r in records)
    dyn = np.load(tmp_path / "run" / "train_dynamics.npz")
    assert np.isfinite(dyn["last_probs"].astype(np.float32)).all()
    model = load_checkpoint(tmp_path / "run" / "last.pt").model
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_without_the_fault_the_same_run_skips_nothing(tmp_path) -> None:
    summary = fit(tiny_config(str(tmp_path / "run"), epochs=1, nan_policy="skip"), log=lambda m: None)
    assert summary["skipped_steps"] == 0


def test_gradient_clipping_bounds_the_norm(tmp_path, monkeypatch) -> None:
    norms: list[float] = []
    before: list[float] = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        total = original(params, max_norm, *a, **k)
        before.append(float(total))
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    cfg = tiny_config(str(tmp_path / "run"), epochs=1)
    cfg.optim.grad_clip = 0.05
    fit(cfg, log=lambda m: None)
    assert len(norms) == STEPS_PER_EPOCH and max(norms) <= 0.05 * (1 + 1e-4)
    assert min(before) > 0.05  # the clip really engaged


def test_skipped_images_are_listed_with_all_their_fields(tmp_path) -> None:
    """--skip-bad: every skipped file lands in skipped.csv whatever fields the loader reports."""
    import csv
    from types import SimpleNamespace

    from dnfer.engine.records import EpochStats, save_dynamics

    skipped = [{"file": "/d/a.jpg", "reason": "truncated", "split": "train", "name": "a.jpg"},
               {"file": "/d/b.jpg", "reason": "not an image", "split": "test", "name": "b.jpg"}]
    train = SimpleNamespace(names=["x", "y"], labels=np.array([0, 1]), true_labels=None)
    ds = SimpleNamespace(train=train, class_names=["a", "b"], meta={"skipped": skipped})
    save_dynamics(tmp_path, ds, None, EpochStats(probs=np.zeros((2, 2), np.float16)), 0)
    with open(tmp_path / "skipped.csv") as f:
        assert list(csv.DictReader(f)) == skipped
