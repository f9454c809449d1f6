"""Export to ONNX / TorchScript: logit parity with the eager model, embedded metadata, predict on exports."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dnfer.cli import main
from dnfer.config import Config
from dnfer.data.classes import BASIC7
from dnfer.engine.checkpoint import Checkpoint, atomic_save
from dnfer.inference.export import export_checkpoint
from dnfer.inference.predictor import load_predictor
from dnfer.models.factory import create_model

TOL = 1e-4


def make_checkpoint(path: Path, model_name: str = "tiny_cnn", size: int = 32, classes: tuple[str, ...] = BASIC7,
                    seed: int = 0) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    model = create_model(model_name, len(classes), image_size=size, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    for m in model.modules():  # non-trivial BatchNorm parameters and statistics: eval-mode BN is exercised
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    model.head.weight.data.mul_(10)  # logits of order 1, not 0.01: the tolerance then means something
    cfg = Config()
    cfg.model.name = model_name
    atomic_save(Checkpoint(model_name, model.state_dict(), model.preprocessing.with_classes(classes), cfg.to_dict()),
                path)
    return path, model.eval()


def _eager_logits(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(x).numpy()


@pytest.mark.parametrize("model_name", ["tiny_cnn", "resnet18"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_parity_and_dynamic_batch(tmp_path: Path, model_name: str, fmt: str) -> None:
    ckpt, model = make_checkpoint(tmp_path / "m.pt", model_name)
    res = export_checkpoint(ckpt, fmt)
    assert res.path.is_file() and res.max_abs_diff <= TOL
    pred = load_predictor(res.path, trust_checkpoint=True)  # TorchScript is code: trusted explicitly
    assert pred.info.format == fmt
    g = torch.Generator().manual_seed(1)
    for batch in (1, 3, 8):  # other batch sizes than the traced one (2)
        x = torch.randn(batch, 3, 32, 32, generator=g) * 2
        got = np.asarray(pred.backend(x))
        ref = _eager_logits(model, x)
        assert got.shape == (batch, 7)
        assert np.abs(got - ref).max() <= TOL
        assert np.abs(ref).max() > 0.1  # the comparison is not between near-zero outputs


def test_metadata_is_embedded(tmp_path: Path) -> None:
    classes = ("happiness", "sadness", "neutral")
    ckpt, model = make_checkpoint(tmp_path / "m.pt", classes=classes, size=40)
    onnx_path = export_checkpoint(ckpt, "onnx", tmp_path / "out" / "m.onnx").path
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    meta = json.loads(props["dnfer"])
    assert meta["class_names"] == list(classes) and json.loads(props["class_names"]) == list(classes)
    assert meta["input_size"] == [3, 40, 40] and meta["color_order"] == "RGB"
    assert meta["mean"] == pytest.approx([0.5, 0.4, 0.3]) and meta["std"] == pytest.approx([0.2, 0.25, 0.3])
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == "batch" and sess.get_outputs()[0].shape[0] == "batch"
    assert json.loads(sess.get_modelmeta().custom_metadata_map["dnfer"]) == meta
    ts_path = export_checkpoint(ckpt, "torchscript").path
    assert ts_path.name == "m.torchscript.pt"
    extra = {"dnfer.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        torch.jit.load(str(ts_path), _extra_files=extra)
    assert json.loads(extra["dnfer.json"]) == meta
    for p in (onnx_path, ts_path):
        info = load_predictor(p, trust_checkpoint=True).info
        assert info.class_names == classes and info.image_size == 40 and info.mean == pytest.approx((0.5, 0.4, 0.3))


def test_predict_on_exports_matches_checkpoint(tmp_path: Path) -> None:
    from dnfer.data.synthetic import generate

    ckpt, _ = make_checkpoint(tmp_path / "m.pt")
    images = list(generate(5, seed=3, split="test", image_size=48)[0])  # 48 px: resized to 32 by the predictor
    ref = load_predictor(ckpt).predict(images, detect=False)
    for fmt in ("onnx", "torchscript"):
        path = export_checkpoint(ckpt, fmt).path
        got = load_predictor(path, trust_checkpoint=True).predict(images, detect=False)
        for a, b in zip(ref, got, strict=True):
            assert a.faces[0].label == b.faces[0].label
            assert max(abs(a.faces[0].probabilities[c] - b.faces[0].probabilities[c]) for c in BASIC7) < 1e-5


def test_cli_export_and_predict_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    ckpt, _ = make_checkpoint(tmp_path / "m.pt")
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_abs_diff"] <= TOL and out["class_names"] == list(BASIC7) and Path(out["path"]).is_file()
    img = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img)
    res = {}
    for flag, path in (("--onnx", out["path"]), ("--checkpoint", str(ckpt))):
        assert main(["predict", flag, path, str(img), "--no-detect", "-q"]) == 0
        res[flag] = json.loads(capsys.readouterr().out)
    a, b = res["--onnx"]["faces"][0], res["--checkpoint"]["faces"][0]
    assert a["label"] == b["label"] and a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    assert main(["predict", "--onnx", str(ckpt), str(img), "--no-detect"]) == 2  # not an ONNX file
    assert main(["export", "--checkpoint", str(tmp_path / "none.pt"), "--format", "onnx"]) == 2
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "x.bin")]) == 2
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--opset", "13"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "must end in .onnx" in err and "opset >= 17" in err
