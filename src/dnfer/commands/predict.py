"""``dnfer predict``: expressions of the faces in photos, folders and videos.

Output: one JSON line (or CSV rows, one per face) per image / sampled video frame, with the
face box, label, confidence and every class probability. Inputs that fail are reported as
``status: error`` records; images without a face as ``status: no_face``.

Exit status: 0 every input was processed (with or without faces), 1 some inputs failed
(unreadable, not an image, truncated, video that cannot be opened...), 2 bad usage (bad
option, unusable model file, nothing to process).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from pathlib import Path
from typing import IO, Any

import numpy as np

from dnfer.commands._common import add_trust_arg, note_deprecated
from dnfer.errors import ConfigError
from dnfer.inference.options import DETECTORS, VIDEO_EVERY
from dnfer.io_safety import atomic_path, check_output, check_output_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="predict expressions on photos, folders and videos",
        description="Detect faces, crop them like the training images and classify their expression. "
                    "Exit status: 0 all inputs processed, 1 some inputs failed (listed in the output), 2 bad usage.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or video files")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="FILE", help="dnfer training checkpoint (.pt)")
    src.add_argument("--onnx", metavar="FILE", help="model exported with `dnfer export --format onnx` (onnxruntime, CPU)")
    src.add_argument("--torchscript", metavar="FILE",
                     help="model exported with `dnfer export --format torchscript` (a TorchScript archive is code: "
                          "needs --trust-checkpoint)")
    p.add_argument("--out", metavar="FILE", help="output file (default: stdout)")
    p.add_argument("--output", "-o", dest="output_deprecated", metavar="FILE", help="deprecated spelling of --out")
    p.add_argument("--format", choices=["jsonl", "csv"], help="output format (default: csv if --out ends in .csv, else jsonl)")
    det = p.add_argument_group("face detection")
    det.add_argument("--no-detect", action="store_true", help="inputs are already-aligned face crops: classify the whole image")
    det.add_argument("--detector", choices=DETECTORS, default="auto",
                     help="face detector: auto (default) = mtcnn if facenet-pytorch is installed, else haar")
    det.add_argument("--yunet", metavar="MODEL.onnx", help="use OpenCV's YuNet detector with this model file (5-point alignment)")
    det.add_argument("--margin", type=float, default=0.2, help="share of the face size added on each side of the box (default 0.2)")
    det.add_argument("--min-face", type=int, default=24, help="smallest face side in px (default 24)")
    det.add_argument("--max-faces", type=int, help="keep only the N largest faces per image")
    det.add_argument("--score-threshold", type=float,
                     help="minimum detector confidence (default: MTCNN 0.9, YuNet 0.7; Haar has none)")
    det.add_argument("--no-align", action="store_true",
                     help="with MTCNN/YuNet: crop the box instead of aligning on the landmarks")
    p.add_argument("--every", type=int, default=VIDEO_EVERY, metavar="N",
                   help=f"videos: classify every N-th frame (default {VIDEO_EVERY})")
    p.add_argument("--max-frames", type=int, metavar="N", help="videos: at most N sampled frames per video")
    p.add_argument("--annotate", metavar="DIR", help="write annotated copies (box + label + confidence) here")
    p.add_argument("--video-out", metavar="PATH",
                   help="videos: write an annotated mp4 (every frame, boxes + labels + track ids); FILE.mp4 for "
                        "one input video, else a folder receiving NAME.annotated.mp4 per video")
    p.add_argument("--batch-size", type=int, default=32, help="faces per model call (default 32)")
    p.add_argument("--device", default="auto", help="checkpoint/TorchScript device: auto, cpu, cuda, mps")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: its own choice)")
    p.add_argument("--quiet", "-q", action="store_true", help="no summary on stderr")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file (an input never is)")
    add_trust_arg(p, "the model file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also off when stderr is not a terminal)")
    p.set_defaults(run=run)


def _face_row(pred: Any, i: int | None, f: Any, class_names: tuple[str, ...]) -> dict[str, Any]:
    row: dict[str, Any] = {"file": pred.source, "frame": pred.frame, "time_s": pred.time_s, "status": pred.status,
                           "error": pred.error, "face": i, "track_id": f.track_id if f is not None else None}
    box = f.box if f is not None else (None,) * 4
    row.update(zip(("x", "y", "w", "h"), box, strict=True))
    row["detector_score"] = f.detector_score if f is not None else None
    row["label"] = f.label if f is not None else None
    row["confidence"] = round(f.confidence, 6) if f is not None else None
    for c in class_names:
        row[f"p_{c}"] = round(f.probabilities[c], 6) if f is not None else None
    return row


class _Writer:
    """JSON lines (one per image/frame) or CSV (one row per face; one face-less row otherwise)."""

    def __init__(self, stream: IO[str], fmt: str, class_names: tuple[str, ...]) -> None:
        self.stream, self.fmt, self.class_names = stream, fmt, class_names
        self._csv: csv.DictWriter | None = None
        if fmt == "csv":
            cols = list(_face_row(_Dummy(), None, None, class_names))
            self._csv = csv.DictWriter(stream, fieldnames=cols)
            self._csv.writeheader()

    def write(self, pred: Any) -> None:
        if self._csv is None:
            d = pred.to_dict()
            d["file"] = d.pop("source")
            for f in d["faces"]:
                f["probabilities"] = {k: round(v, 6) for k, v in f["probabilities"].items()}
                f["confidence"] = round(f["confidence"], 6)
            self.stream.write(json.dumps(d) + "\n")
        elif pred.faces:
            for i, f in enumerate(pred.faces):
                self._csv.writerow(_face_row(pred, i, f, self.class_names))
        else:
            self._csv.writerow(_face_row(pred, None, None, self.class_names))
        self.stream.flush()


class _Dummy:
    source = frame = time_s = error = None
    status = "ok"


def annotate(rgb: np.ndarray, pred: Any) -> np.ndarray:
    """BGR uint8 copy of ``rgb`` with each face's box and ``label confidence`` drawn on it."""
    import cv2

    from dnfer.inference.video import draw_faces

    return draw_faces(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), pred.faces)


def _annotated_name(pred: Any, used: set[str]) -> str:
    stem = Path(pred.source).stem or "image"
    name = f"{stem}_f{pred.frame:06d}" if pred.frame is not None else stem
    cand, k = name, 2
    while cand in used:
        cand, k = f"{name}_{k}", k + 1
    used.add(cand)
    return cand + ".jpg"


def _video_outputs(path: str, videos: list[str], inputs: list[str]) -> dict[str, Path]:
    """Input video -> its annotated mp4 for ``--video-out PATH`` (a .mp4 file, or a folder)."""
    from dnfer.inference.video import check_video_out

    if not videos:
        raise ConfigError(f"--video-out {path!r}: none of the inputs is a video")
    if path.lower().endswith(".mp4"):
        if len(videos) > 1:
            raise ConfigError(f"--video-out {path!r} is one file but {len(videos)} videos are input; "
                              "give a folder to get NAME.annotated.mp4 per video")
        return {videos[0]: check_video_out(path, inputs)}
    folder = Path(path)
    outs: dict[str, Path] = {}
    for v in videos:
        name = f"{Path(v).stem}.annotated.mp4"
        k = 2
        while folder / name in outs.values():  # two inputs with the same stem in different folders
            name, k = f"{Path(v).stem}_{k}.annotated.mp4", k + 1
        outs[v] = check_video_out(folder / name, inputs)
    return outs


def run(args: argparse.Namespace) -> int:

    from dnfer.inference.predictor import expand_inputs, is_video, load_predictor

    for opt, v, lo in (("--every", args.every, 1), ("--batch-size", args.batch_size, 1), ("--min-face", args.min_face, 1),
                       ("--max-faces", args.max_faces, 1), ("--max-frames", args.max_frames, 1)):
        if v is not None and v < lo:
            raise ConfigError(f"{opt} must be >= {lo}, got {v}")
    if args.no_detect and args.yunet:
        raise ConfigError("--no-detect and --yunet exclude each other")
    if args.output_deprecated is not None:
        if args.out is not None:
            raise ConfigError("--out and its deprecated spelling -o/--output both given; keep --out")
        note_deprecated("predict", "-o/--output", "--out")
        args.out = args.output_deprecated
    if args.out is None:
        args.out = "-"
    if args.yunet and args.detector not in ("auto", "yunet"):
        raise ConfigError(f"--yunet and --detector {args.detector} exclude each other")
    from dnfer.inference.detect import resolve_detector

    fmt = args.format or ("csv" if str(args.out).lower().endswith(".csv") else "jsonl")
    model_path = args.checkpoint or args.onnx or args.torchscript
    if Path(model_path).is_dir():
        raise ConfigError(f"model file {model_path!r} is a folder; expected a checkpoint or exported model file")
    detector = "yunet" if args.yunet else args.detector
    if args.no_detect:
        detector = "haar"  # never built: nothing to resolve
    detector, note = resolve_detector(detector)
    if note is not None and not args.quiet:
        print(f"dnfer predict: note: {note}", file=sys.stderr)
    out_path = None
    if args.out != "-":
        out_path = check_output(args.out, option="--out", inputs=[model_path, args.yunet, *args.inputs],
                                overwrite=args.overwrite)
    predictor = load_predictor(
        model_path, device=args.device, detector=detector, yunet_model=args.yunet,
        margin=args.margin, align=not args.no_align, batch_size=args.batch_size, max_faces=args.max_faces,
        min_face=args.min_face, threads=args.threads, score_threshold=args.score_threshold,
        trust_checkpoint=args.trust_checkpoint,
    )
    if args.onnx and predictor.info.format != "onnx":
        raise ConfigError(f"--onnx {args.onnx!r}: not an ONNX file (name it *.onnx, or use --checkpoint/--torchscript)")
    files, ignored = expand_inputs(args.inputs)
    if not files:
        raise ConfigError(f"no image or video files found in {', '.join(map(repr, args.inputs))}")
    if not args.no_detect:
        _ = predictor.detector  # build (and check) the detector before any output is written
    if out_path is not None and any(_same(out_path, f) for f in files):
        raise ConfigError(f"--out {args.out!r} is one of the inputs; choose another output file")
    videos = [f for f in files if is_video(f)]
    video_out = _video_outputs(args.video_out, videos, files) if args.video_out else {}
    for path in video_out.values():
        if path.exists() and not args.overwrite:
            raise ConfigError(f"--video-out: {str(path)!r} already exists; pass --overwrite to replace it, "
                              "or choose another path")
    ann_dir = Path(args.annotate) if args.annotate else None
    if ann_dir is not None:
        check_output_dir(ann_dir, option="--annotate", inputs=[model_path, *args.inputs])
        if ann_dir.exists() and any(_same(ann_dir, Path(f).parent) for f in files):
            raise ConfigError(f"--annotate {args.annotate!r} holds input images that annotated copies could replace; "
                              "choose another folder")
        ann_dir.mkdir(parents=True, exist_ok=True)
    counts = {"ok": 0, "no_face": 0, "error": 0}
    with contextlib.ExitStack() as stack:
        if out_path is None:
            out: IO[str] = sys.stdout
        else:  # written to a temporary, renamed over --out at the end (removed if the run fails)
            tmp = stack.enter_context(atomic_path(out_path))
            out = stack.enter_context(open(tmp, "w", newline="", encoding="utf-8"))
        n_faces = _predict_all(args, predictor, files, fmt, out, ann_dir, counts, video_out)
    if not args.quiet:
        n = sum(counts.values())
        msg = (f"dnfer predict: {len(files)} input file(s), {n} image(s)/frame(s): {n_faces} face(s), "
               f"{counts['no_face']} without a face, {counts['error']} failed")
        if ignored:
            msg += f"; ignored {len(ignored)} file(s) in folders that are not images/videos (e.g. {ignored[0]!r})"
        print(msg, file=sys.stderr)
    return 1 if counts["error"] else 0


def _same(a: Path | str, b: Path | str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _predict_all(args: argparse.Namespace, predictor: Any, files: list[Any], fmt: str, out: IO[str],
                 ann_dir: Path | None, counts: dict[str, int], video_out: dict[str, Path]) -> int:
    """Predict every file, writing records to ``out``, annotated copies to ``ann_dir`` and annotated
    videos to ``video_out`` (input video -> mp4); returns the face count."""
    import cv2

    from dnfer.inference.video import VideoAnnotator

    used: set[str] = set()
    n_faces = 0
    writer = _Writer(out, fmt, predictor.class_names)
    video: VideoAnnotator | None = None  # the annotated video being written, for the current input
    try:
        for pred, rgb in predictor.predict_iter(files, detect=not args.no_detect, every=args.every,
                                                max_frames=args.max_frames, keep_image=ann_dir is not None,
                                                progress=not args.no_progress):
            if video is not None and video.src != pred.source:
                video.close()
                video = None
            if video is None and pred.source in video_out and pred.error is None:
                video = VideoAnnotator(pred.source, video_out.pop(pred.source), args.every)
            if video is not None:
                video.add(pred)
            writer.write(pred)
            counts[pred.status] += 1
            n_faces += len(pred.faces)
            if pred.error is not None and not args.quiet:
                print(f"dnfer predict: {pred.source}: {pred.error}", file=sys.stderr)
            if ann_dir is not None and rgb is not None:
                cv2.imwrite(str(ann_dir / _annotated_name(pred, used)), annotate(rgb, pred))
        if video is not None:
            video.close()
            video = None
    finally:
        if video is not None:  # interrupted: no half-written video under the output name
            video.abort()
    return n_faces
