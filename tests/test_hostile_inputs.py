"""Every command pointed at hostile inputs: one error line, a documented exit code, no traceback,
and the inputs left byte-for-byte unchanged (docs/reliability.md, "Safe outputs").

The table ``CASES`` runs in-process through :func:`dnfer.cli.main`; the lock, the temporary
sweeping, atomic writes, disk-full and Ctrl-C handling have their own tests below.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_colour_dataset, tiny_config
from dnfer import io_safety
from dnfer.cli import EXIT_INTERNAL, EXIT_INTERRUPTED, main
from dnfer.errors import DnferError

TRAIN_FLAGS = ["--model", "tiny_cnn", "--image-size", "16", "--data-option", "n_train=96", "--data-option",
               "n_test=32", "--epochs", "1", "--batch-size", "16", "--precision", "fp32", "--threads", "1",
               "--no-progress", "--warmup-epochs", "0"]  # DNFER's warm-up must be shorter than the run


@dataclass
class World:
    """Inputs shared by the cases (built once): a finished run, files of every hostile kind."""

    root: Path
    run: Path  # a finished 1-epoch run
    png: Path  # a real PNG image
    labels: Path  # RAF-DB label file, train and test rows
    labels_link: Path  # a symbolic link to labels
    nonutf8_labels: Path
    nonutf8_csv: Path  # a csv list naming a Latin-1 file
    user_file: Path  # somebody's file, not written by dnfer
    empty: Path  # a zero-byte file
    user_dir: Path  # a folder holding a user's own summary.json
    bad_dynamics_run: Path  # copy of run with a corrupt train_dynamics.npz
    bad_summary_run: Path  # copy of run with a corrupt summary.json
    no_preproc_ckpt: Path  # a checkpoint without its preprocessing
    readonly_dir: Path
    raf_nonutf8: Path  # RAF-DB layout whose list file has a Latin-1 name
    colour_data: Path  # a tiny class-folder dataset
    bad_cache: Path  # a prepared cache of colour_data whose index.npz is garbage
    images: Path  # folder with one image (predict input)
    out: Path  # scratch folder for outputs (not hashed)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from dnfer.engine.trainer import fit

    root = tmp_path_factory.mktemp("hostile")
    run = root / "run"
    cfg = tiny_config(str(run), epochs=1)
    fit(cfg, log=lambda _m: None)
    png = root / "face.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(png)
    images = root / "images"
    images.mkdir()
    shutil.copy(png, images / "a.png")
    labels = root / "labels.txt"
    labels.write_text("".join(f"train_{i:05d}.jpg {1 + i % 7}\n" for i in range(40))
                      + "".join(f"test_{i:04d}_aligned.jpg {1 + i % 7}\n" for i in range(10)))
    labels_link = root / "labels_link.txt"
    labels_link.symlink_to(labels)
    nonutf8 = root / "labels_latin1.txt"
    nonutf8.write_bytes(b"train_00001.jpg 1\ntrain_caf\xe9.jpg 2\n")
    nonutf8_csv = root / "list.csv"
    nonutf8_csv.write_bytes(b"path,label\nface.png,happy\ncaf\xe9.png,sad\n")
    user_file = root / "notes.txt"
    user_file.write_text("my own notes\n")
    empty = root / "empty.txt"
    empty.write_bytes(b"")
    user_dir = root / "mine"
    user_dir.mkdir()
    (user_dir / "summary.json").write_text('{"mine": true}\n')
    bad_dyn = root / "bad_dynamics_run"
    shutil.copytree(run, bad_dyn)
    (bad_dyn / "train_dynamics.npz").write_bytes(b"PK\x03\x04 this is not a zip archive")
    bad_sum = root / "bad_summary_run"
    shutil.copytree(run, bad_sum)
    (bad_sum / "summary.json").write_text('{"method": "dnfer", truncated')
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=False)
    ckpt.pop("preprocessing", None)
    no_pre = root / "no_preprocessing.pt"
    torch.save(ckpt, no_pre)
    ro = root / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    raf = root / "raf"
    (raf / "Image" / "aligned").mkdir(parents=True)
    (raf / "EmoLabel").mkdir()
    (raf / "EmoLabel" / "list_patition_label.txt").write_bytes(nonutf8.read_bytes())
    colour = make_colour_dataset(root / "colour", per_class=4, size=8)
    bad_cache = root / "bad_cache"
    assert main(["prepare", "--data", f"folder:{colour}", "--image-size", "8", "--out", str(bad_cache),
                 "--workers", "1"]) == 0
    (bad_cache / "index.npz").write_bytes(b"garbage, not an npz")
    out = root / "scratch"
    out.mkdir()
    return World(root, run, png, labels, labels_link, nonutf8, nonutf8_csv, user_file, empty, user_dir, bad_dyn,
                 bad_sum, no_pre, ro, raf, colour, bad_cache, images, out)


def _hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except the scratch folder and run locks."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and "scratch" not in p.relative_to(root).parts and p.name != io_safety.LOCK_NAME:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Case:
    name: str
    argv: Callable[[World], list[str]]
    code: int
    says: str  # a fragment the error line must contain (case-insensitive)


def _ckpt(w: World) -> str:
    return str(w.run / "last.pt")


CASES = [
    # --- outputs that are inputs, folders, existing files, unwritable places
    Case("export-out-is-checkpoint", lambda w: ["export", "--checkpoint", _ckpt(w), "--format", "torchscript",
                                                "--out", _ckpt(w)], 2, "inputs"),
    Case("export-out-is-folder", lambda w: ["export", "--checkpoint", _ckpt(w), "--format", "torchscript",
                                            "--out", str(w.out)], 2, "is a folder"),
    Case("export-out-readonly", lambda w: ["export", "--checkpoint", _ckpt(w), "--format", "torchscript",
                                           "--out", str(w.readonly_dir / "m.torchscript.pt")], 2, "not writable"),
    Case("export-out-existing", lambda w: ["export", "--checkpoint", _ckpt(w), "--format", "torchscript",
                                           "--out", str(w.user_file)], 2, "already exists"),
    Case("audit-out-is-checkpoint", lambda w: ["audit", str(w.run), "--out", _ckpt(w)], 2, "inputs"),
    Case("audit-out-is-metrics", lambda w: ["audit", str(w.run), "--out", str(w.run / "metrics.jsonl"),
                                            "--overwrite"], 2, "inputs"),
    Case("audit-out-is-folder", lambda w: ["audit", str(w.run), "--out", str(w.out)], 2, "is a folder"),
    Case("audit-out-parent-is-file", lambda w: ["audit", str(w.run), "--out",
                                                str(w.user_file / "x.csv")], 2, "is a file"),
    Case("audit-out-existing", lambda w: ["audit", str(w.run), "--out", str(w.user_file)], 2,
         "already exists"),
    Case("audit-pred-probs-is-checkpoint", lambda w: ["audit", str(w.run), "--out", str(w.out / "a.csv"),
                                                      "--export-pred-probs", _ckpt(w)], 2, "inputs"),
    Case("audit-pred-probs-is-dynamics", lambda w: ["audit", str(w.run), "--out", str(w.out / "a.csv"),
                                                    "--export-pred-probs", str(w.run / "train_dynamics.npz"),
                                                    "--overwrite"], 2, "inputs"),
    Case("audit-run-is-file", lambda w: ["audit", _ckpt(w)], 2, "is a file"),
    Case("audit-checkpoint-is-folder", lambda w: ["audit", "--checkpoint", str(w.run)], 2, "is a folder"),
    Case("audit-batch-size-0", lambda w: ["audit", str(w.run), "--batch-size", "0"], 2, "--batch-size"),
    Case("audit-corrupt-dynamics", lambda w: ["audit", str(w.bad_dynamics_run), "--out",
                                              str(w.out / "a.csv")], 2, "train_dynamics.npz"),
    Case("report-out-is-checkpoint", lambda w: ["report", str(w.run), "--out", _ckpt(w)], 2, "inputs"),
    Case("report-out-is-folder", lambda w: ["report", str(w.run), "--out", str(w.out)], 2, "is a folder"),
    Case("report-out-readonly", lambda w: ["report", str(w.run), "--out", str(w.readonly_dir / "r.html")], 2,
         "not writable"),
    Case("report-corrupt-summary", lambda w: ["report", str(w.bad_summary_run), "--out", str(w.out / "r.html"),
                                              "--top", "0"], 2, "summary.json"),
    Case("report-run-is-file", lambda w: ["report", str(w.png)], 2, "is a file"),
    Case("predict-output-is-checkpoint", lambda w: ["predict", str(w.png), "--no-detect", "--checkpoint", _ckpt(w),
                                                    "--out", _ckpt(w)], 2, "inputs"),
    Case("predict-output-is-input-image", lambda w: ["predict", str(w.png), "--no-detect", "--checkpoint", _ckpt(w),
                                                     "--out", str(w.png), "--overwrite"], 2, "inputs"),
    Case("predict-output-existing", lambda w: ["predict", str(w.png), "--no-detect", "--checkpoint", _ckpt(w),
                                               "--out", str(w.user_file)], 2, "already exists"),
    Case("predict-output-is-folder", lambda w: ["predict", str(w.png), "--no-detect", "--checkpoint", _ckpt(w),
                                                "--out", str(w.out)], 2, "is a folder"),
    Case("predict-annotate-into-inputs", lambda w: ["predict", str(w.images), "--no-detect", "--checkpoint",
                                                    _ckpt(w), "--out", str(w.out / "p.jsonl"), "--annotate",
                                                    str(w.images)], 2, "inputs"),
    Case("predict-checkpoint-is-folder", lambda w: ["predict", str(w.png), "--checkpoint", str(w.run)], 2,
         "is a folder"),
    Case("noise-out-is-labels", lambda w: ["noise", "--labels", str(w.labels), "--out", str(w.labels),
                                           "--noise", "symmetric:0.2", "--overwrite"], 2, "inputs"),
    Case("noise-out-is-link-to-labels", lambda w: ["noise", "--labels", str(w.labels), "--out", str(w.labels_link),
                                                   "--noise", "symmetric:0.2", "--overwrite"], 2, "inputs"),
    Case("noise-out-existing", lambda w: ["noise", "--labels", str(w.labels), "--out", str(w.user_file),
                                          "--noise", "symmetric:0.2"], 2, "already exists"),
    Case("noise-mask-is-out", lambda w: ["noise", "--labels", str(w.labels), "--out", str(w.out / "n.txt"),
                                         "--mask-out", str(w.out / "n.txt"), "--noise", "symmetric:0.2"], 2,
         "same file"),
    Case("noise-out-missing-parent-is-file", lambda w: ["noise", "--labels", str(w.labels), "--out",
                                                        str(w.user_file / "n.txt"), "--noise", "symmetric:0.2"],
         2, "is a file"),
    Case("noise-labels-is-folder", lambda w: ["noise", "--labels", str(w.run), "--out", str(w.out / "n.txt"),
                                              "--noise", "symmetric:0.2"], 2, "is a folder"),
    Case("noise-labels-not-utf8", lambda w: ["noise", "--labels", str(w.nonutf8_labels), "--out",
                                             str(w.out / "n.txt"), "--noise", "symmetric:0.2"], 2, ":2: not UTF-8"),
    Case("noise-transition-is-png", lambda w: ["noise", "--labels", str(w.labels), "--out", str(w.out / "n.txt"),
                                               "--transition", str(w.png)], 2, "not a numeric matrix"),
    Case("noise-transition-empty", lambda w: ["noise", "--labels", str(w.labels), "--out", str(w.out / "n.txt"),
                                              "--transition", str(w.empty)], 2, "expected a 7x7 matrix"),
    Case("noise-transition-json", lambda w: ["noise", "--labels", str(w.labels), "--out", str(w.out / "n.txt"),
                                             "--transition", str(w.user_dir / "summary.json")], 2,
         "not a numeric matrix"),
    Case("noise-seed-negative", lambda w: ["noise", "--labels", str(w.labels), "--out", str(w.out / "n.txt"),
                                           "--noise", "symmetric:0.2", "--seed", "-1"], 2, "2**32-1"),
    # --- training: bad values, bad folders
    Case("train-lr-inf", lambda w: ["train", *TRAIN_FLAGS, "--out", str(w.out / "t"), "--lr", "inf"], 2, "finite"),
    Case("train-alpha-nan", lambda w: ["train", *TRAIN_FLAGS, "--out", str(w.out / "t"), "--set",
                                       "method.params.alpha=nan"], 2, "finite"),
    Case("train-seed-negative", lambda w: ["train", *TRAIN_FLAGS, "--out", str(w.out / "t"), "--seed", "-1"], 2,
         "train.seed"),
    Case("train-seed-huge", lambda w: ["train", *TRAIN_FLAGS, "--out", str(w.out / "t"), "--seed", str(2**32)], 2,
         "train.seed"),
    Case("train-config-is-png", lambda w: ["train", "--config", str(w.png)], 2, "not a text"),
    Case("train-config-is-folder", lambda w: ["train", "--config", str(w.run)], 2, "is a folder"),
    Case("train-config-is-device", lambda w: ["train", "--config", "/dev/null"], 2, "not a regular file"),
    Case("train-out-is-file", lambda w: ["train", *TRAIN_FLAGS, "--out", str(w.user_file)], 2, "is a file"),
    Case("train-out-readonly", lambda w: ["train", *TRAIN_FLAGS, "--out", str(w.readonly_dir / "r")], 2,
         "not writable"),
    Case("train-out-other-method-run", lambda w: ["train", *TRAIN_FLAGS[:-2], "--method", "ce", "--out", str(w.run)], 2,
         "different config"),
    Case("train-out-user-files", lambda w: ["train", *TRAIN_FLAGS, "--out", str(w.user_dir)], 2,
         "not a dnfer run"),
    Case("train-rafdb-list-not-utf8", lambda w: ["train", "--model", "tiny_cnn", "--image-size", "16", "--data",
                                                 f"rafdb:{w.raf_nonutf8}", "--out", str(w.out / "t")], 2,
         "list_patition_label.txt:2: not UTF-8"),
    Case("train-config-inside-out", lambda w: ["train", "--config", str(w.run / "config.yaml"), "--out", str(w.run),
                                               "--overwrite"], 2, "rewrites"),
    Case("train-batch-size-0", lambda w: ["train", *TRAIN_FLAGS, "--out", str(w.out / "t"), "--batch-size", "0"],
         2, "batch_size"),
    # --- evaluation
    Case("eval-batch-size-0", lambda w: ["eval", "--checkpoint", _ckpt(w), "--batch-size", "0"], 2, "--batch-size"),
    Case("eval-checkpoint-is-folder", lambda w: ["eval", "--checkpoint", str(w.run)], 2, "is a folder"),
    Case("eval-checkpoint-is-png", lambda w: ["eval", "--checkpoint", str(w.png)], 2, "face.png"),
    Case("audit-missing-preprocessing", lambda w: ["audit", "--checkpoint", str(w.no_preproc_ckpt), "--out",
                                                   str(w.out / "a.csv")], 2, "preprocessing"),
    Case("export-missing-preprocessing", lambda w: ["export", "--checkpoint", str(w.no_preproc_ckpt), "--format",
                                                    "torchscript", "--out", str(w.out / "m.pt")], 2, "preprocessing"),
    Case("predict-missing-preprocessing", lambda w: ["predict", str(w.png), "--no-detect", "--checkpoint",
                                                     str(w.no_preproc_ckpt)], 2, "preprocessing"),
    Case("eval-missing-preprocessing", lambda w: ["eval", "--checkpoint", str(w.no_preproc_ckpt)], 2,
         "no_preprocessing.pt"),
    # --- data preparation, synthetic data, sweeps
    Case("prepare-shard-size-0", lambda w: ["prepare", "--data", "synthetic", "--image-size", "16", "--out",
                                            str(w.out / "c"), "--shard-size", "0"], 2, "--shard-size"),
    Case("prepare-out-is-file", lambda w: ["prepare", "--data", "synthetic", "--image-size", "16", "--out",
                                           str(w.user_file)], 2, "is a file"),
    Case("prepare-seed-huge", lambda w: ["prepare", "--data", "synthetic", "--image-size", "16", "--out",
                                         str(w.out / "c"), "--seed", str(2**40)], 2, "2**32-1"),
    Case("prepare-corrupt-cache-index", lambda w: ["prepare", "--data", f"folder:{w.colour_data}", "--image-size",
                                                   "8", "--out", str(w.bad_cache), "--workers", "1"], 2,
         "cache index is corrupt"),
    Case("prepare-csv-list-not-utf8", lambda w: ["prepare", "--data", f"csv:{w.nonutf8_csv}", "--image-size", "8",
                                                 "--out", str(w.out / "c")], 2, "list.csv:3: not UTF-8"),
    Case("prepare-out-is-dataset", lambda w: ["prepare", "--data", f"folder:{w.colour_data}", "--image-size", "8",
                                              "--out", str(w.colour_data)], 2, "inputs"),
    Case("synth-out-is-file", lambda w: ["synth", "--out", str(w.user_file), "--n", "4"], 2, "is a file"),
    Case("synth-out-holds-other-files", lambda w: ["synth", "--out", str(w.user_dir), "--n", "4"], 2,
         "did not write"),
    Case("synth-seed-negative", lambda w: ["synth", "--out", str(w.out / "s"), "--n", "4", "--seed", "-5"], 2,
         "2**32-1"),
    Case("bench-jobs-0", lambda w: ["bench", "--dry-run", "--jobs", "0", "--out", str(w.out / "b")], 2, "--jobs"),
    Case("bench-retries-negative", lambda w: ["bench", "--dry-run", "--retries", "-1", "--out", str(w.out / "b")], 2,
         "--retries"),
    Case("bench-config-is-png", lambda w: ["bench", "--dry-run", "--config", str(w.png), "--out", str(w.out / "b")],
         2, "not a text"),
    Case("export-checkpoint-is-folder", lambda w: ["export", "--checkpoint", str(w.run), "--format", "onnx"], 2,
         "is a folder"),
    Case("report-out-existing", lambda w: ["report", str(w.run), "--out", str(w.user_file)], 2, "already exists"),
    Case("bench-out-is-file", lambda w: ["bench", "--dry-run", "--out", str(w.user_file)], 2, "is a file"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(case: Case, world: World, capsys: pytest.CaptureFixture[str],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    if case.name.endswith("readonly") and os.geteuid() == 0:  # root may write anywhere: deny it here
        real_access = os.access
        denied = str(world.readonly_dir)
        monkeypatch.setattr(io_safety.os, "access", lambda p, mode: (
            not str(p).startswith(denied) and real_access(p, mode)))
    before = _hashes(world.root)
    capsys.readouterr()
    code = main(case.argv(world))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert code == case.code, lines
    assert lines[0].startswith("dnfer ") and "error:" in lines[0], lines
    assert case.says.lower() in lines[0].lower(), lines
    assert _hashes(world.root) == before  # no input changed, nothing written beside them


def test_default_outputs_are_replaced_without_overwrite(world: World, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A command's own default output (RUN/label_issues.csv) is refreshed; an explicit one needs --overwrite."""
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    for _ in range(2):
        assert main(["audit", str(run), "--top", "0"]) == 0
    out = tmp_path / "issues.csv"
    assert main(["audit", str(run), "--out", str(out), "--top", "0"]) == 0
    assert main(["audit", str(run), "--out", str(out), "--top", "0"]) == 2
    assert main(["audit", str(run), "--out", str(out), "--top", "0", "--overwrite"]) == 0
    rows = out.read_text().splitlines()
    with np.load(run / "train_dynamics.npz") as z:
        n_train = len(z["names"])
    assert rows[0].startswith("index,name,") and len(rows) == 1 + n_train  # header + every training sample
    assert not [p for p in tmp_path.rglob(".*tmp-*")]  # no temporaries left behind


def test_noise_never_rewrites_its_label_file(world: World, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    shutil.copy(world.labels, labels)
    before = labels.read_bytes()
    assert main(["noise", "--labels", str(labels), "--out", str(labels), "--noise", "symmetric:0.2",
                 "--overwrite"]) == 2
    out = tmp_path / "noisy.txt"
    assert main(["noise", "--labels", str(labels), "--out", str(out), "--noise", "symmetric:0.2"]) == 0
    assert labels.read_bytes() == before
    assert len(out.read_text().splitlines()) == 40  # the train rows


# ---------------------------------------------------------------------------------- run lock
def test_second_run_into_a_locked_folder_names_the_holder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with io_safety.RunLock(run):
        code = main(["train", *TRAIN_FLAGS, "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"pid {os.getpid()}" in err and "in use" in err
    assert len(err.strip().splitlines()) == 1


def test_lock_left_by_a_dead_process_does_not_block(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / io_safety.LOCK_NAME).write_text(json.dumps({"pid": 999999999, "host": "gone", "since": "then"}))
    lock = io_safety.claim_run_dir(run, "{}\n", resume=False, overwrite=False)
    assert lock is not None
    info = json.loads((run / io_safety.LOCK_NAME).read_text())
    assert info["pid"] == os.getpid()
    lock.release()
    assert io_safety.claim_run_dir(run, "{}\n", resume=False, overwrite=False, main=False) is None  # rank > 0


def test_overwrite_replaces_the_previous_runs_files_only(world: World, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    (run / "my_notes.txt").write_text("keep me\n")
    lock = io_safety.claim_run_dir(run, "method: {name: ce}\n", resume=False, overwrite=True)
    assert lock is not None
    lock.release()
    assert (run / "my_notes.txt").read_text() == "keep me\n"
    assert not (run / "last.pt").exists() and not (run / "metrics.jsonl").exists()


def test_same_config_rerun_is_allowed_and_sweeps_killed_checkpoint_writes(world: World, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    killed = run / ".last.pt.tmp-999999999"  # a kill during a checkpoint write
    killed.write_bytes(b"half a checkpoint")
    saved = (run / "config.yaml").read_text()
    lock = io_safety.claim_run_dir(run, saved, resume=False, overwrite=False)
    assert lock is not None
    lock.release()
    assert not killed.exists() and (run / "last.pt").exists()


# ------------------------------------------------------------------ atomic writes, temporaries
def test_sweep_removes_dead_writers_temporaries_only(tmp_path: Path) -> None:
    dead = tmp_path / ".last.pt.tmp-999999999"
    dead.write_bytes(b"half a checkpoint")
    dead_dir = tmp_path / ".cache.tmp-999999999-abcd1234"
    (dead_dir / "shards").mkdir(parents=True)
    mine = tmp_path / f".summary.json.tmp-{os.getpid()}-00000000"
    mine.write_text("{}")
    user = tmp_path / ".hidden.tmp"
    user.write_text("not ours")
    removed = io_safety.sweep_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, dead_dir.name])
    assert mine.exists() and user.exists() and not dead.exists() and not dead_dir.exists()
    dead.write_bytes(b"x")
    assert io_safety.sweep_temporaries(tmp_path, name="cache") == []  # only that destination's
    assert dead.exists()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old\n")

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_safety.os, "fsync", full)
    with pytest.raises(DnferError, match="disk full"):
        io_safety.write_text_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # the temporary is gone


def test_disk_full_is_one_line(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_safety.os, "fsync", full)
    code = main(["noise", "--labels", str(world.labels), "--out", str(tmp_path / "n.txt"), "--noise", "symmetric:0.2"])
    err = capsys.readouterr().err
    assert code == 2 and "disk full" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_removes_a_failed_folder(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), io_safety.atomic_path(tmp_path / "cache") as tmp:
        (tmp / "a").mkdir(parents=True)
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- CLI error paths
def _patch_run(monkeypatch: pytest.MonkeyPatch, fn: Callable[..., int]) -> None:
    from dnfer.commands import eval as eval_cmd

    monkeypatch.setattr(eval_cmd, "run", fn)


def test_internal_error_is_one_line_with_debug_hint(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    def boom(_args: object) -> int:
        raise RuntimeError("unexpected\nmulti-line")

    _patch_run(monkeypatch, boom)
    assert main(["eval", "--checkpoint", "x.pt"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--debug" in err and "Traceback" not in err
    with pytest.raises(RuntimeError):
        main(["--debug", "eval", "--checkpoint", "x.pt"])


def test_interrupt_during_cleanup_still_exits_130(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(_args: object) -> int:
        try:
            raise KeyboardInterrupt
        finally:  # the cleanup is interrupted too (second Ctrl-C)
            raise KeyboardInterrupt

    _patch_run(monkeypatch, interrupted)
    assert main(["eval", "--checkpoint", "x.pt"]) == EXIT_INTERRUPTED
    calls = {"n": 0}
    real_print = print

    def print_interrupted(*a: object, **k: object) -> None:  # a third Ctrl-C while saying "interrupted"
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        real_print(*a, **k)

    monkeypatch.setattr("builtins.print", print_interrupted)
    assert main(["eval", "--checkpoint", "x.pt"]) == EXIT_INTERRUPTED
    assert "Traceback" not in capsys.readouterr().err


# --------------------------------------------------------------- data warnings and --skip-bad
def test_prepare_warns_empty_class_and_sweeps_killed_builds(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = make_colour_dataset(tmp_path / "data", per_class=6, size=8)
    (data / "fear").mkdir()
    killed = tmp_path / ".c.tmp-999999999-abcd1234"  # a build killed earlier
    (killed / "shards").mkdir(parents=True)
    assert main(["prepare", "--data", f"folder:{data}", "--image-size", "8", "--out", str(tmp_path / "c"),
                 "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "fear" in err and "holds no images" in err
    assert not killed.exists()


def test_skip_bad_prints_and_records_the_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_colour_dataset(tmp_path / "data", per_class=12, size=16)
    (data / "anger" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    run = tmp_path / "run"
    code = main(["train", "--data", f"folder:{data}", "--model", "tiny_cnn", "--image-size", "16", "--epochs", "1",
                 "--batch-size", "16", "--precision", "fp32", "--threads", "1", "--no-progress",
                 "--warmup-epochs", "0", "--skip-bad", "--out", str(run)])
    assert code == 0
    assert "skipped 1 unreadable image" in capsys.readouterr().out
    assert json.loads((run / "summary.json").read_text())["skipped_images"] == 1


# ------------------------------------------------------------------- real processes, real signals
def _dnfer(*argv: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "dnfer", *argv]


def test_concurrent_run_is_refused_and_repeated_ctrl_c_exits_130(tmp_path: Path) -> None:
    """Two real processes: the second run into a training run's folder is refused naming the first;
    three SIGINTs to the first end it with 130, one line, no traceback, and its lock released."""
    import signal
    import subprocess
    import time

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    flags = list(TRAIN_FLAGS)
    flags[flags.index("--epochs") + 1] = "200"
    proc = subprocess.Popen(_dnfer("train", *flags, "--out", str(run)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists():  # training (and a checkpoint) under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        second = subprocess.run(_dnfer("train", *flags, "--out", str(run)), capture_output=True, text=True,
                                env=env, timeout=120)
        assert second.returncode == 2, second.stderr
        assert f"in use by another dnfer run (pid {proc.pid} on " in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        for _ in range(3):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.05)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.strip()][-1] == "dnfer train: interrupted"
    # the lock died with the process: the run continues
    lock = io_safety.claim_run_dir(run, (run / "config.yaml").read_text(), resume=True, overwrite=False)
    assert lock is not None
    lock.release()


def test_bench_cell_that_failed_before_any_result_reruns_with_new_settings(tmp_path: Path) -> None:
    cell = tmp_path / "cell"
    cell.mkdir()
    (cell / "cell.yaml").write_text("method: {name: dnfer}\n")
    (cell / "config.yaml").write_text("method: {name: dnfer}\ntrain: {epochs: 99}\n")
    lock = io_safety.claim_run_dir(cell, "method: {name: dnfer}\ntrain: {epochs: 2}\n", resume=False, overwrite=False)
    assert lock is not None
    lock.release()
    (cell / "metrics.jsonl").write_text('{"epoch": 1}\n')  # with a result it is protected again
    with pytest.raises(DnferError, match="different config"):
        io_safety.claim_run_dir(cell, "method: {name: dnfer}\ntrain: {epochs: 2}\n", resume=False, overwrite=False)
