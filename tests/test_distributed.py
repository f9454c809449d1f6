"""DDP on CPU (gloo, 2 processes): DNFER's statistics are global-batch properties.

One spawned pair of processes does all the distributed work (process start-up is the cost):

1. threshold policies and selection masks from each rank's half of a batch equal those of the
   concatenated batch; DNFER's averaged gradients equal the single-process gradient;
2. a full ``fit`` with a BatchNorm-free model, compared with a single process that trains on
   exactly the same global batches (each step = concatenation of the two ranks' shards, same
   augmentation): metrics, selection history and final weights agree;
3. a full ``fit`` of tiny_cnn (BatchNorm): final weights AND buffers equal on both ranks.

A last test runs the real CLI under ``torchrun --nproc-per-node 2``.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tests.conftest import tiny_config
from torch import nn

from dnfer.engine import trainer as trainer_mod
from dnfer.engine.batches import TrainBatches
from dnfer.engine.checkpoint import load_checkpoint
from dnfer.models.factory import FERNet
from dnfer.registry import MODELS

pytestmark = pytest.mark.slow
WORLD = 2
PER_RANK_BATCH = 8
POLICIES = [("batch_mean", {}), ("label_mean", {}), ("ema", {"momentum": 0.5}), ("fixed", {"value": 0.3})]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nobn_model(num_classes: int, *, small_input: bool = True, dropout: float = 0.0, weights: str | None = None) -> FERNet:
    """No BatchNorm: per-rank BN statistics would (rightly) differ from a single big batch."""
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
    return FERNet(backbone, 16, num_classes, dropout=dropout)


def _register_test_model() -> None:
    if "nobn_test" not in MODELS:
        MODELS.register("nobn_test")(_nobn_model)


def _cfg(out: Path, model: str, batch_size: int):
    cfg = tiny_config(str(out), epochs=3, batch_size=batch_size)
    cfg.model.name = model
    return cfg


# --------------------------------------------------------------------------- worker (each rank)
def _check_thresholds_and_gradients(rank: int) -> None:
    """Part 1: policies, masks and DNFER's gradient under an all-reduce vs. the whole batch."""
    from dnfer.engine.distributed import all_gather_cat, all_reduce_sum
    from dnfer.methods.base import StepContext, TrainBatch
    from dnfer.methods.dnfer import DNFER, DNFERParams, select_clean
    from dnfer.methods.thresholds import create_threshold

    g = torch.Generator().manual_seed(0)  # the same global data on every rank
    k, b = 7, 2 * PER_RANK_BATCH
    mine = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
    for name, params in POLICIES:
        local, whole = create_threshold(name, k, params), create_threshold(name, k, params)
        for _ in range(3):  # several batches: EMA state must stay equal too
            probs = torch.randn(b, k, generator=g).mul(2).softmax(1)
            labels = torch.randint(0, k - 1, (b,), generator=g)  # class k-1 absent: label_mean's fallback
            tau_d = local(probs[mine], labels[mine], all_reduce_sum)
            tau_s = whole(probs, labels)
            torch.testing.assert_close(tau_d, tau_s, rtol=0, atol=1e-6, msg=f"{name}: rank {rank} threshold")
            mask_d = all_gather_cat(select_clean(probs[mine], labels[mine], tau_d).to(torch.uint8)).bool()
            assert torch.equal(mask_d, select_clean(probs, labels, tau_s)), f"{name}: selection mask"

    # DNFER's full loss after warm-up through a linear "model": DDP averages the ranks' gradients.
    method = DNFER(num_classes=k, num_train=b, params=DNFERParams(warmup_epochs=0))
    lin = nn.Linear(5, k)
    lin.weight.data, lin.bias.data = torch.randn(k, 5, generator=g), torch.randn(k, generator=g)  # same on both ranks
    views = {"weak": torch.randn(b, 5, generator=g), "strong": torch.randn(b, 5, generator=g)}
    labels = torch.randint(0, k, (b,), generator=g)
    ref = method.training_step(lin, TrainBatch(views, labels, torch.arange(b)), StepContext(epoch=1))
    ref.loss.backward()
    grad_ref = lin.weight.grad.clone()
    lin.weight.grad = None
    ctx = StepContext(epoch=1, reduce_sum=all_reduce_sum, world_size=WORLD)
    out = method.training_step(lin, TrainBatch({v: x[mine] for v, x in views.items()}, labels[mine],
                                                torch.arange(b)[mine]), ctx)
    out.loss.backward()
    grad_ddp = all_reduce_sum(lin.weight.grad) / WORLD
    torch.testing.assert_close(grad_ddp, grad_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(all_gather_cat(out.selected.to(torch.uint8)).bool(), ref.selected)
    torch.testing.assert_close(all_reduce_sum(out.loss.detach()) / WORLD, ref.loss.detach(), rtol=1e-5, atol=1e-6)

    # ELR's per-sample targets: every rank stores every rank's rows (StepContext.gather), and the
    # regulariser's gradient averages to the one of the global batch.
    elr = {"warmup_epochs": 0, "elr_lambda": 3.0}
    whole_m, local_m = (DNFER(num_classes=k, num_train=b, params=DNFERParams(**elr)) for _ in range(2))
    lin.weight.grad = None
    whole_m.training_step(lin, TrainBatch(views, labels, torch.arange(b)), StepContext(epoch=1)).loss.backward()
    grad_ref = lin.weight.grad.clone()
    lin.weight.grad = None
    ctx = StepContext(epoch=1, reduce_sum=all_reduce_sum, world_size=WORLD, gather=all_gather_cat)
    local_m.training_step(lin, TrainBatch({v: x[mine] for v, x in views.items()}, labels[mine],
                                          torch.arange(b)[mine]), ctx).loss.backward()
    torch.testing.assert_close(local_m.elr_targets, whole_m.elr_targets, rtol=0, atol=1e-7)
    assert (local_m.elr_targets.sum(1) > 0).all()  # both ranks' rows, on every rank
    torch.testing.assert_close(all_reduce_sum(lin.weight.grad) / WORLD, grad_ref, rtol=1e-5, atol=1e-6)


def _fit_capturing_weights(cfg, rank: int, dump: Path, tag: str = "") -> None:
    """Run ``fit`` and save this rank's final model state (caught at the last evaluation)."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    original = trainer_mod.predict_probs

    def spy(model, images, **kw):
        seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return original(model, images, **kw)

    trainer_mod.predict_probs = spy
    try:
        trainer_mod.fit(cfg, log=lambda m: None)
    finally:
        trainer_mod.predict_probs = original
    torch.save(seen["state"], dump / f"{tag or cfg.model.name}-rank{rank}.pt")


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        _register_test_model()
        _check_thresholds_and_gradients(rank)
        tmp_path = Path(tmp)
        _fit_capturing_weights(_cfg(tmp_path / "ddp_nobn", "nobn_test", PER_RANK_BATCH), rank, tmp_path)
        _fit_capturing_weights(_cfg(tmp_path / "ddp_bn", "tiny_cnn", PER_RANK_BATCH), rank, tmp_path)
        # a NaN loss on rank 1 only: both ranks must skip the same step (no hang, no divergence)
        from dnfer.methods.dnfer import DNFER

        original = DNFER.training_step

        def nan_on_rank1(self, model, batch, ctx):
            out = original(self, model, batch, ctx)
            if rank == 1 and ctx.step == 3:
                out.loss = out.loss * float("nan")
            return out

        DNFER.training_step = nan_on_rank1
        cfg = _cfg(tmp_path / "ddp_nan", "nobn_test", PER_RANK_BATCH)
        cfg.train.nan_policy, cfg.train.epochs = "skip", 2
        _fit_capturing_weights(cfg, rank, tmp_path, tag="nan")
        # the same under `stop`: every rank saves (a collective) and stops at the same step
        cfg = _cfg(tmp_path / "ddp_nan_stop", "nobn_test", PER_RANK_BATCH)
        cfg.train.nan_policy, cfg.train.epochs = "stop", 2
        try:
            trainer_mod.fit(cfg, log=lambda m: None)
            message = "no error"
        except trainer_mod.NumericalError as e:
            message = str(e)
        (tmp_path / f"nan_stop-rank{rank}.txt").write_text(message)
    finally:
        # Tear down together: a rank that destroys its gloo group while the other still holds
        # open pairs can make the other abort ("terminate called without an active exception").
        # A rank that failed mid-collective would leave the other waiting: bounded, then torn down.
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        except RuntimeError:
            pass
        dist.destroy_process_group()


# --------------------------------------------------------------------------- single-process reference
class ConcatShards:
    """Stands in for TrainBatches in one process: step s = rank 0's batch s + rank 1's batch s,
    each with that rank's augmentation, so the global batches equal the DDP run's exactly."""

    def __init__(self, *args, batch_size: int, rank: int = 0, world_size: int = 1, **kw) -> None:
        self.parts = [TrainBatches(*args, batch_size=batch_size // WORLD, rank=r, world_size=WORLD, **kw)
                      for r in range(WORLD)]

    def __len__(self) -> int:
        return len(self.parts[0])

    def epoch(self, epoch: int, start_step: int = 0):
        for shards in zip(*(p.epoch(epoch, start_step) for p in self.parts), strict=True):
            views = {v: torch.cat([s[0][v] for s in shards]) for v in shards[0][0]}
            yield views, torch.cat([s[1] for s in shards]), torch.cat([s[2] for s in shards])


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    return tmp


def _records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def test_thresholds_masks_and_training_match_one_process_on_the_global_batch(ddp_runs: Path, monkeypatch) -> None:
    monkeypatch.setattr(MODELS, "_items", dict(MODELS._items))  # the registration is undone after the test
    _register_test_model()
    monkeypatch.setattr(trainer_mod, "TrainBatches", ConcatShards)
    single = ddp_runs / "single_nobn"
    trainer_mod.fit(_cfg(single, "nobn_test", WORLD * PER_RANK_BATCH), log=lambda m: None)

    ddp = ddp_runs / "ddp_nobn"
    r_ddp, r_one = _records(ddp), _records(single)
    assert [r["epoch"] for r in r_ddp] == [1, 2, 3]  # rank 0 alone writes the metrics
    for a, b in zip(r_ddp, r_one, strict=True):
        for key in ("train_acc_given", "val_acc", "test_acc", "selected_fraction_weak", "selected_fraction_strong",
                    "selection_precision_weak", "selection_recall_strong", "test_confusion"):
            assert a[key] == b[key], (a["epoch"], key)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        for v in ("weak", "strong"):
            np.testing.assert_allclose(a[f"threshold_{v}"], b[f"threshold_{v}"], atol=1e-6)
    d_ddp, d_one = np.load(ddp / "train_dynamics.npz"), np.load(single / "train_dynamics.npz")
    assert np.array_equal(d_ddp["selection_history"], d_one["selection_history"])
    assert (d_ddp["selection_history"][-1] >= 0).mean() > 0.9  # gathered from both ranks, not one shard
    np.testing.assert_allclose(d_ddp["last_probs"].astype(np.float32), d_one["last_probs"].astype(np.float32),
                               atol=2e-3)
    w_ddp, w_one = load_checkpoint(ddp / "last.pt").model, load_checkpoint(single / "last.pt").model
    for name in w_one:
        torch.testing.assert_close(w_ddp[name], w_one[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("model", ["nobn_test", "tiny_cnn", "nan"])
def test_final_weights_and_buffers_equal_across_ranks(ddp_runs: Path, model: str) -> None:
    """Also after a NaN on one rank only ("nan"): every rank skipped that step."""
    r0 = torch.load(ddp_runs / f"{model}-rank0.pt")
    r1 = torch.load(ddp_runs / f"{model}-rank1.pt")
    assert r0.keys() == r1.keys()
    if model == "tiny_cnn":
        assert any("running_mean" in k for k in r0)  # BatchNorm statistics are compared too
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    run = ddp_runs / {"nobn_test": "ddp_nobn", "tiny_cnn": "ddp_bn", "nan": "ddp_nan"}[model]
    saved = load_checkpoint(run / "last.pt").model
    skipped = json.loads((run / "summary.json").read_text())["skipped_steps"]
    assert skipped == (1 if model == "nan" else 0)
    for name in r0:
        assert torch.equal(saved[name], r0[name]), name


def test_nan_on_one_rank_under_stop_stops_every_rank_at_the_same_step(ddp_runs: Path) -> None:
    """The fault flag is all-reduced and read a step late on every rank alike: both ranks raise
    (no hang), and the checkpoint is positioned before the faulty global step 3 with none of its
    update or a later one applied."""
    messages = [(ddp_runs / f"nan_stop-rank{r}.txt").read_text() for r in range(WORLD)]
    assert "non-finite loss" in messages[1] and "global step 3" in messages[1] and "rank 1" in messages[1]
    # rank 0's loss was finite, but DDP's all-reduce brought it rank 1's NaN gradients
    assert "global step 3" in messages[0] and "rank 0" in messages[0] and "stopped with a checkpoint" in messages[0]
    ckpt = load_checkpoint(ddp_runs / "ddp_nan_stop" / "last.pt")
    assert ckpt.resume["state"]["global_step"] == 3
    assert {float(st["step"]) for st in ckpt.resume["optimizer"]["state"].values()} == {3.0}


def test_torchrun_cli_two_processes(tmp_path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "dnfer", "train", "--model", "resnet10_slim", "--image-size", "32", "--data-option", "n_train=96",
           "--data-option", "n_test=32", "--batch-size", "8", "--epochs", "2", "--warmup-epochs", "1",
           # bf16 on CPU: the small-map convolutions (layer3/4 at 32 px) run on the mosaic
           # under DDP's gradient hooks (the in-process runs above cover fp32)
           "--precision", "bf16", "--threads", "1", "--no-progress", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("epoch   1 |") == 1 and res.stdout.count("dnfer run summary") == 1  # rank 0 only
    assert [r["epoch"] for r in _records(out)] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and 0.0 <= summary["final_test_acc"] <= 1.0 and summary["precision"] == "bf16"
    assert load_checkpoint(out / "last.pt").resume["state"]["world_size"] == 2
