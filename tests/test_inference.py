"""Prediction: detection on a real photo, parity with eval, videos, bad inputs, CLI, alignment."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import dnfer
from dnfer.cli import main
from dnfer.config import Config
from dnfer.data.classes import BASIC7
from dnfer.data.decode import decode_image
from dnfer.engine.batches import predict_probs
from dnfer.engine.checkpoint import Checkpoint, atomic_save
from dnfer.engine.device import resolve_precision
from dnfer.errors import ConfigError
from dnfer.inference.detect import TEMPLATE_112, HaarDetector, aligned_crop, expand_box, similarity_transform
from dnfer.inference.predictor import Prediction, load_predictor
from dnfer.models.factory import create_model

SIZE = 32


def make_checkpoint(path: Path, *, seed: int = 0, size: int = SIZE) -> tuple[Path, torch.nn.Module]:
    """A dnfer checkpoint of an untrained tiny_cnn with spread-out weights (non-trivial outputs)."""
    torch.manual_seed(seed)
    model = create_model("tiny_cnn", 7, image_size=size, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    cfg = Config()
    cfg.model.name = "tiny_cnn"
    atomic_save(Checkpoint("tiny_cnn", model.state_dict(), model.preprocessing.with_classes(BASIC7), cfg.to_dict()), path)
    return path, model.eval()


def synthetic_faces(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    from dnfer.data.synthetic import generate

    return generate(n, seed=seed, split="test", image_size=size)[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def _eval_probs(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """What ``dnfer eval`` computes: trainer's ``predict_probs`` with the checkpoint's mean/std."""
    pre = model.preprocessing
    return predict_probs(model, images, batch_size=4, device=torch.device("cpu"), mean=pre.mean,
                         std=pre.std, precision=resolve_precision("fp32", torch.device("cpu")))


def _probs(preds: list[Prediction]) -> np.ndarray:
    return np.array([[p.faces[0].probabilities[c] for c in BASIC7] for p in preds])


# ----------------------------------------------------------------------------- detection


def test_haar_finds_the_one_face_in_a_real_photo(astronaut: np.ndarray, ckpt: tuple[Path, torch.nn.Module]) -> None:
    faces = HaarDetector().detect(astronaut)
    assert len(faces) == 1
    x, y, w, h = faces[0].box
    # Eileen Collins' face in the 512x512 astronaut photo: roughly x 170..280, y 60..170.
    assert 160 < x + w / 2 < 290 and 50 < y + h / 2 < 180 and 60 < w < 140
    pred = load_predictor(ckpt[0], detector="haar").predict(astronaut)
    assert len(pred) == 1 and pred[0].status == "ok" and len(pred[0].faces) == 1
    face = pred[0].faces[0]
    assert face.box == pytest.approx(faces[0].box, abs=0.01)
    assert set(face.probabilities) == set(BASIC7)
    assert sum(face.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert face.label == max(face.probabilities, key=face.probabilities.get)
    assert face.confidence == face.probabilities[face.label]
    # The crop the model saw: the box grown by the margin on each side, resized like training images.
    crop = decode_image(astronaut, size=SIZE, box=expand_box(faces[0].box, 0.2))
    expected = _eval_probs(ckpt[1], crop[None])[0]
    assert np.abs(_probs(pred)[0] - expected).max() < 1e-6


def test_downscaled_detection_maps_boxes_back(astronaut: np.ndarray) -> None:
    big = cv2.resize(astronaut, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    full = HaarDetector(detect_max_side=2048).detect(big)
    small = HaarDetector(detect_max_side=512).detect(big)
    assert len(small) == 1 and len(full) >= 1  # at full size the cascade also fires on small textures
    assert np.allclose(full[0].box, small[0].box, atol=16)  # the same (largest) face, in full-resolution pixels


def test_no_face_is_reported_not_dropped(ckpt: tuple[Path, torch.nn.Module]) -> None:
    flat = np.full((120, 160, 3), 127, np.uint8)
    pred = load_predictor(ckpt[0]).predict([flat, flat])
    assert [p.status for p in pred] == ["no_face", "no_face"]
    assert pred[0].faces == [] and pred[0].error is None and (pred[0].width, pred[0].height) == (160, 120)


# ----------------------------------------------------------------------------- parity with eval


def test_no_detect_matches_eval_for_files_pil_and_arrays(tmp_path: Path, ckpt: tuple[Path, torch.nn.Module]) -> None:
    images = synthetic_faces(6)
    paths = []
    for i, im in enumerate(images):
        paths.append(tmp_path / f"face_{i}.png")  # lossless: the file holds exactly these pixels
        Image.fromarray(im).save(paths[-1])
    expected = _eval_probs(ckpt[1], images)
    pred = dnfer.load_predictor(str(ckpt[0]), batch_size=4)  # 4: batches split across inputs
    for inputs in (paths, [Image.fromarray(im) for im in images], list(images)):
        res = pred.predict(inputs, detect=False)
        assert [len(r.faces) for r in res] == [1] * 6
        assert np.abs(_probs(res) - expected).max() < 1e-6
        assert res[0].faces[0].box == (0.0, 0.0, float(SIZE), float(SIZE))
    assert [r.source for r in pred.predict(paths, detect=False)] == [str(p) for p in paths]
    assert np.abs(pred.predict_crops(images) - expected).max() < 1e-6


def test_larger_inputs_are_resized_like_training(tmp_path: Path, ckpt: tuple[Path, torch.nn.Module]) -> None:
    big = synthetic_faces(3, size=80, seed=1)
    paths = []
    for i, im in enumerate(big):
        paths.append(tmp_path / f"big_{i}.png")
        Image.fromarray(im).save(paths[-1])
    train_decoded = np.stack([decode_image(p, size=SIZE) for p in paths])  # the training decoder
    res = load_predictor(ckpt[0]).predict(paths, detect=False)
    assert np.abs(_probs(res) - _eval_probs(ckpt[1], train_decoded)).max() < 1e-6


def test_gray_and_rgba_inputs(ckpt: tuple[Path, torch.nn.Module]) -> None:
    rgb = synthetic_faces(1)[0]
    gray = rgb.mean(2).astype(np.uint8)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    pred = load_predictor(ckpt[0])
    res = pred.predict([gray, np.dstack([gray] * 3), rgba, rgb], detect=False)
    p = _probs(res)
    assert np.abs(p[0] - p[1]).max() < 1e-6 and np.abs(p[2] - p[3]).max() < 1e-6


# ----------------------------------------------------------------------------- video


def _write_video(path: Path, frames: np.ndarray, fps: float = 10.0) -> None:
    h, w = frames.shape[1:3]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    assert vw.isOpened()
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()


def test_video_frames_are_sampled_every_n(tmp_path: Path, ckpt: tuple[Path, torch.nn.Module]) -> None:
    frames = synthetic_faces(7, size=SIZE, seed=2)
    path = tmp_path / "clip.avi"
    _write_video(path, frames)
    pred = load_predictor(ckpt[0])
    res = pred.predict(path, detect=False, every=3)
    assert [r.frame for r in res] == [0, 3, 6]
    assert [r.time_s for r in res] == pytest.approx([0.0, 0.3, 0.6])
    assert all(r.status == "ok" and r.source == str(path) for r in res)
    assert [r.frame for r in pred.predict(path, detect=False, every=2, max_frames=2)] == [0, 2]
    # MJPG is lossy: the frames are close to, not equal to, the originals; the label mostly agrees.
    p = _probs(res)
    assert np.abs(p - _eval_probs(ckpt[1], frames[[0, 3, 6]])).max() < 0.2


# ----------------------------------------------------------------------------- bad inputs


def _png_bomb(path: Path, side: int = 60000) -> None:
    """A tiny PNG whose header claims ``side`` x ``side`` pixels (a decompression bomb)."""
    Image.new("L", (1, 1)).save(path)
    b = bytearray(path.read_bytes())
    ihdr = b[12:29]  # b"IHDR" + 13 data bytes
    ihdr[4:12] = struct.pack(">II", side, side)
    b[12:29] = ihdr
    b[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(b))


def bad_inputs(tmp_path: Path) -> dict[str, str]:
    """file name -> substring of its expected error."""
    good = tmp_path / "good.png"
    Image.fromarray(synthetic_faces(1)[0]).save(good)
    jpg = tmp_path / "full.jpg"
    Image.fromarray(synthetic_faces(1, size=128)[0]).save(jpg, quality=90)
    (tmp_path / "truncated.jpg").write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    jpg.unlink()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not an image\n")
    _png_bomb(tmp_path / "huge.png")
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x01garbage" * 64)
    (tmp_path / "empty.avi").write_bytes(b"")
    return {"truncated.jpg": "truncated", "empty.png": "zero-byte", "text.jpg": "not an image",
            "huge.png": "too large", "broken.mp4": "cannot open", "empty.avi": "zero-byte",
            "missing.jpg": "not found"}


def test_bad_files_give_error_entries_and_the_run_continues(tmp_path: Path, ckpt: tuple[Path, torch.nn.Module]) -> None:
    errors = bad_inputs(tmp_path)
    names = ["good.png", *errors, "good.png"]
    res = load_predictor(ckpt[0]).predict([tmp_path / n for n in names], detect=False)
    assert [Path(r.source).name for r in res] == names  # one entry per input, in order
    assert res[0].status == res[-1].status == "ok"
    for r in res[1:-1]:
        assert r.status == "error" and r.faces == [], r
        assert errors[Path(r.source).name] in r.error, r.error


def test_bad_arrays(ckpt: tuple[Path, torch.nn.Module]) -> None:
    res = load_predictor(ckpt[0]).predict([np.zeros((0, 5, 3), np.uint8), np.zeros((4, 4, 7), np.uint8)], detect=False)
    assert [r.status for r in res] == ["error", "error"] and "unsupported shape" in res[0].error


def test_bad_model_files(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "x.onnx").write_bytes(b"nonsense")
    for name, match in (("none.pt", "does not exist"), ("empty.pt", "empty"), ("x.onnx", "not a loadable ONNX")):
        with pytest.raises(dnfer.errors.DnferError, match=match):
            load_predictor(tmp_path / name)


def test_yunet_needs_its_model_file(tmp_path: Path, ckpt: tuple[Path, torch.nn.Module]) -> None:
    with pytest.raises(ConfigError, match="--yunet .* does not exist"):
        load_predictor(ckpt[0], detector="yunet", yunet_model=tmp_path / "yunet.onnx")
    (tmp_path / "yunet.onnx").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a YuNet model"):
        load_predictor(ckpt[0], detector="yunet", yunet_model=tmp_path / "yunet.onnx")


# ----------------------------------------------------------------------------- alignment


def test_similarity_transform_recovers_a_known_similarity() -> None:
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, t = 0.4, 1.7, np.array([12.0, -3.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rot.T + t
    m = similarity_transform(src, dst)
    assert np.allclose(m[:, :2], scale * rot) and np.allclose(m[:, 2], t)


def test_aligned_crop_puts_landmarks_on_the_template() -> None:
    # Five bright dots at the template positions of a rotated, scaled, shifted face.
    angle, scale = np.deg2rad(25), 180.0
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = (TEMPLATE_112 - 0.5) @ rot.T * scale + np.array([150.0, 140.0])
    img = np.zeros((300, 320, 3), np.uint8)
    for x, y in pts:
        cv2.circle(img, (int(round(x)), int(round(y))), 3, (255, 255, 255), -1)
    size, margin = 64, 0.2
    out = aligned_crop(img, pts, size, margin)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    expected = (0.5 + (TEMPLATE_112 - 0.5) / (1 + 2 * margin)) * size
    gray = out.mean(2)
    for x, y in expected:
        xi, yi = int(round(x)), int(round(y))
        assert gray[yi - 1:yi + 2, xi - 1:xi + 2].max() > 100, (x, y)  # a dot is here
    # ...and nowhere else: the dots are the only bright pixels, all within 2 px of a template point.
    ys, xs = np.nonzero(gray > 100)
    d = np.min(np.hypot(xs[:, None] - expected[None, :, 0], ys[:, None] - expected[None, :, 1]), axis=1)
    assert d.max() < 2.5


# ----------------------------------------------------------------------------- CLI


def test_cli_jsonl_csv_annotate_and_exit_codes(tmp_path: Path, ckpt: tuple[Path, torch.nn.Module],
                                               astronaut: np.ndarray, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(astronaut).save(d / "astronaut.jpg", quality=95)
    Image.fromarray(np.full((80, 80, 3), 200, np.uint8)).save(d / "sub" / "blank.png")
    _write_video(d / "sub" / "clip.avi", np.stack([cv2.resize(astronaut, (256, 256))] * 5))
    (d / "notes.txt").write_text("ignored: not an image extension")
    out = tmp_path / "out.jsonl"
    rc = main(["predict", "--checkpoint", str(ckpt[0]), str(d), "--every", "2", "--out", str(out),
               "--annotate", str(tmp_path / "ann")])
    assert rc == 0
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [(Path(r["file"]).name, r["frame"], r["status"]) for r in recs] == [
        ("astronaut.jpg", None, "ok"), ("blank.png", None, "no_face"),
        ("clip.avi", 0, "ok"), ("clip.avi", 2, "ok"), ("clip.avi", 4, "ok")]
    f = recs[0]["faces"][0]
    assert len(recs[0]["faces"]) == 1 and set(f["probabilities"]) == set(BASIC7) and len(f["box"]) == 4
    assert "ignored 1 file" in capsys.readouterr().err
    ann = sorted(p.name for p in (tmp_path / "ann").iterdir())
    assert ann == ["astronaut.jpg", "blank.jpg", "clip_f000000.jpg", "clip_f000002.jpg", "clip_f000004.jpg"]
    drawn = np.asarray(Image.open(tmp_path / "ann" / "astronaut.jpg"))
    assert drawn.shape == astronaut.shape and np.abs(drawn.astype(int) - astronaut).mean() > 0.5  # something drawn

    # CSV, no detection, with failing inputs: one row per face / per failed input; exit status 1.
    bad = tmp_path / "bad"
    bad.mkdir()
    errors = bad_inputs(bad)
    csv_out = tmp_path / "out.csv"
    rc = main(["predict", "--checkpoint", str(ckpt[0]), str(bad), str(bad / "missing.jpg"), "--no-detect",
               "--out", str(csv_out)])
    assert rc == 1
    import csv

    rows = list(csv.DictReader(csv_out.open()))
    assert rows[0].keys() >= {"file", "frame", "status", "error", "x", "y", "w", "h", "label", "confidence",
                              *(f"p_{c}" for c in BASIC7)}
    by_name = {Path(r["file"]).name: r for r in rows}
    assert set(by_name) == set(errors) | {"good.png"}
    assert by_name["good.png"]["status"] == "ok" and by_name["good.png"]["label"] in BASIC7
    for name, msg in errors.items():
        assert by_name[name]["status"] == "error" and msg in by_name[name]["error"]
    err = capsys.readouterr().err
    assert f"{len(errors)} failed" in err


def test_cli_usage_errors_exit_2(tmp_path: Path, ckpt: tuple[Path, torch.nn.Module],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--checkpoint", str(tmp_path / "nope.pt"), str(empty)]) == 2
    assert main(["predict", "--checkpoint", str(ckpt[0]), str(empty)]) == 2
    assert main(["predict", "--checkpoint", str(ckpt[0]), str(empty), "--every", "0"]) == 2
    assert main(["predict", "--checkpoint", str(ckpt[0]), str(empty), "--no-detect", "--yunet", "x.onnx"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "no image or video files" in err and "--every must be >= 1" in err
    assert "Traceback" not in err


def test_api_expands_folders(tmp_path: Path, ckpt: tuple[Path, torch.nn.Module]) -> None:
    images = synthetic_faces(3)
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i, rel in enumerate(["a/x.png", "a/b/y.png", "z.png"]):
        Image.fromarray(images[i]).save(tmp_path / rel)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    res = load_predictor(ckpt[0]).predict(tmp_path, detect=False)
    assert [Path(r.source).relative_to(tmp_path).as_posix() for r in res] == ["z.png", "a/x.png", "a/b/y.png"]  # os.walk order
    assert all(r.status == "ok" for r in res)
