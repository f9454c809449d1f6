"""Exact resume: SIGKILL mid-epoch, or kills at random moments, + ``--resume`` == uninterrupted;
torn/corrupt checkpoints; a damaged metrics.jsonl rebuilt from the checkpoint or named.

The reference run trains in this process; the killed and resumed runs are real ``dnfer train``
processes (CPU, fp32, one thread: bitwise deterministic).
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
from dnfer.errors import DnferError
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


def _records(n: int) -> list[dict]:
    return [{"epoch": e, "test_acc": e / 10, "test_confusion": [[e, 1], [0, 2]], "val_acc": None} for e in range(1, n + 1)]


def _lines(recs: list[dict]) -> list[str]:
    return [json.dumps(r) for r in recs]


@pytest.mark.parametrize("with_lines", [True, False])
def test_metrics_log_drops_lines_after_checkpoint_and_torn_lines(tmp_path: Path, with_lines: bool) -> None:
    """A kill after the last checkpoint leaves lines of later epochs and a torn last line: both go,
    silently, whether or not the checkpoint carries the epochs' lines."""
    log = MetricsLog(tmp_path, tensorboard=False, enabled=True)
    lines = _lines(_records(3))
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"epoch": 4, "te')  # killed mid-write
    assert log.resume(2, lines[:2] if with_lines else None, "last.pt") is None
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:2]
    assert log.lines == lines[:2]  # what the next checkpoint carries
    # a mid-epoch checkpoint of epoch 1: nothing finished, nothing kept
    assert log.resume(0, [] if with_lines else None, "last.pt") is None
    assert (tmp_path / "metrics.jsonl").read_text() == "" and log.lines == []


DAMAGE = {  # name: (damaged lines of a 4-epoch log, the message naming it)
    "garbled": (lambda ls: [ls[0], ls[1], ls[2].replace(":", "#", 1), ls[3]], ":3 was not valid JSON"),
    "torn_then_appended": (lambda ls: [ls[0], ls[1][:20], *ls[2:]], ":2 was not valid JSON"),
    "not_utf8": (lambda ls: [ls[0], "\udcff", *ls[2:]], ":2 was not valid JSON"),
    "deleted": (lambda ls: [ls[0], ls[2], ls[3]], " has no line for epoch 2 (line 2 holds epoch 3)"),
    "deleted_last": (lambda ls: ls[:3], " has no line for epoch 4"),
    "garbled_last": (lambda ls: [*ls[:3], ls[3][:-3]], ":4 was not valid JSON"),
    "repeated": (lambda ls: [ls[0], ls[1], ls[1], ls[2], ls[3]], ":3 repeats epoch 2"),
    "edited": (lambda ls: [ls[0], ls[1].replace('"test_acc": 0.2', '"test_acc": 0.9'), *ls[2:]],
               ":2 differs from the checkpoint's line of epoch 2"),
    "not_a_record": (lambda ls: [ls[0], "[1, 2]", *ls[2:]], ":2 is not an epoch record"),
    "missing_file": (None, " is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_metrics_log_damage_is_rebuilt_from_the_checkpoint_or_named(tmp_path: Path, damage: str) -> None:
    """Damage to a line of an epoch the checkpoint has finished is never dropped silently: with the
    checkpoint's lines the log is rebuilt exactly, with a warning naming the line; without them
    (an older checkpoint) resuming stops naming file and line, leaving the file as it was."""
    edit, message = DAMAGE[damage]
    path, good = tmp_path / "metrics.jsonl", _lines(_records(4))

    def damage_it() -> bytes:
        if edit is None:
            path.unlink(missing_ok=True)
            return b""
        path.write_bytes("".join(ln + "\n" for ln in edit(good)).encode("utf-8", "surrogateescape"))
        return path.read_bytes()

    damage_it()
    warning = MetricsLog(tmp_path, tensorboard=False, enabled=True).resume(4, good, "RUN/last.pt")
    assert warning is not None and "\n" not in warning and f"{path}{message}" in warning, warning
    assert warning.startswith("warning: ") and warning.endswith("; rebuilt epochs 1-4 from RUN/last.pt")
    assert path.read_text().splitlines() == good

    if damage == "edited":  # without the lines a changed value cannot be told from the real one (below)
        return
    before = damage_it()
    with pytest.raises(DnferError) as err:
        MetricsLog(tmp_path, tensorboard=False, enabled=True).resume(4, None, "RUN/last.pt")
    text = str(err.value)
    assert f"{path}{message}" in text and "--overwrite" in text and "\n" not in text, text
    assert (path.read_bytes() if path.exists() else b"") == before  # untouched


def test_metrics_log_edited_line_without_lines_is_kept(tmp_path: Path) -> None:
    """An older checkpoint has no lines to compare with: a well-formed log is taken as it is."""
    lines = _lines(_records(3))
    lines[1] = lines[1].replace('"test_acc": 0.2', '"test_acc": 0.9')
    (tmp_path / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))
    log = MetricsLog(tmp_path, tensorboard=False, enabled=True)
    assert log.resume(3, None, "last.pt") is None
    assert log.lines == lines


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


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".dnfer.lock"))
    return dst


@pytest.mark.parametrize("damage", ["garbled", "deleted"])
def test_resume_rebuilds_a_damaged_metrics_line_from_the_checkpoint(reference: Path, tmp_path: Path,
                                                                    damage: str) -> None:
    """A damaged line of a finished epoch is rebuilt from last.pt (which carries every finished
    epoch's record) with a one-line warning naming it, and training then continues the log."""
    run = _copy_run(reference, tmp_path / "run")
    good = (reference / "metrics.jsonl").read_text().splitlines()
    lines = list(good)
    if damage == "garbled":
        lines[1] = lines[1][: len(lines[1]) // 2] + "\x00garbage"
    else:
        del lines[1]
    (run / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))
    messages: list[str] = []
    fit(_cfg(run, "--epochs", "4"), log=messages.append, resume=True)  # one more epoch after the rebuild
    warnings = [m for m in messages if "rebuilt" in m]
    named = f"{run / 'metrics.jsonl'}:2 was not valid JSON" if damage == "garbled" else "has no line for epoch 2"
    assert len(warnings) == 1 and named in warnings[0] and "\n" not in warnings[0], messages
    assert warnings[0].endswith(f"rebuilt epochs 1-3 from {run / 'last.pt'}")
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert after[:3] == good  # the uninterrupted run's lines, byte for byte (timing fields too)
    assert len(after) == 4 and json.loads(after[3])["epoch"] == 4
    assert load_checkpoint(run / "last.pt").resume["metrics_lines"] == after


def _without_lines(run: Path) -> None:
    """Make ``run/last.pt`` look written by a dnfer whose checkpoints had no epochs' lines."""
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt.resume.pop("metrics_lines") == (run / "metrics.jsonl").read_text().splitlines()
    atomic_save(ckpt, run / "last.pt")


def test_older_checkpoint_with_damaged_metrics_stops_naming_the_line(reference: Path, tmp_path: Path,
                                                                      capsys) -> None:
    from dnfer.cli import main

    run = _copy_run(reference, tmp_path / "run")
    _without_lines(run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace('"epoch": 2,', '"epoch": 2')
    (run / "metrics.jsonl").write_text("".join(ln + "\n" for ln in lines))
    before = (run / "metrics.jsonl").read_bytes()
    code = main(["train", *ARGS, "--out", str(run), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert f"{run / 'metrics.jsonl'}:2 was not valid JSON" in err[0] and "--overwrite" in err[0], err
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing dropped or rewritten


def test_older_checkpoint_still_drops_a_torn_last_line_silently(reference: Path, tmp_path: Path) -> None:
    run = _copy_run(reference, tmp_path / "run")
    _without_lines(run)
    good = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(good + good.splitlines()[-1].replace('"epoch": 3', '"epoch": 4')[:40])
    messages: list[str] = []
    fit(_cfg(run, "--epochs", "4"), log=messages.append, resume=True)
    assert not [m for m in messages if "warning" in m or "rebuilt" in m], messages
    after = (run / "metrics.jsonl").read_text().splitlines()
    assert after[:3] == good.splitlines() and json.loads(after[3])["epoch"] == 4
    # the checkpoints it writes from now on carry the lines, the first ones taken from the intact file
    assert load_checkpoint(run / "last.pt").resume["metrics_lines"] == after


# Runs `dnfer train ARGS` as a series of attempts, each a child forked from this one process (so the
# imports are paid once), the first fresh, the others with --resume; attempt i dies with
# os._exit(KILLED) at kill i of KILL_PLAN (JSON), the last one runs to the end. Prints one
# "ATTEMPT {json}" line per attempt.
KILL_DRIVER = r"""
import json, os, sys
from pathlib import Path
from dnfer.cli import main
from dnfer.engine import records, trainer
from dnfer.methods.dnfer import DNFER

KILLED = 86

def arm(kill):
    kind, at = kill["kind"], kill["at"]
    if kind == "step":  # before the training step of global step `at`
        step = DNFER.training_step
        def training_step(self, model, batch, ctx):
            if ctx.step == at:
                os._exit(KILLED)
            return step(self, model, batch, ctx)
        DNFER.training_step = training_step
    elif kind == "metrics":  # part-way through writing epoch `at`'s metrics.jsonl line
        write = records.MetricsLog.write
        def torn_write(self, record, class_names):
            if record["epoch"] == at:
                line = json.dumps(record) + "\n"
                with open(self.path, "a") as f:
                    f.write(line[: max(1, int(len(line) * kill["fraction"]))])
                os._exit(KILLED)
            return write(self, record, class_names)
        records.MetricsLog.write = torn_write
    else:  # the checkpoint after `at` global steps: its file is written, its rename to kill["dest"] not done
        saving, save_last, replace = [None], trainer._Training.save_last, os.replace
        def recording_save_last(self, rngs=None):
            saving[0] = self.state["global_step"]
            return save_last(self, rngs)
        def dying_replace(src, dst, *a, **k):
            if saving[0] == at and Path(dst).name == kill["dest"]:
                os._exit(KILLED)
            return replace(src, dst, *a, **k)
        trainer._Training.save_last, os.replace = recording_save_last, dying_replace

plan = json.loads(os.environ["KILL_PLAN"])
for attempt, kill in enumerate([*plan, None]):
    sys.stdout.flush(); sys.stderr.flush()  # or the child would print this process's buffer again
    pid = os.fork()
    if pid == 0:
        try:
            if kill:
                arm(kill)
            code = main(["train", *sys.argv[1:], *(["--resume"] if attempt else [])])
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 70
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    print("ATTEMPT " + json.dumps({"kill": kill, "exit": code}), flush=True)
"""
KILLED = 86


def random_kill_plan(seed: int) -> list[dict]:
    """Three kills at random moments of the 3-epoch run, one of each kind, in the order they happen.

    ``at`` is a global step: ``step`` dies before that training step (mid-epoch, or right after an
    epoch's checkpoint); ``metrics`` dies writing epoch ``at``'s line (cut at ``fraction``; 1.0 =
    whole, before the epoch's checkpoint); ``rename`` dies in the checkpoint taken after ``at``
    steps, with the file written but its rename to ``dest`` not done (``last.prev.pt``: the old
    ``last.pt`` still in place; ``last.pt``: only ``last.prev.pt`` left).
    """
    rng = random.Random(seed)
    epochs = 3
    saves = sorted({e * STEPS_PER_EPOCH + s for e in range(epochs) for s in (2, 4)}
                   | {e * STEPS_PER_EPOCH for e in range(1, epochs + 1)})
    at = rng.choice(saves)
    kills = [
        {"kind": "step", "at": rng.randrange(1, epochs * STEPS_PER_EPOCH)},
        {"kind": "metrics", "at": rng.randrange(1, epochs + 1), "fraction": rng.choice([rng.uniform(0.05, 0.95), 1.0])},
        # the first checkpoint has no last.pt to move aside
        {"kind": "rename", "at": at, "dest": "last.pt" if at == saves[0] else rng.choice(["last.prev.pt", "last.pt"])},
    ]

    def moment(k: dict) -> float:  # after `at` steps: a checkpoint, then the next step; epoch ends log first
        if k["kind"] == "step":
            return k["at"] + 0.5
        if k["kind"] == "metrics":
            return k["at"] * STEPS_PER_EPOCH + 0.1
        return k["at"] + (0.2 if k["dest"] == "last.prev.pt" else 0.25)

    # Each resumed attempt restarts at the last complete checkpoint before the previous kill, so
    # a later moment is always reached again: every kill happens.
    return sorted(kills, key=moment)


#: Seeds whose plans together hold every variant (test_kill_plans_cover_every_variant); more with
#: DNFER_KILL_SEEDS=4,5,6 (each adds ~10-20 s).
KILL_SEEDS = [2, 3, *(int(s) for s in os.environ.get("DNFER_KILL_SEEDS", "").split(",") if s.strip())]


def test_kill_plans_cover_every_variant() -> None:
    kills = [k for seed in KILL_SEEDS[:2] for k in random_kill_plan(seed)]
    assert {k["at"] % STEPS_PER_EPOCH == 0 for k in kills if k["kind"] == "step"} == {True, False}  # epoch start, mid
    assert {k["fraction"] == 1.0 for k in kills if k["kind"] == "metrics"} == {True, False}  # whole line, torn
    assert {k["dest"] for k in kills if k["kind"] == "rename"} == {"last.pt", "last.prev.pt"}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_random_kills_then_resume_is_bit_identical(reference: Path, tmp_path: Path, seed: int) -> None:
    """Killed at three random moments (seeded) and resumed each time, a run ends bit-identical to
    the uninterrupted one: summary.json, every metrics.jsonl line, train_dynamics.npz, the weights.

    The kills are real process deaths at chosen points, not wall-clock SIGKILLs (slow and
    flaky): each attempt is a child process that calls ``os._exit`` there, so, as under SIGKILL,
    no ``finally``, ``except`` or ``atexit`` code runs — a temporary checkpoint stays on disk, a
    torn line stays in metrics.jsonl, the run-folder lock is freed by the kernel only. An
    in-process exception would run the cleanup a real kill skips. The children are forked from one
    driver process that has imported dnfer but run nothing yet, so each attempt costs its training
    only, not a Python start-up.
    """
    plan = random_kill_plan(seed)
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-c", KILL_DRIVER, *ARGS, "--out", str(run)],
                         env={**os.environ, "KILL_PLAN": json.dumps(plan)}, capture_output=True, text=True,
                         timeout=280)
    out = res.stdout + res.stderr
    attempts = [json.loads(ln.split(" ", 1)[1]) for ln in res.stdout.splitlines() if ln.startswith("ATTEMPT ")]
    assert res.returncode == 0 and [a["exit"] for a in attempts] == [KILLED] * len(plan) + [0], (plan, out[-3000:])
    assert "Traceback" not in out and "rebuilt" not in out, out[-3000:]  # a kill's leftovers are no damage
    rename = next(k for k in plan if k["kind"] == "rename")
    if rename["dest"] == "last.pt":  # killed between the renames: last.prev.pt or, at the first save, nothing
        first = rename["at"] == 2
        assert ("no checkpoint in" if first else "last.pt is missing; trying the previous checkpoint") in out, out[-3000:]
    assert not [p.name for p in run.iterdir() if ".tmp-" in p.name]  # killed writers' temporaries swept
    assert_same_run(reference, run)
