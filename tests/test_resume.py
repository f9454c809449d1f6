"""Exact resume: SIGKILL mid-epoch + ``--resume`` == uninterrupted; torn/corrupt checkpoints.

The reference run trains in this process; the killed and resumed runs are real ``dnfer train``
subprocesses (CPU, fp32, one thread: bitwise deterministic).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dnfer.commands import train as train_command
from dnfer.engine.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_save,
    find_resumable,
    load_checkpoint,
    rotate_and_save,
)
from dnfer.engine.records import MetricsLog
from dnfer.engine.trainer import fit
from dnfer.preprocessing import Preprocessing

pytestmark = pytest.mark.slow

# 84 training rows (12 carved for validation) / batch 16 = 5 steps per epoch; checkpoints after steps 2 and 4.
ARGS = ["--model", "tiny_cnn", "--image-size", "16", "--data-option", "n_train=96", "--data-option", "n_test=32",
        "--noise", "symmetric:0.3", "--batch-size", "16", "--epochs", "3", "--warmup-epochs", "1",
        "--precision", "fp32", "--threads", "1", "--no-progress", "--save-every-steps", "2"]
STEPS_PER_EPOCH = 5
TIMING = {"epoch_seconds", "train_images_per_second", "train_seconds", "images_per_second", "run_dir"}

# Runs `dnfer train` with DNFER's training step patched to stop (sleep) at call number BLOCK_AT
# after touching BLOCK_MARKER, so the parent can SIGKILL it at a known point mid-epoch.
BLOCKING_TRAIN = """
import os, sys, time
from dnfer.methods.dnfer import DNFER
original, calls = DNFER.training_step, [0]
def blocking(self, model, batch, ctx):
    if calls[0] == int(os.environ["BLOCK_AT"]):
        open(os.environ["BLOCK_MARKER"], "w").close()
        time.sleep(600)
    calls[0] += 1
    return original(self, model, batch, ctx)
DNFER.training_step = blocking
from dnfer.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cfg(out: Path, *extra: str):
    """The Config that `dnfer train ARGS EXTRA --out OUT` runs (the train parser alone)."""
    parser = argparse.ArgumentParser()
    train_command.add_parser(parser.add_subparsers())
    return train_command.config_from_args(parser.parse_args(["train", *ARGS, *extra, "--out", str(out)]))


def _strip(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in TIMING}


def assert_same_run(a: Path, b: Path) -> None:
    """Everything but progress/timing fields equal: summary, metrics lines, dynamics, weights."""
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert _strip(sa) == _strip(sb)
    ma, mb = ([json.loads(ln) for ln in (r / "metrics.jsonl").read_text().splitlines()] for r in (a, b))
    assert [_strip(r) for r in ma] == [_strip(r) for r in mb]
    da, db = np.load(a / "train_dynamics.npz"), np.load(b / "train_dynamics.npz")
    assert sorted(da.files) == sorted(db.files)
    for key in da.files:
        assert np.array_equal(da[key], db[key]), key
    for name in ("last.pt", "best.pt"):
        ca, cb = load_checkpoint(a / name), load_checkpoint(b / name)
        parts = [(ca.model, cb.model)]
        if name == "last.pt":  # best.pt holds the weights only
            parts.append((ca.resume["method"], cb.resume["method"]))
            assert ca.resume["state"]["global_step"] == cb.resume["state"]["global_step"]
        else:
            assert ca.resume is None and cb.resume is None
        for pa, pb in parts:
            assert pa.keys() == pb.keys()
            for key in pa:
                assert torch.equal(pa[key], pb[key]), (name, key)
    ea = load_checkpoint(a / "last.pt").resume["optimizer"]["state"]
    eb = load_checkpoint(b / "last.pt").resume["optimizer"]["state"]
    for i in ea:
        assert torch.equal(ea[i]["exp_avg_sq"], eb[i]["exp_avg_sq"]), i


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "straight"
    fit(_cfg(out), log=lambda m: None)
    return out


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(reference: Path, tmp_path: Path) -> None:
    run, marker = tmp_path / "killed", tmp_path / "blocked"
    block_at = STEPS_PER_EPOCH + 3  # epoch 2, step 3: after the step-2 checkpoint, mid-way to step 4's
    env = {**os.environ, "BLOCK_AT": str(block_at), "BLOCK_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_TRAIN, "train", *ARGS, "--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert proc.poll() is None, f"training ended before the kill point: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "training never reached the kill point"
            time.sleep(0.05)
        state = load_checkpoint(run / "last.pt").resume["state"]
        assert (state["epoch"], state["step"]) == (1, 2) and state["epoch_stats"] is not None  # a mid-epoch checkpoint
        # both steps' results are in it (the second reaches the stats a step late: flushed before saving)
        assert (state["epoch_stats"]["steps"], state["epoch_stats"]["seen"]) == (2, 2 * 16)
        assert int((state["epoch_stats"]["selected"] >= 0).all(1).sum()) == 2 * 16
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # epoch 1 only: epoch 2 was lost

    res = subprocess.run([sys.executable, "-m", "dnfer", "train", *ARGS, "--out", str(run), "--resume"],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "epoch 2, step 2" in res.stdout
    assert_same_run(reference, run)


def test_truncated_checkpoint_falls_back_to_previous(reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(_cfg(run, "--epochs", "2", "--save-every-steps", "0", "--keep-checkpoints"), log=lambda m: None)
    assert load_checkpoint(run / "last.prev.pt").resume["state"]["epoch"] == 1
    data = (run / "last.pt").read_bytes()
    (run / "last.pt").write_bytes(data[: len(data) // 2])  # a torn write (e.g. copied from a full disk)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(run / "last.pt")
    messages: list[str] = []
    fit(_cfg(run, "--keep-checkpoints"), log=messages.append, resume=True)  # 3 epochs: continues after epoch 1
    assert any("last.pt" in m and "trying the previous checkpoint" in m for m in messages), messages
    assert any("resumed from" in m and "last.prev.pt" in m for m in messages), messages
    assert_same_run(reference, run)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "not_a_checkpoint"])
def test_unreadable_checkpoints_give_one_clear_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "last.pt"
    atomic_save({"format": "dnfer-checkpoint", "model": {"w": torch.ones(1000)}}, path)
    blob = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(blob[:-100])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(blob)))
    else:
        torch.save({"weights": torch.ones(3)}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    # --resume with no readable checkpoint at all: a clear error, not a fresh start
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        find_resumable(tmp_path, log=lambda m: None)


def test_cli_resume_with_only_corrupt_checkpoints_exits_2(tmp_path: Path, capsys) -> None:
    from dnfer.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"PK\x03\x04 torn")
    code = main(["train", *ARGS, "--out", str(run), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no readable checkpoint" in err[0] and "Traceback" not in err[0]


def _tiny_checkpoint(n: float) -> Checkpoint:
    return Checkpoint("tiny_cnn", {"w": torch.full((3,), n)}, Preprocessing(16, class_names=("a", "b")), {})


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path: Path, monkeypatch) -> None:
    rotate_and_save(_tiny_checkpoint(1), tmp_path)

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        rotate_and_save(_tiny_checkpoint(2), tmp_path)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "last.pt").model["w"][0] == 1 and not (tmp_path / "last.prev.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left behind


def test_metrics_log_drops_lines_after_checkpoint_and_torn_lines(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, tensorboard=False, enabled=True)
    lines = [json.dumps({"epoch": e, "test_acc": 0.5}) for e in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 4, "te')  # killed mid-write
    log.truncate_after(2)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:2]


@pytest.mark.parametrize("backend,workers", [("batched", 0), ("workers", 0), ("workers", 2)])
def test_resumed_epoch_yields_the_same_batches(backend: str, workers: int) -> None:
    """The sampler position is restored: epoch(e, start_step=s) == epoch(e) from step s on,
    whatever the augmentation back-end and its worker count."""
    from dnfer.engine.batches import AugmentSettings, TrainBatches

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    kw = dict(views=("weak", "strong"), batch_size=8, device=torch.device("cpu"), mean=(0.5,) * 3, std=(0.5,) * 3,
              aug=AugmentSettings(16), seed=3, backend=backend)
    full = list(TrainBatches(images, rng.integers(0, 7, 40), workers=0, **kw).epoch(1))
    part = list(TrainBatches(images, rng.integers(0, 7, 40), workers=workers, **kw).epoch(1, start_step=2))
    assert len(full) == 5 and len(part) == 3
    for (va, _, ia), (vb, _, ib) in zip(full[2:], part, strict=True):
        assert torch.equal(ia, ib)
        for v in ("weak", "strong"):
            assert torch.equal(va[v], vb[v]), v


class _Interrupt(Exception):
    pass


def test_interrupted_workers_backend_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    """The ``workers`` augmentation back-end also resumes mid-epoch exactly (in-process interrupt)."""
    from dnfer.methods.dnfer import DNFER

    straight = tmp_path / "straight"
    fit(_cfg(straight, "--augment", "workers", "--epochs", "2"), log=lambda m: None)
    original, calls = DNFER.training_step, [0]

    def interrupting(self, model, batch, ctx):
        calls[0] += 1
        if calls[0] == STEPS_PER_EPOCH + 4:  # epoch 2, step 3: after the step-2 checkpoint
            raise _Interrupt
        return original(self, model, batch, ctx)

    monkeypatch.setattr(DNFER, "training_step", interrupting)
    run = tmp_path / "run"
    with pytest.raises(_Interrupt):
        fit(_cfg(run, "--augment", "workers", "--epochs", "2"), log=lambda m: None)
    monkeypatch.undo()
    assert load_checkpoint(run / "last.pt").resume["state"]["step"] == 2
    fit(_cfg(run, "--augment", "workers", "--epochs", "2"), log=lambda m: None, resume=True)
    assert_same_run(straight, run)
