"""Run a trained expression model on photos, folders and videos.

``load_predictor(path)`` accepts a dnfer training checkpoint (``.pt``), an exported ONNX model
(run by onnxruntime on the CPU) or an exported TorchScript file, and returns a
:class:`Predictor`. Every format carries the preprocessing the model was trained with (input
size, mean/std, colour order), so the same pipeline runs for all three:

    image -> RGB uint8 -> face boxes (MTCNN / Haar / YuNet, or the whole image with detect=False)
          -> crop with margin (or 5-point alignment) -> antialiased bilinear resize to S x S
          -> (x / 255 - mean) / std -> model -> softmax over the checkpoint's classes

Inputs that cannot be read (missing, 0-byte, truncated, not an image, decompression bombs,
videos OpenCV cannot open) give a :class:`Prediction` with ``error`` set; inputs in which no
face is found give one with an empty ``faces`` list. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dnfer.data.decode import DecodeError, _array_to_image, decode_image, file_size, to_rgb
from dnfer.data.records import IMAGE_EXTENSIONS
from dnfer.data.transforms import normalize
from dnfer.engine.checkpoint import TRUST_HINT, Checkpoint, load_checkpoint, load_model
from dnfer.errors import ConfigError, DnferError
from dnfer.inference.detect import Detector, FaceBox, aligned_crop, box_crop, make_detector, resolve_detector
from dnfer.inference.options import VIDEO_EVERY
from dnfer.inference.track import IoUTracker
from dnfer.inference.video import VideoAnnotator
from dnfer.preprocessing import Preprocessing

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"})

#: Files larger than this are refused before reading (a photo is far smaller; a mislabelled
#: disk image or archive is not worth reading into memory).
MAX_FILE_BYTES = 512 * 1024**2
#: Photos are decoded at most at this side length (JPEG DCT scaling; others are resized):
#: detection and 224-px crops need no more, and a 100-Mpx panorama would cost ~300 MB per copy.
MAX_IMAGE_SIDE = 4096

ImageInput = str | os.PathLike | Image.Image | np.ndarray


class PredictorError(DnferError):
    """A model file that cannot be used for prediction."""


# ----------------------------------------------------------------------------- results


@dataclass
class FacePrediction:
    """One face: where it is and what the model says.

    Attributes:
        box: ``(x, y, w, h)`` in source-image pixels (the detector's box, before the margin; the
            whole image when detection is off).
        label: the most probable class.
        confidence: its probability.
        probabilities: every class name -> probability (sums to 1).
        detector_score: the detector's confidence (None without detection).
        landmarks: 5 ``(x, y)`` points (MTCNN, YuNet).
        track_id: video frames: the face's track id, stable across the video's sampled frames
            (:mod:`dnfer.inference.track`); None for images.
    """

    box: tuple[float, float, float, float]
    label: str
    confidence: float
    probabilities: dict[str, float]
    detector_score: float | None = None
    landmarks: tuple[tuple[float, float], ...] | None = None
    track_id: int | None = None


@dataclass
class Prediction:
    """The result for one input image or one sampled video frame.

    Attributes:
        source: the file path (``<array 3>`` / ``<PIL 3>`` for in-memory inputs: list index).
        frame: video frame index (None for images).
        time_s: video timestamp in seconds (None for images).
        width, height: size of the (upright) image in pixels, None if it could not be read.
        faces: the faces found, largest first (empty: no face found).
        error: why the input could not be processed (None if it was).
    """

    source: str
    frame: int | None = None
    time_s: float | None = None
    width: int | None = None
    height: int | None = None
    faces: list[FacePrediction] = field(default_factory=list)
    error: str | None = None

    @property
    def status(self) -> str:
        """``ok``, ``no_face`` or ``error``."""
        return "error" if self.error is not None else ("ok" if self.faces else "no_face")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status
        return d


@dataclass(frozen=True)
class ModelInfo:
    """What the model expects and predicts (read from the checkpoint or export metadata)."""

    preprocessing: Preprocessing
    model_name: str = ""
    format: str = "checkpoint"

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.preprocessing.class_names

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.preprocessing.std

    @property
    def color_order(self) -> str:
        return self.preprocessing.color_order

    def metadata(self) -> dict[str, Any]:
        """JSON-able dict embedded into exported models."""
        return {"format": "dnfer-export", "version": 1, **self.preprocessing.to_dict(), "model_name": self.model_name}

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], fmt: str, source: str) -> ModelInfo:
        pre = Preprocessing.from_dict(meta, source)
        if not pre.class_names:
            raise PredictorError(f"{source!r}: dnfer metadata is incomplete (no class names)")
        return cls(pre, model_name=str(meta.get("model_name", "")), format=fmt)


# ----------------------------------------------------------------------------- back-ends

Backend = Callable[[torch.Tensor], np.ndarray]  # float32 (B, 3, S, S) normalised -> logits (B, K)


def _torch_backend(module: torch.nn.Module, device: torch.device) -> Backend:
    module.eval()

    @torch.inference_mode()
    def run(x: torch.Tensor) -> np.ndarray:
        return module(x.to(device)).float().cpu().numpy()

    return run


def _onnx_backend(path: Path, threads: int | None) -> tuple[Backend, dict[str, str]]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("ONNX models need onnxruntime: pip install 'dnfer[export]'") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for bad files
        raise PredictorError(f"{str(path)!r} is not a loadable ONNX model ({str(e).strip()[:200]})") from None
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> np.ndarray:
        return sess.run(None, {name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0]

    return run, meta


def is_torchscript(path: Path) -> bool:
    """TorchScript archives hold ``<name>/constants.pkl``; training checkpoints do not."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def model_from_checkpoint(ckpt: Checkpoint) -> tuple[torch.nn.Module, ModelInfo]:
    """The eval-mode CPU model of a loaded dnfer checkpoint and its :class:`ModelInfo`."""
    return load_model(ckpt, "cpu"), ModelInfo(ckpt.preprocessing, model_name=ckpt.model_name, format="checkpoint")


# ----------------------------------------------------------------------------- reading inputs


def load_rgb(path: str | os.PathLike, *, max_side: int = MAX_IMAGE_SIDE, max_bytes: int = MAX_FILE_BYTES) -> np.ndarray:
    """Read an image file upright (EXIF orientation applied) as RGB uint8 ``(H, W, 3)``.

    Mode conversion is :func:`dnfer.data.decode.to_rgb` (the training decoder's rules). Images
    larger than ``max_side`` are reduced (JPEG: at decode time) to save memory.

    Raises:
        DecodeError: missing, 0-byte, too large, truncated, not an image, decompression bomb.
    """
    p = os.fspath(path)
    if os.path.isdir(p):
        raise DecodeError("is a directory")
    size = file_size(p)
    if size > max_bytes:
        raise DecodeError(f"file too large ({size / 1024**2:.0f} MiB > {max_bytes / 1024**2:.0f} MiB)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, corrupt EXIF: not fatal
            img = Image.open(p)
            if img.format == "JPEG" and max(img.size) > max_side:
                img.draft(img.mode, (max_side, max_side))
            img = ImageOps.exif_transpose(img)
            img.load()
            rgb = to_rgb(img)
            if max(rgb.size) > max_side:
                rgb.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except UnidentifiedImageError:
        raise DecodeError("not an image file (format not recognised)") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large ({e})") from None
    except MemoryError:
        raise DecodeError("image too large (out of memory)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower() or "broken data stream" in msg.lower():
            msg = "truncated image file"
        raise DecodeError(f"cannot decode image ({msg})") from None


def _as_rgb_array(img: Image.Image | np.ndarray) -> np.ndarray:
    """In-memory input -> RGB uint8 ``(H, W, 3)``; arrays are taken as RGB (convert OpenCV's BGR first)."""
    if isinstance(img, Image.Image):
        return np.asarray(to_rgb(ImageOps.exif_transpose(img)), dtype=np.uint8)
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 3 and a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    # Gray, RGBA, 16-bit or float arrays: the training decoder's array rules.
    return np.asarray(to_rgb(_array_to_image(a)), dtype=np.uint8)


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """Files to process for CLI arguments: files as given, folders walked recursively (sorted).

    Returns ``(files, ignored)``: in folders only image/video extensions are taken, the other
    files are returned in ``ignored`` (so the caller can say how many were left out); a file
    named explicitly is always processed (and reported as an error if it is not an image).
    """
    files: list[str] = []
    ignored: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for root, dirs, names in os.walk(p):
                dirs.sort()
                for n in sorted(names):
                    f = Path(root) / n
                    if f.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS:
                        files.append(str(f))
                    elif not n.startswith("."):
                        ignored.append(str(f))
        else:
            files.append(str(p))
    return files, ignored


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def iter_video(path: str, every: int, max_frames: int | None = None) -> Iterator[tuple[int, float | None, np.ndarray]]:
    """``(frame index, time in s, RGB uint8 (H, W, 3))`` for every ``every``-th frame, from 0.

    Raises:
        DecodeError: the file is missing/empty or OpenCV cannot open it or read any frame.
    """
    import cv2

    if not os.path.isfile(path):
        raise DecodeError("file not found")
    if os.path.getsize(path) == 0:
        raise DecodeError("zero-byte file")
    cap = cv2.VideoCapture(path)
    try:
        if not cap.isOpened():
            raise DecodeError("OpenCV cannot open this video (unknown container/codec or corrupt file)")
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        idx = sent = 0
        read_any = False
        while max_frames is None or sent < max_frames:
            if idx % every == 0:
                ok, frame = cap.read()
                if not ok:
                    break
                read_any = True
                sent += 1
                yield idx, (idx / fps if fps > 0 else None), cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            elif not cap.grab():  # grab() skips the colour conversion of frames we do not use
                break
            idx += 1
        if not read_any:
            raise DecodeError("no frame could be read from this video")
    finally:
        cap.release()


def _count_units(images: Sequence[ImageInput], every: int, max_frames: int | None) -> int:
    """How many predictions ``predict_iter`` will yield (for the progress bar).

    Videos count their sampled frames from the container's frame count (read from the header).
    """
    import cv2

    total = 0
    for item in images:
        if not isinstance(item, (str, os.PathLike)):
            total += 1
            continue
        for source in (expand_inputs([item])[0] if os.path.isdir(item) else [os.fspath(item)]):
            if not is_video(source):
                total += 1
                continue
            cap = cv2.VideoCapture(source) if os.path.isfile(source) else None
            # The header's count (0 if absent); the bar then only ends early or late, nothing else.
            n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0) if cap is not None and cap.isOpened() else 0
            if cap is not None:
                cap.release()
            sampled = max(1, -(-n // every))  # an unreadable video still yields one error record
            total += sampled if max_frames is None else min(sampled, max_frames)
    return total


# ----------------------------------------------------------------------------- predictor


@dataclass
class _Pending:
    pred: Prediction
    crops: list[np.ndarray]
    boxes: list[FaceBox]
    image: np.ndarray | None


class Predictor:
    """Face detection + expression classification with one model.

    Args:
        backend: normalised float32 ``(B, 3, S, S)`` -> logits ``(B, K)``.
        info: class names and preprocessing.
        detector: face detector (None: ``detector_factory()``, called on first use).
        margin: share of the face box added on each side before cropping.
        align: crop by 5-point alignment when the detector gives landmarks (MTCNN, YuNet).
        batch_size: faces per model call.
        max_faces: keep at most this many (largest) faces per image; None = all.
        detector_factory: builds the detector when none is given (default: Haar); lazily, so
            runs that never detect (``detect=False``) never load one.
        detector_note: warned when the factory's detector is built (e.g. why Haar and not MTCNN).
    """

    def __init__(self, backend: Backend, info: ModelInfo, *, detector: Detector | None = None, margin: float = 0.2,
                 align: bool = True, batch_size: int = 32, max_faces: int | None = None,
                 module: torch.nn.Module | None = None, detector_factory: Callable[[], Detector] | None = None,
                 detector_note: str | None = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
        if not 0.0 <= margin <= 2.0:
            raise ConfigError(f"--margin must be in [0, 2] (share of the face size per side), got {margin}")
        self.backend = backend
        self.info = info
        self._detector = detector
        self.margin = margin
        self.align = align
        self.batch_size = batch_size
        self.max_faces = max_faces
        self.module = module  # the eager/TorchScript model, None for ONNX
        self._detector_factory = detector_factory or (lambda: make_detector("haar"))
        self.detector_note = detector_note

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.class_names

    @property
    def image_size(self) -> int:
        return self.info.image_size

    @property
    def detector(self) -> Detector:
        if self._detector is None:
            if self.detector_note is not None:
                warnings.warn(self.detector_note, stacklevel=2)
            self._detector = self._detector_factory()
        return self._detector

    # -- the model on ready-made crops

    def preprocess(self, crops: np.ndarray) -> torch.Tensor:
        """uint8 ``(B, S, S, 3)`` RGB crops -> normalised float32 ``(B, 3, S, S)``.

        The same ``normalize`` call as training and ``dnfer eval`` (bit-identical inputs).
        """
        x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2)
        if self.info.color_order == "BGR":
            x = x.flip(1)
        return normalize(x, self.info.mean, self.info.std).contiguous()

    def predict_crops(self, crops: np.ndarray) -> np.ndarray:
        """Softmax probabilities float32 ``(B, K)`` of uint8 ``(B, S, S, 3)`` RGB crops at the model size."""
        crops = np.asarray(crops)
        s = self.image_size
        if crops.ndim != 4 or crops.shape[1:] != (s, s, 3) or crops.dtype != np.uint8:
            raise ConfigError(f"predict_crops needs uint8 (B, {s}, {s}, 3) crops, got {crops.dtype} {crops.shape}")
        out = []
        for i in range(0, len(crops), self.batch_size):
            logits = torch.from_numpy(np.asarray(self.backend(self.preprocess(crops[i:i + self.batch_size]))))
            out.append(logits.float().softmax(1).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)

    # -- images -> faces -> crops

    def _faces_and_crops(self, rgb: np.ndarray, detect: bool) -> tuple[list[FaceBox], list[np.ndarray]]:
        s = self.image_size
        h, w = rgb.shape[:2]
        if not detect:
            return [FaceBox(box=(0.0, 0.0, float(w), float(h)))], [decode_image(rgb, size=s)]
        boxes = self.detector.detect(rgb)
        if self.max_faces is not None:
            boxes = boxes[: self.max_faces]
        crops = []
        for b in boxes:
            if self.align and b.landmarks is not None:
                crops.append(aligned_crop(rgb, np.asarray(b.landmarks), s, self.margin))
            else:
                crops.append(box_crop(rgb, b.box, s, self.margin))
        return boxes, crops

    def _units(self, images: Iterable[ImageInput], detect: bool, every: int, max_frames: int | None,
               keep_image: bool) -> Iterator[_Pending]:
        for i, item in enumerate(images):
            if isinstance(item, (str, os.PathLike)):
                paths = expand_inputs([item])[0] if os.path.isdir(item) else [os.fspath(item)]
                for source in paths:
                    yield from self._file_units(source, detect, every, max_frames, keep_image)
                continue
            source = f"<{'PIL' if isinstance(item, Image.Image) else 'array'} {i}>"
            try:
                rgb = _as_rgb_array(item)
            except (DecodeError, ValueError, TypeError) as e:
                yield _Pending(Prediction(source, error=getattr(e, "reason", str(e))), [], [], None)
                continue
            yield self._unit(Prediction(source), rgb, detect, keep_image)

    def _file_units(self, source: str, detect: bool, every: int, max_frames: int | None,
                    keep_image: bool) -> Iterator[_Pending]:
        if is_video(source):
            try:
                for idx, t, rgb in iter_video(source, every, max_frames):
                    yield self._unit(Prediction(source, frame=idx, time_s=t), rgb, detect, keep_image)
            except DecodeError as e:
                yield _Pending(Prediction(source, error=e.reason), [], [], None)
            return
        try:
            rgb = load_rgb(source)
        except DecodeError as e:
            yield _Pending(Prediction(source, error=e.reason), [], [], None)
            return
        yield self._unit(Prediction(source), rgb, detect, keep_image)

    def _unit(self, pred: Prediction, rgb: np.ndarray, detect: bool, keep_image: bool) -> _Pending:
        pred.height, pred.width = int(rgb.shape[0]), int(rgb.shape[1])
        try:
            boxes, crops = self._faces_and_crops(rgb, detect)
        except DecodeError as e:  # e.g. a degenerate box; per-input, never fatal
            pred.error = e.reason
            return _Pending(pred, [], [], None)
        return _Pending(pred, crops, boxes, rgb if keep_image else None)

    def _flush(self, pending: list[_Pending]) -> None:
        crops = [c for p in pending for c in p.crops]
        if not crops:
            return
        probs = self.predict_crops(np.stack(crops))
        k = 0
        names = self.class_names
        for p in pending:
            for b in p.boxes:
                row = probs[k]
                k += 1
                j = int(row.argmax())
                p.pred.faces.append(FacePrediction(
                    box=tuple(round(float(v), 2) for v in b.box),  # type: ignore[arg-type]
                    label=names[j], confidence=float(row[j]),
                    probabilities={n: float(v) for n, v in zip(names, row, strict=True)},
                    detector_score=b.score, landmarks=b.landmarks,
                ))

    def predict_iter(self, images: Iterable[ImageInput], *, detect: bool = True, every: int = VIDEO_EVERY,
                     max_frames: int | None = None, keep_image: bool = False, progress: bool = False
                     ) -> Iterator[tuple[Prediction, np.ndarray | None]]:
        """Stream ``(Prediction, RGB image or None)`` in input order, batching faces across inputs.

        Args:
            images: file paths (images, videos, or folders: walked recursively for image/video
                files), PIL images, or RGB arrays ``(H, W, 3)``.
            detect: find faces; False = each input is one already-aligned face crop.
            every: for videos, use every ``every``-th frame (0, every, 2*every, ...); the default
                :data:`~dnfer.inference.options.VIDEO_EVERY` is also the CLI's.
            max_frames: for videos, stop after this many sampled frames.
            keep_image: also yield the RGB image (for drawing annotations).
            progress: show a tqdm bar of images/sampled frames on stderr (off when stderr is
                not a terminal).

        Faces in video frames get a ``track_id`` (one :class:`IoUTracker` per video).
        """
        if every < 1:
            raise ConfigError(f"--every must be >= 1, got {every}")
        from tqdm.auto import tqdm

        images = list(images) if progress else images
        total = _count_units(images, every, max_frames) if progress else None  # type: ignore[arg-type]
        bar = tqdm(total=total, desc="predict", unit="img", disable=True if not progress else None, dynamic_ncols=True)
        tracked: tuple[str, IoUTracker] | None = None
        pending: list[_Pending] = []
        n_crops = 0

        def ready() -> Iterator[tuple[Prediction, np.ndarray | None]]:
            nonlocal tracked
            self._flush(pending)
            for p in pending:
                if p.pred.frame is not None:
                    if tracked is None or tracked[0] != p.pred.source:
                        tracked = (p.pred.source, IoUTracker())
                    ids = tracked[1].update([f.box for f in p.pred.faces])
                    for f, tid in zip(p.pred.faces, ids, strict=True):
                        f.track_id = tid
                bar.update(1)
                yield p.pred, p.image

        try:
            for unit in self._units(images, detect, every, max_frames, keep_image):
                pending.append(unit)
                n_crops += len(unit.crops)
                if n_crops >= self.batch_size or len(pending) >= self.batch_size:
                    yield from ready()
                    pending, n_crops = [], 0
            yield from ready()
        finally:
            bar.close()

    def annotate_video(self, video: str | os.PathLike, out: str | os.PathLike, *, detect: bool = True,
                       every: int = VIDEO_EVERY, max_frames: int | None = None,
                       progress: bool = False) -> list[Prediction]:
        """Predict on ``video``'s sampled frames and write an annotated mp4 copy to ``out``.

        Every source frame is written at the source frame rate; the frames between two sampled
        frames carry the boxes, labels and track ids of the earlier one
        (:mod:`dnfer.inference.video`). ``out`` is written atomically and may not be ``video``.

        Returns:
            the predictions of the sampled frames, as :meth:`predict` gives them.
        """
        if not is_video(video):
            raise ConfigError(f"{os.fspath(video)!r} is not a video file (extensions: {', '.join(sorted(VIDEO_EXTENSIONS))})")
        preds = self.predict([video], detect=detect, every=every, max_frames=max_frames, progress=progress)
        if preds and preds[0].error is not None:
            raise ConfigError(f"{os.fspath(video)!r}: {preds[0].error}")
        writer = VideoAnnotator(video, out, every)
        try:
            for p in preds:
                writer.add(p)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        return preds

    def predict(self, images: ImageInput | Iterable[ImageInput], *, detect: bool = True, every: int = VIDEO_EVERY,
                max_frames: int | None = None, progress: bool = False) -> list[Prediction]:
        """Predict on one input or a list of them; one :class:`Prediction` per image or sampled video frame.

        Example::

            p = dnfer.load_predictor("runs/x/best.pt")
            for r in p.predict(["photo.jpg", "clips/"]):  # a folder: its images and videos, recursively
                print(r.source, [(f.label, f.confidence) for f in r.faces], r.error)
        """
        if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
            images = [images]
        return [p for p, _ in self.predict_iter(images, detect=detect, every=every, max_frames=max_frames,
                                                progress=progress)]


def load_predictor(path: str | os.PathLike, *, device: str = "cpu", detector: str = "auto",
                   yunet_model: str | os.PathLike | None = None, margin: float = 0.2, align: bool = True,
                   batch_size: int = 32, max_faces: int | None = None, min_face: int = 24,
                   threads: int | None = None, score_threshold: float | None = None,
                   trust_checkpoint: bool = False) -> Predictor:
    """Load a dnfer checkpoint (``.pt``), exported ONNX or TorchScript model for prediction.

    Args:
        path: the model file; the format is recognised from its content/extension.
        device: ``cpu``/``cuda``/``auto`` for checkpoints and TorchScript (ONNX runs on onnxruntime's CPU provider).
        detector: ``auto`` (default: ``mtcnn`` if facenet-pytorch is installed, else ``haar`` with a
            warning when it is first used), ``mtcnn``, ``haar`` or ``yunet`` (then ``yunet_model`` is the YuNet ONNX file).
        score_threshold: minimum detector confidence (None: MTCNN 0.9, YuNet 0.7).
        margin, align, batch_size, max_faces: see :class:`Predictor`.
        min_face: smallest face side in px the detector reports.
        threads: onnxruntime intra-op threads (None: its default).
        trust_checkpoint: allow TorchScript archives (they hold code) and checkpoints that need
            arbitrary unpickling. Unsafe: only for files whose origin you trust.

    Raises:
        PredictorError / CheckpointError / ConfigError: with one sentence naming the file.
    """
    from dnfer.engine.device import resolve_device

    p = Path(path)
    if not p.is_file():
        raise PredictorError(f"model file {str(p)!r} does not exist")
    detector, note = resolve_detector(detector)

    def build_detector() -> Detector:
        return make_detector(detector, yunet_model=yunet_model, min_size=min_face, score_threshold=score_threshold)

    # Built on first use (--no-detect runs never need one); YuNet now, to report a bad model file at once.
    det = build_detector() if detector == "yunet" else None
    kw: dict[str, Any] = dict(detector=det, margin=margin, align=align, batch_size=batch_size, max_faces=max_faces,
                              detector_factory=build_detector, detector_note=note)
    if p.suffix.lower() == ".onnx":
        backend, meta = _onnx_backend(p, threads)
        if "dnfer" not in meta:
            raise PredictorError(f"{str(p)!r} has no dnfer metadata: export it with `dnfer export --format onnx`")
        info = ModelInfo.from_metadata(json.loads(meta["dnfer"]), "onnx", str(p))
        return Predictor(backend, info, **kw)
    dev = resolve_device(device)
    if is_torchscript(p):
        if not trust_checkpoint:
            raise PredictorError(f"{str(p)!r} is a TorchScript archive, which holds code that loading it runs, so "
                                 f"dnfer refuses it; use the ONNX export or the .pt checkpoint, or, {TRUST_HINT}")
        extra = {"dnfer.json": ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
                module = torch.jit.load(str(p), map_location=dev, _extra_files=extra)
        except Exception as e:  # torch.jit raises RuntimeError and others for bad archives
            raise PredictorError(f"{str(p)!r} is not a loadable TorchScript file ({str(e).strip()[:200]})") from None
        if not extra["dnfer.json"]:
            raise PredictorError(f"{str(p)!r} has no dnfer metadata: export it with `dnfer export --format torchscript`")
        info = ModelInfo.from_metadata(json.loads(extra["dnfer.json"]), "torchscript", str(p))
        return Predictor(_torch_backend(module, dev), info, module=module, **kw)
    model, info = model_from_checkpoint(load_checkpoint(p, trust=trust_checkpoint))
    model.to(dev)
    return Predictor(_torch_backend(model, dev), info, module=model, **kw)
