"""Video prediction: track ids, annotated mp4 output, the shared sampling default, detector choice."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from tests.test_inference import make_checkpoint, synthetic_faces

from dnfer.cli import build_parser, main
from dnfer.errors import ConfigError
from dnfer.inference import options
from dnfer.inference.detect import HaarDetector, make_detector, mtcnn_available, resolve_detector
from dnfer.inference.predictor import Predictor, _count_units, load_predictor
from dnfer.inference.track import IoUTracker, iou

SIZE = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def _write_video(path: Path, frames: np.ndarray, fps: float, fourcc: str = "MJPG") -> None:
    h, w = frames.shape[1:3]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (w, h))
    assert vw.isOpened()
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()


def _read_video(path: Path) -> tuple[list[np.ndarray], float, tuple[int, int]]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened()
    fps = cap.get(cv2.CAP_PROP_FPS)
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    cap.release()
    return frames, fps, size


# ----------------------------------------------------------------------------- tracker


def test_iou_hand_computed() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 10, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 5, 5)) == 0.0
    assert iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_tracker_keeps_ids_when_two_faces_cross_slowly() -> None:
    """Two equal boxes on the same row slide through each other; the list order is shuffled every frame."""
    rng = np.random.default_rng(0)
    tracker = IoUTracker()
    seen: list[tuple[int, int]] = []
    for t in range(60):
        a = (10.0 + 4 * t, 50.0, 40.0, 40.0)   # moves right
        b = (250.0 - 4 * t, 50.0, 40.0, 40.0)  # moves left; they coincide near t = 30
        flip = bool(rng.integers(2))
        ids = tracker.update([b, a] if flip else [a, b])
        seen.append((ids[1], ids[0]) if flip else (ids[0], ids[1]))
    assert sorted(seen[0]) == [1, 2]
    assert all(s == seen[0] for s in seen), [i for i, s in enumerate(seen) if s != seen[0]]


def test_tracker_expires_tracks_and_starts_new_ids() -> None:
    box = (100.0, 100.0, 50.0, 50.0)
    tracker = IoUTracker(max_missed=2)
    assert tracker.update([box]) == [1]
    assert tracker.update([]) == [] and tracker.update([]) == []  # 2 misses: still alive
    assert tracker.update([box]) == [1]
    for _ in range(3):  # 3 misses > max_missed: dropped
        tracker.update([])
    assert tracker.update([box]) == [2]
    # A box far from every track (IoU below the threshold) starts a new track; the old one continues.
    assert tracker.update([box, (400.0, 100.0, 50.0, 50.0)]) == [2, 3]
    # A jump that overlaps less than min_iou is a new face, not the same one.
    assert tracker.update([(130.0, 100.0, 50.0, 50.0)]) == [4]  # IoU 20*50 / (2*2500 - 1000) = 0.25 < 0.3


# ----------------------------------------------------------------------------- sampling default


def test_api_and_cli_share_one_sampling_default() -> None:
    for fn in (Predictor.predict, Predictor.predict_iter, Predictor.annotate_video):
        assert inspect.signature(fn).parameters["every"].default is options.VIDEO_EVERY, fn.__name__
    args = build_parser().parse_args(["predict", "x.jpg", "--checkpoint", "m.pt"])
    assert args.every is options.VIDEO_EVERY
    assert args.detector == "auto" and args.no_progress is False


def test_progress_total_counts_images_and_sampled_frames(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    frames = synthetic_faces(2, size=SIZE)
    cv2.imwrite(str(tmp_path / "d" / "a.png"), frames[0])
    cv2.imwrite(str(tmp_path / "d" / "b.png"), frames[1])
    _write_video(tmp_path / "v.avi", np.stack([frames[0]] * 23), fps=10)
    inputs = [tmp_path / "d", tmp_path / "v.avi", np.zeros((8, 8, 3), np.uint8)]
    assert _count_units(inputs, 5, None) == 2 + 5 + 1  # frames 0, 5, 10, 15, 20
    assert _count_units(inputs, 5, 2) == 2 + 2 + 1
    assert _count_units([tmp_path / "missing.mp4"], 5, None) == 1  # one error record


# ----------------------------------------------------------------------------- annotated video


def test_annotated_video_has_every_frame_at_the_source_rate(tmp_path: Path, ckpt: tuple[Path, torch.nn.Module]) -> None:
    frames = np.stack([cv2.resize(f, (64, 48)) for f in synthetic_faces(23, size=SIZE, seed=1)])
    src = tmp_path / "clip.avi"
    _write_video(src, frames, fps=12.0)
    out = tmp_path / "out" / "clip.mp4"
    pred = load_predictor(ckpt[0])
    res = pred.annotate_video(src, out, detect=False, every=5)
    assert [r.frame for r in res] == [0, 5, 10, 15, 20]
    assert all(len(r.faces) == 1 and r.faces[0].track_id == 1 for r in res)  # one whole-image "face", one track
    written, fps, size = _read_video(out)
    assert len(written) == 23 and size == (64, 48) and fps == pytest.approx(12.0, abs=0.01)
    assert sorted(p.name for p in out.parent.iterdir()) == ["clip.mp4"]  # no temporary file left behind
    # Every frame carries the drawing (label box at the top left), not only the sampled ones.
    source = [cv2.cvtColor(f, cv2.COLOR_RGB2BGR).astype(int) for f in frames]
    diff = [np.abs(w.astype(int) - s)[:12].mean() for w, s in zip(written, source, strict=True)]
    assert min(diff) > 10
    # max_frames: the video stops after the frames the last sampled frame covers.
    pred.annotate_video(src, out, detect=False, every=5, max_frames=2)
    assert len(_read_video(out)[0]) == 10


def test_annotated_video_refuses_inputs_and_bad_names(tmp_path: Path, ckpt: tuple[Path, torch.nn.Module]) -> None:
    frames = np.stack([cv2.resize(f, (64, 48)) for f in synthetic_faces(4, size=SIZE)])
    src = tmp_path / "clip.mp4"
    _write_video(src, frames, fps=10.0, fourcc="mp4v")
    before = src.read_bytes()
    pred = load_predictor(ckpt[0])
    with pytest.raises(ConfigError, match="is an input file"):
        pred.annotate_video(src, src, detect=False)
    with pytest.raises(ConfigError, match=r"\*\.mp4"):
        pred.annotate_video(src, tmp_path / "out.avi", detect=False)
    assert src.read_bytes() == before


def test_cli_video_out(tmp_path: Path, ckpt: tuple[Path, torch.nn.Module], capsys: pytest.CaptureFixture[str]) -> None:
    frames = np.stack([cv2.resize(f, (64, 48)) for f in synthetic_faces(9, size=SIZE)])
    d = tmp_path / "in"
    d.mkdir()
    _write_video(d / "a.avi", frames, fps=10.0)
    _write_video(d / "b.avi", frames[:4], fps=8.0)
    cv2.imwrite(str(d / "still.png"), frames[0])
    out = tmp_path / "preds.jsonl"
    rc = main(["predict", "--checkpoint", str(ckpt[0]), str(d), "--no-detect", "--every", "3", "-o", str(out),
               "--video-out", str(tmp_path / "videos"), "--no-progress"])
    assert rc == 0
    recs = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [(Path(r["file"]).name, r["frame"]) for r in recs] == [
        ("a.avi", 0), ("a.avi", 3), ("a.avi", 6), ("b.avi", 0), ("b.avi", 3), ("still.png", None)]
    assert [r["faces"][0]["track_id"] for r in recs] == [1, 1, 1, 1, 1, None]
    a, fps_a, _ = _read_video(tmp_path / "videos" / "a.annotated.mp4")
    b, fps_b, _ = _read_video(tmp_path / "videos" / "b.annotated.mp4")
    assert (len(a), len(b)) == (9, 4) and fps_a == pytest.approx(10.0, abs=0.01) and fps_b == pytest.approx(8.0, abs=0.01)
    # One FILE.mp4 for several videos, or an input as the output: exit 2 with one line, nothing written.
    assert main(["predict", "--checkpoint", str(ckpt[0]), str(d), "--no-detect", "--video-out",
                 str(tmp_path / "one.mp4")]) == 2
    mp4 = tmp_path / "clip.mp4"
    _write_video(mp4, frames, fps=10.0, fourcc="mp4v")
    assert main(["predict", "--checkpoint", str(ckpt[0]), str(mp4), "--no-detect", "--video-out", str(mp4)]) == 2
    err = capsys.readouterr().err
    assert "2 videos are input" in err and "is an input file" in err and "Traceback" not in err
    assert not (tmp_path / "one.mp4").exists()


# ----------------------------------------------------------------------------- detector choice


def test_detector_falls_back_to_haar_without_facenet(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     ckpt: tuple[Path, torch.nn.Module],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # any import of it now raises ImportError
    kind, note = resolve_detector("auto")
    assert kind == "haar" and note is not None and "dnfer[detect]" in note
    assert resolve_detector("haar") == ("haar", None)
    with pytest.raises(ConfigError, match="facenet-pytorch"):
        make_detector("mtcnn")
    with pytest.raises(ConfigError, match="valid are auto, mtcnn, haar, yunet"):
        resolve_detector("retina")
    pred = load_predictor(ckpt[0])
    with pytest.warns(UserWarning, match="Haar"):
        assert isinstance(pred.detector, HaarDetector)
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), np.full((40, 40, 3), 128, np.uint8))
    assert main(["predict", "--checkpoint", str(ckpt[0]), str(img), "-o", str(tmp_path / "p.jsonl")]) == 0
    err = capsys.readouterr().err
    assert "note: facenet-pytorch is not installed" in err and err.count("facenet-pytorch is not installed") == 1
    # --no-detect never needs a detector: no note.
    assert main(["predict", "--checkpoint", str(ckpt[0]), str(img), "--no-detect", "-o", str(tmp_path / "q.jsonl")]) == 0
    assert "facenet-pytorch" not in capsys.readouterr().err


@pytest.mark.skipif(not mtcnn_available(), reason="facenet-pytorch (the MTCNN detector, dnfer[detect]) is not installed")
def test_mtcnn_finds_the_astronaut_and_nothing_in_a_flat_image() -> None:
    from skimage import data

    from dnfer.inference.detect import MTCNNDetector

    assert resolve_detector("auto") == ("mtcnn", None)
    det = make_detector("auto")
    assert isinstance(det, MTCNNDetector)
    faces = det.detect(data.astronaut())
    assert len(faces) == 1
    f = faces[0]
    # Eileen Collins' face (eyebrows to chin) is x 178..268, y 62..172 in the 512x512 photo.
    assert iou(f.box, (178.0, 62.0, 90.0, 110.0)) > 0.6
    assert f.score is not None and f.score > 0.95
    lm = np.asarray(f.landmarks)
    assert lm.shape == (5, 2) and lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # image-left eye/mouth corner first
    assert lm[:2, 1].max() < lm[2, 1] < lm[3:, 1].min()  # eyes above the nose above the mouth
    assert det.detect(np.full((200, 300, 3), 128, np.uint8)) == []
    for shape in ((1, 1, 3), (20, 400, 3)):  # smaller than the smallest face: nothing, not a crash
        assert det.detect(np.zeros(shape, np.uint8)) == []
