"""Face detectors on constructed video clips: missed faces, false boxes, IoU and speed.

Run:  .venv/bin/python benchmarks/detector_clips.py [--frames 600] [--empty 150] [--detectors mtcnn,haar]
      [--threads 2] [--keep DIR] [--json FILE]
Results: docs/inference.md, "Detector accuracy on constructed clips".

No real video can be downloaded, so the clips are built from images that ship inside installed
packages, with the face's box known by construction:

- ``astronaut``: the head of scikit-image's astronaut photo (``skimage.data.astronaut()``,
  Eileen Collins; ground-truth face box eyebrows-to-chin, x 178..268, y 62..172 in the photo),
  cut out with a soft elliptical mask and pasted onto panning crops of scikit-image's other
  photos (coffee, cat, rocket, ...), so the background has real textures.
- ``synthetic``: one identity of dnfer's embedded synthetic faces (``dnfer synth``), its
  expression changing every 86 frames, pasted the same way; ground truth is the skin oval
  (x 0.17..0.83, y 0.2..0.93 of the 160-px render, measured on the renders).

Each of the ``--frames`` face frames (640x360) moves, scales (face width 50-130 px), rotates
(+-12 deg), and changes brightness (gain 0.55-1.3), sensor noise (sigma 0-14) and blur (Gaussian
sigma 1.5 in every third 60-frame block) smoothly over time; then ``--empty`` frames show only
the backgrounds. The clip is encoded as mp4v at 30 fps and decoded again, so the detectors see
codec artefacts as in a real file.

Per detector: face frames where no box overlaps the ground truth with IoU >= 0.3 (missed),
frames with a box that matches nothing (extra: every box on a face-free frame, every box but
the best one on a face frame), mean IoU of the matched box, and detection time per frame
(wall, this process, ``--threads`` torch/OpenCV threads).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from dnfer.inference.detect import make_detector
from dnfer.inference.track import iou

W, H, FPS = 640, 360, 30.0
MATCH_IOU = 0.3
#: Ground-truth face box in the astronaut photo (x, y, w, h): eyebrows to chin.
ASTRONAUT_FACE = (178.0, 62.0, 90.0, 110.0)


def _backgrounds() -> list[np.ndarray]:
    """scikit-image's face-free photos that load offline, as RGB at least 720 px wide."""
    from skimage import data

    out = []
    for name in ("coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "brick", "grass",
                 "gravel", "text", "page", "coins", "moon"):
        try:
            img = np.asarray(getattr(data, name)())
        except Exception:  # noqa: BLE001 - a few images are fetched on demand; offline they are skipped
            continue
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = img[..., :3].astype(np.uint8)
        f = max(720 / img.shape[1], 420 / img.shape[0])
        out.append(cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)), interpolation=cv2.INTER_AREA))
    if not out:
        raise SystemExit("no scikit-image background photo could be loaded")
    return out


def _sprite(kind: str) -> tuple[list[np.ndarray], np.ndarray, tuple[float, float, float, float]]:
    """(RGB patches, float alpha mask (h, w), face box in patch pixels) of the pasted head."""
    if kind == "astronaut":
        from skimage import data

        img = data.astronaut()
        x0, y0, x1, y1 = 118, 10, 330, 230
        patch = img[y0:y1, x0:x1]
        h, w = patch.shape[:2]
        mask = np.zeros((h, w), np.float32)
        cv2.ellipse(mask, (224 - x0, 118 - y0), (88, 104), 0, 0, 360, 1.0, -1)
        box = (ASTRONAUT_FACE[0] - x0, ASTRONAUT_FACE[1] - y0, ASTRONAUT_FACE[2], ASTRONAUT_FACE[3])
        patches = [patch]
    else:
        from dnfer.data.classes import BASIC7
        from dnfer.data.synth_render import render_face
        from dnfer.data.synthetic import sample_expression_params

        # Equal generators give the same identity, pose and nuisances; only the expression differs.
        patches = [render_face(sample_expression_params(np.random.default_rng(3), c, nuisance=0.0, intensity=0.9),
                               image_size=160, supersample=2) for c in BASIC7]
        mask = np.zeros((160, 160), np.float32)
        cv2.ellipse(mask, (80, 86), (62, 76), 0, 0, 360, 1.0, -1)
        box = (0.17 * 160, 0.2 * 160, 0.66 * 160, 0.73 * 160)
    mask = cv2.GaussianBlur(mask, (0, 0), 4)
    return patches, mask, box


def make_clip(kind: str, n_face: int, n_empty: int, seed: int = 0
              ) -> tuple[list[np.ndarray], list[tuple[float, float, float, float] | None]]:
    """RGB frames (H, W, 3) and the ground-truth face box per frame (None: no face)."""
    rng = np.random.default_rng(seed)
    bgs = _backgrounds()
    patches, mask, box = _sprite(kind)
    frames: list[np.ndarray] = []
    truth: list[tuple[float, float, float, float] | None] = []
    for t in range(n_face + n_empty):
        bg = bgs[(t // 75) % len(bgs)]
        ox = int((bg.shape[1] - W) * (0.5 + 0.5 * math.sin(t / 40)))
        oy = int((bg.shape[0] - H) * (0.5 + 0.5 * math.cos(t / 55)))
        frame = bg[oy:oy + H, ox:ox + W].astype(np.float32)
        gt = None
        if t < n_face:
            patch = patches[(t // 86) % len(patches)]
            face_w = 90 + 40 * math.sin(2 * math.pi * t / 240)  # 50..130 px
            scale = face_w / box[2]
            angle = 12 * math.sin(2 * math.pi * t / 170)
            cx = W / 2 + 170 * math.sin(2 * math.pi * t / 300)
            cy = H / 2 + 40 * math.sin(2 * math.pi * t / 130)
            fc = (box[0] + box[2] / 2, box[1] + box[3] / 2)
            m = cv2.getRotationMatrix2D(fc, angle, scale)
            m[:, 2] += (cx - fc[0], cy - fc[1])
            warped = cv2.warpAffine(patch, m, (W, H), flags=cv2.INTER_LINEAR).astype(np.float32)
            alpha = cv2.warpAffine(mask, m, (W, H), flags=cv2.INTER_LINEAR)[..., None]
            frame = frame * (1 - alpha) + warped * alpha
            corners = np.array([[box[0], box[1], 1], [box[0] + box[2], box[1], 1],
                                [box[0], box[1] + box[3], 1], [box[0] + box[2], box[1] + box[3], 1]]) @ m.T
            lo, hi = corners.min(0), corners.max(0)
            gt = (float(lo[0]), float(lo[1]), float(hi[0] - lo[0]), float(hi[1] - lo[1]))
        frame *= 0.925 + 0.375 * math.sin(2 * math.pi * t / 200)  # gain 0.55..1.3
        if (t // 60) % 3 == 2:
            frame = cv2.GaussianBlur(frame, (0, 0), 1.5)
        frame += rng.normal(0, 7 + 7 * math.sin(2 * math.pi * t / 90), frame.shape)  # sigma 0..14
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
        truth.append(gt)
    return frames, truth


def through_mp4(frames: list[np.ndarray], path: Path) -> list[np.ndarray]:
    """Encode as mp4v and decode again (the detectors then see codec artefacts)."""
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (W, H))
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    cap.release()
    if len(out) != len(frames):
        raise SystemExit(f"{path}: wrote {len(frames)} frames, read back {len(out)}")
    return out


def evaluate(detector_name: str, frames: list[np.ndarray], truth: list[tuple[float, float, float, float] | None]
             ) -> dict[str, float]:
    det = make_detector(detector_name)
    det.detect(frames[0])  # the first call builds lazy state; not timed
    missed = extra_face = extra_empty = n_face = 0
    ious: list[float] = []
    t0 = time.perf_counter()
    for frame, gt in zip(frames, truth, strict=True):
        boxes = [f.box for f in det.detect(frame)]
        if gt is None:
            extra_empty += bool(boxes)
            continue
        n_face += 1
        best = max((iou(b, gt) for b in boxes), default=0.0)
        if best >= MATCH_IOU:
            ious.append(best)
            extra_face += len(boxes) > 1
        else:
            missed += 1
            extra_face += bool(boxes)
    ms = (time.perf_counter() - t0) / len(frames) * 1000
    return {"face_frames": n_face, "empty_frames": len(frames) - n_face, "missed": missed,
            "extra_on_face_frames": extra_face, "extra_on_empty": extra_empty,
            "mean_iou": float(np.mean(ious)) if ious else 0.0, "ms_per_frame": ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=600, help="frames with the face (default 600)")
    ap.add_argument("--empty", type=int, default=150, help="face-free frames after them (default 150)")
    ap.add_argument("--clips", default="astronaut,synthetic")
    ap.add_argument("--detectors", default="mtcnn,haar")
    ap.add_argument("--threads", type=int, default=2, help="torch and OpenCV threads")
    ap.add_argument("--keep", metavar="DIR", help="keep the clips (CLIP.mp4) in this folder")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for clip in args.clips.split(","):
            frames, truth = make_clip(clip, args.frames, args.empty)
            frames = through_mp4(frames, folder / f"{clip}.mp4")
            for name in args.detectors.split(","):
                r = evaluate(name, frames, truth)
                r.update(clip=clip, detector=name)
                results.append(r)
                print(f"{clip:10s} {name:6s} missed {r['missed']}/{r['face_frames']}  extra boxes: "
                      f"{r['extra_on_face_frames']}/{r['face_frames']} face frames, {r['extra_on_empty']}/{r['empty_frames']} "
                      f"empty frames  mean IoU {r['mean_iou']:.3f}  {r['ms_per_frame']:.1f} ms/frame", flush=True)
    print("\n| clip | detector | face frames missed | face frames with an extra box | empty frames with a box "
          "| mean IoU | ms/frame |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['clip']} | {r['detector']} | {r['missed']} / {r['face_frames']} | {r['extra_on_face_frames']} / "
              f"{r['face_frames']} | {r['extra_on_empty']} / {r['empty_frames']} | {r['mean_iou']:.2f} "
              f"| {r['ms_per_frame']:.0f} |")
    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs visible, --threads {args.threads}, "
          f"python {sys.version.split()[0]}, OpenCV {cv2.__version__}, torch {torch.__version__}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
