"""Checkpoints are data, never code; they are verified on load; run folders stay small.

A crafted pickle (a ``__reduce__`` that runs a shell command writing a marker file) given to
every command that reads a checkpoint must be refused before anything runs; a flipped byte or a
truncated file must be caught by the checksum/zip check.
"""

from __future__ import annotations

import os
import random
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from dnfer.cli import main
from dnfer.config import Config
from dnfer.data.classes import BASIC7
from dnfer.engine.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    atomic_save,
    digest,
    load_checkpoint,
    load_model,
    rng_state,
    set_rng_state,
)
from dnfer.models.factory import create_model

pytestmark = pytest.mark.slow

# 84 training rows (12 carved for validation) / batch 16 = 5 steps per epoch
TRAIN = ["--model", "tiny_cnn", "--image-size", "16", "--data-option", "n_train=96", "--data-option", "n_test=32",
         "--batch-size", "16", "--warmup-epochs", "1", "--precision", "fp32", "--threads", "1", "--no-progress"]


class _RunsCode:
    """Unpickling this runs ``touch MARKER`` (what a malicious checkpoint does, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _armed(path: Path, marker: Path, *, dnfer_format: bool = True) -> Path:
    if dnfer_format:
        obj = {"format": "dnfer-checkpoint", "version": FORMAT_VERSION, "model": {}, "x": _RunsCode(marker)}
    else:  # a "pretrained weights" file
        obj = {"state_dict": {"conv.weight": torch.ones(1)}, "x": _RunsCode(marker)}
    torch.save(obj, path)
    return path


def _tiny_checkpoint(path: Path, size: int = 16) -> tuple[Path, Checkpoint]:
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 7, image_size=size)
    cfg = Config()
    cfg.model.name = "tiny_cnn"
    ck = Checkpoint("tiny_cnn", model.state_dict(), model.preprocessing.with_classes(BASIC7), cfg.to_dict())
    atomic_save(ck, path)
    return path, ck


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def _flip_byte_of(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit inside ``tensor``'s bytes in the file (zip structure intact: only the checksum can tell)."""
    blob = bytearray(path.read_bytes())
    at = bytes(blob).find(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    assert at > 0
    blob[at + tensor.numel() * tensor.element_size() // 2] ^= 0x10
    path.write_bytes(bytes(blob))


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------- data, never code


def test_the_crafted_file_is_armed(tmp_path: Path) -> None:
    """The payload really runs code when unpickled, so the refusals below mean something."""
    marker = tmp_path / "ran"
    path = _armed(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError, match="could run code.*--trust-checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # trusted: unpickled (the code runs), then not a usable checkpoint
        load_checkpoint(path, trust=True)
    assert marker.exists()


@pytest.mark.parametrize("command", ["eval", "predict", "predict-torchscript", "export", "audit", "train-pretrained",
                                     "train-resume"])
def test_crafted_pickle_never_runs(tmp_path: Path, command: str, image: Path, capsys) -> None:
    marker = tmp_path / "ran"
    evil = _armed(tmp_path / "evil.pt", marker, dnfer_format=command != "train-pretrained")
    run = tmp_path / "run"
    args = {
        "eval": ["eval", "--checkpoint", str(evil)],
        "predict": ["predict", "--checkpoint", str(evil), str(image), "--no-detect"],
        "predict-torchscript": ["predict", "--torchscript", str(evil), str(image), "--no-detect"],
        "export": ["export", "--checkpoint", str(evil), "--format", "onnx", "--out", str(tmp_path / "m.onnx")],
        "audit": ["audit", "--checkpoint", str(evil), "--out", str(tmp_path / "issues.csv")],
        "train-pretrained": ["train", *TRAIN, "--epochs", "2", "--pretrained", str(evil), "--out", str(run)],
        "train-resume": ["train", *TRAIN, "--epochs", "2", "--resume", "--out", str(run)],
    }[command]
    if command == "train-resume":  # planted in the run folder
        run.mkdir()
        os.replace(evil, run / "last.pt")
    code = main(args)
    line = _one_error_line(capsys)
    assert code != 0 and not marker.exists()
    assert "could run code" in line and "--trust-checkpoint" in line
    assert ("last.pt" if command == "train-resume" else str(evil)) in line


def test_torchscript_is_refused_unless_trusted(tmp_path: Path, image: Path, capsys) -> None:
    from dnfer.inference.export import export_checkpoint

    ckpt, _ = _tiny_checkpoint(tmp_path / "m.pt")
    ts = export_checkpoint(ckpt, "torchscript").path
    assert main(["predict", "--torchscript", str(ts), str(image), "--no-detect", "-q"]) == 2
    line = _one_error_line(capsys)
    assert "TorchScript" in line and "--trust-checkpoint" in line and str(ts) in line
    assert main(["predict", "--torchscript", str(ts), str(image), "--no-detect", "-q", "--trust-checkpoint"]) == 0


def test_checkpoints_load_with_plain_weights_only_and_round_trip(tmp_path: Path) -> None:
    path, ck = _tiny_checkpoint(tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)  # no allowlist at all: tensors and plain data only
    assert raw["version"] == FORMAT_VERSION and raw["sha256"] == digest(raw)
    back = load_checkpoint(path)
    assert back.preprocessing == ck.preprocessing and back.model_name == "tiny_cnn" and back.resume is None
    assert all(torch.equal(back.model[k], v) for k, v in ck.model.items())
    model = load_model(back)
    assert not model.training and model.preprocessing.class_names == tuple(BASIC7)


def test_rng_state_is_plain_data_and_restores_every_generator(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_version_1_checkpoints_with_numpy_still_load(tmp_path: Path) -> None:
    """The previous format pickled numpy arrays and RNG tuples: read with numpy's array
    reconstruction allowed (nothing else), converted to version 2's layout."""
    model = create_model("tiny_cnn", 7, image_size=16)
    np.random.seed(5)
    old = {
        "format": "dnfer-checkpoint", "version": 1, "config": Config().to_dict(), "class_names": list(BASIC7),
        "preprocessing": {k: v for k, v in model.preprocessing.to_dict().items() if k != "class_names"},
        "model_name": "tiny_cnn", "num_classes": 7, "model": model.state_dict(), "method": {}, "optimizer": {},
        "scheduler": {}, "scaler": {}, "rng": [{"python": random.getstate(), "numpy": np.random.get_state(),
                                                "torch": torch.get_rng_state()}],
        "state": {"epoch": 1, "epoch_stats": {"probs": np.full((4, 7), 0.5, np.float16)}, "best_val": np.float64(0.5)},
        "selection_history": np.full((2, 4, 1), -1, np.int8),
    }
    torch.save(old, tmp_path / "old.pt")
    want = np.random.rand()
    ck = load_checkpoint(tmp_path / "old.pt")
    assert ck.version == 1 and ck.class_names == list(BASIC7) and ck.image_size == 16
    assert ck.resume["selection_history"].dtype == torch.int8 and ck.resume["state"]["best_val"] == 0.5
    set_rng_state(ck.resume["rng"][0])
    assert np.random.rand() == want


# ----------------------------------------------------------------------------- integrity


def test_refuses_non_finite_weights_and_unknown_versions(tmp_path: Path) -> None:
    _, ck = _tiny_checkpoint(tmp_path / "m.pt")
    ck.model["head.bias"] = ck.model["head.bias"].clone()
    ck.model["head.bias"][2] = float("nan")
    atomic_save(ck, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="non-finite weights.*head.bias"):
        load_checkpoint(tmp_path / "nan.pt")
    payload = Checkpoint("tiny_cnn", {}, ck.preprocessing, {}).to_payload()
    payload["version"] = 99
    payload["sha256"] = digest(payload)
    torch.save(payload, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(tmp_path / "v99.pt")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_every_non_finite_value_is_caught_in_any_layout(tmp_path: Path, dtype: torch.dtype, bad: float) -> None:
    _, ck = _tiny_checkpoint(tmp_path / "m.pt")
    name = "backbone.0.0.weight"  # a conv weight (out, in, 3, 3), stored channels_last as CPU training does
    w = ck.model[name].to(dtype).contiguous(memory_format=torch.channels_last)
    ck.model = {**ck.model, name: w}
    atomic_save(ck, tmp_path / "ok.pt")
    back = load_checkpoint(tmp_path / "ok.pt")  # the digest covers the layout: channels_last round-trips
    assert back.model[name].stride() == w.stride() and torch.equal(back.model[name], w)
    w = w.clone(memory_format=torch.channels_last)
    w[1, 2, 0, 1] = bad
    ck.model = {**ck.model, name: w}
    atomic_save(ck, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=f"non-finite weights.*{name}"):
        load_checkpoint(tmp_path / "bad.pt")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ckpt") / "run"
    assert main(["train", *TRAIN, "--epochs", "2", "--noise", "symmetric:0.3", "--out", str(run)]) == 0
    return run


def test_finished_run_keeps_last_and_a_weights_only_best(finished_run: Path) -> None:
    assert not (finished_run / "last.prev.pt").exists()
    last, best = load_checkpoint(finished_run / "last.pt"), load_checkpoint(finished_run / "best.pt")
    assert last.resume is not None and best.resume is None
    assert (finished_run / "best.pt").stat().st_size < (finished_run / "last.pt").stat().st_size


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_best_is_refused_by_eval_predict_export(finished_run: Path, tmp_path: Path, image: Path,
                                                        damage: str, capsys) -> None:
    best = tmp_path / "best.pt"
    best.write_bytes((finished_run / "best.pt").read_bytes())
    if damage == "flip":
        _flip_byte_of(best, load_checkpoint(best).model["head.weight"])
    else:
        best.write_bytes(best.read_bytes()[: best.stat().st_size * 2 // 3])
    for args in (["eval", "--checkpoint", str(best)],
                 ["predict", "--checkpoint", str(best), str(image), "--no-detect"],
                 ["export", "--checkpoint", str(best), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]):
        assert main(args) == 2, args
        line = _one_error_line(capsys)
        assert str(best) in line and ("integrity check" in line if damage == "flip" else "truncated" in line), line
    assert not (tmp_path / "m.onnx").exists()


def test_damaged_last_falls_back_to_previous_on_resume(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", *TRAIN, "--epochs", "2", "--keep-checkpoints", "--out", str(run)]) == 0
    assert (run / "last.prev.pt").exists()  # kept on request
    _flip_byte_of(run / "last.pt", load_checkpoint(run / "last.pt").model["head.weight"])
    capsys.readouterr()
    assert main(["train", *TRAIN, "--epochs", "3", "--resume", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "warning:" in out and "last.pt" in out and "integrity check" in out and "trying the previous" in out
    assert "resumed from" in out and "last.prev.pt at epoch 2" in out
    assert load_checkpoint(run / "last.pt").resume["state"]["epoch"] == 3
