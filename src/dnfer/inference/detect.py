"""Face detection and face cropping for inference.

Three detectors:

- :class:`MTCNNDetector` (default when installed): the MTCNN cascade of ``facenet-pytorch``
  (the ``detect`` extra), whose weights (2 MB, ``pnet/rnet/onet.pt`` state dicts) ship inside
  the package, so nothing is downloaded. Gives a confidence in [0, 1] and 5 landmarks in the
  order :func:`aligned_crop` expects; far fewer false boxes than Haar (docs/inference.md).
- :class:`HaarDetector` (fallback, no extra dependency): OpenCV's frontal-face Haar cascade, shipped inside
  ``opencv-python-headless`` 4.x (``cv2.data.haarcascades``; 5.x drops it, hence the ``<5`` pin).
  Fast, no model file, upright frontal faces only; its score is the number of neighbouring
  raw detections (a vote count, not a probability).
- :class:`YuNetDetector`: ``cv2.FaceDetectorYN`` with the user's YuNet ONNX file (OpenCV Zoo's
  ``face_detection_yunet_2023mar.onnx``). Gives a confidence and 5 landmarks (eyes, nose tip,
  mouth corners), which :func:`aligned_crop` uses to rotate/scale the face onto a canonical
  template before the model sees it.

Crops are made to match training: training images are decoded by
:func:`dnfer.data.decode.decode_image` (crop the box, clipped to the image, then a bilinear,
antialiased PIL resize to the square input size), and :func:`box_crop` calls exactly that.
Large images are detected on a downscaled copy (``detect_max_side``) — the cascade's cost grows
with the pixel count — and boxes are mapped back to full resolution for cropping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from PIL import Image

from dnfer.data.decode import RESAMPLE, decode_image
from dnfer.errors import ConfigError
from dnfer.inference.options import DETECTORS, MTCNN_SCORE_THRESHOLD, YUNET_SCORE_THRESHOLD
from dnfer.io_safety import not_a_file_text

#: 5-point template (right eye, left eye, nose tip, right and left mouth corner as seen in the
#: image, i.e. image-left first) of the common 112x112 ArcFace alignment, in units of the crop
#: side. YuNet returns its landmarks in the same order.
TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
) / 112.0


@dataclass(frozen=True)
class FaceBox:
    """One detected face in source-image pixels.

    Attributes:
        box: ``(x, y, w, h)``, top-left corner and size.
        score: detector confidence (MTCNN, YuNet: [0, 1]; Haar: neighbour vote count; None if unknown).
        landmarks: ``(5, 2)`` points ``(x, y)`` (MTCNN, YuNet), else None.
    """

    box: tuple[float, float, float, float]
    score: float | None = None
    landmarks: tuple[tuple[float, float], ...] | None = None


class Detector(Protocol):
    """Anything with ``detect(rgb uint8 (H, W, 3)) -> list[FaceBox]`` (largest face first)."""

    name: str

    def detect(self, rgb: np.ndarray) -> list[FaceBox]: ...


def _downscale(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Shrink so the longer side is at most ``max_side``; returns the image and the factor applied."""
    h, w = rgb.shape[:2]
    f = min(1.0, max_side / max(h, w))
    if f >= 1.0:
        return rgb, 1.0
    small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    return small, f


class HaarDetector:
    """OpenCV's ``haarcascade_frontalface_default.xml``.

    Args:
        min_size: smallest face side in px (of the full-resolution image).
        scale_factor, min_neighbors: :meth:`cv2.CascadeClassifier.detectMultiScale` settings.
        detect_max_side: images are searched at most at this size (faster on large photos).
    """

    name = "haar"

    def __init__(self, *, min_size: int = 24, scale_factor: float = 1.1, min_neighbors: int = 5,
                 detect_max_side: int = 1280, cascade: str = "haarcascade_frontalface_default.xml") -> None:
        data_dir = getattr(getattr(cv2, "data", None), "haarcascades", None)
        if not data_dir or not (Path(data_dir) / cascade).is_file():
            raise ConfigError(
                f"the OpenCV Haar cascade {cascade!r} is not installed (it ships with opencv-python-headless<5); "
                "reinstall dnfer's pinned OpenCV, or pass --yunet MODEL.onnx or --no-detect"
            )
        self._cascade = cv2.CascadeClassifier(str(Path(data_dir) / cascade))
        if self._cascade.empty():
            raise ConfigError(f"OpenCV could not load the Haar cascade {cascade!r}")
        self.min_size = min_size
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.detect_max_side = detect_max_side

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        small, f = _downscale(rgb, self.detect_max_side)
        gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
        m = max(1, int(round(self.min_size * f)))
        boxes, votes = self._cascade.detectMultiScale2(
            gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(m, m)
        )
        faces = [
            FaceBox(box=(float(x) / f, float(y) / f, float(w) / f, float(h) / f), score=float(v))
            for (x, y, w, h), v in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(votes).reshape(-1), strict=True)
        ]
        return sorted(faces, key=lambda b: -b.box[2] * b.box[3])


class YuNetDetector:
    """``cv2.FaceDetectorYN`` with a YuNet ONNX model file supplied by the user.

    Args:
        model_path: the YuNet ``.onnx`` file (e.g. OpenCV Zoo's ``face_detection_yunet_2023mar.onnx``).
        score_threshold: minimum face confidence.
        nms_threshold: non-maximum suppression IoU.
        detect_max_side: images are searched at most at this size.
    """

    name = "yunet"

    def __init__(self, model_path: str | Path, *, score_threshold: float = 0.7, nms_threshold: float = 0.3,
                 top_k: int = 5000, detect_max_side: int = 1280, min_size: int = 0) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise ConfigError(f"--yunet {str(path)!r} {not_a_file_text(path)} (download face_detection_yunet_2023mar.onnx "
                              "from the OpenCV Zoo and pass its path)")
        if not hasattr(cv2, "FaceDetectorYN"):
            raise ConfigError("this OpenCV build has no cv2.FaceDetectorYN (needs OpenCV >= 4.5.4); use the Haar default")
        try:
            self._det = cv2.FaceDetectorYN.create(str(path), "", (320, 320), score_threshold, nms_threshold, top_k)
        except cv2.error as e:
            raise ConfigError(f"--yunet {str(path)!r} is not a YuNet model OpenCV can load ({str(e).strip()[:120]})") from None
        self.detect_max_side = detect_max_side
        self.min_size = min_size

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        small, f = _downscale(rgb, self.detect_max_side)
        h, w = small.shape[:2]
        self._det.setInputSize((w, h))
        _, rows = self._det.detect(cv2.cvtColor(small, cv2.COLOR_RGB2BGR))  # YuNet expects BGR
        faces = []
        for r in np.zeros((0, 15)) if rows is None else rows:
            x, y, bw, bh = (float(v) / f for v in r[:4])
            if min(bw, bh) < self.min_size:
                continue
            pts = tuple((float(r[4 + 2 * i]) / f, float(r[5 + 2 * i]) / f) for i in range(5))
            faces.append(FaceBox(box=(x, y, bw, bh), score=float(r[14]), landmarks=pts))
        return sorted(faces, key=lambda b: -b.box[2] * b.box[3])


class MTCNNDetector:
    """MTCNN from ``facenet-pytorch`` (weights inside the package), run on the CPU.

    Args:
        min_size: smallest face side in px (of the full-resolution image).
        score_threshold: minimum final-stage face probability (MTCNN's own last-stage cut is 0.7).
        detect_max_side: images are searched at most at this size.

    Raises:
        ConfigError: ``facenet-pytorch`` is not installed.
    """

    name = "mtcnn"

    def __init__(self, *, min_size: int = 24, score_threshold: float = MTCNN_SCORE_THRESHOLD,
                 detect_max_side: int = 1280) -> None:
        try:
            from facenet_pytorch import MTCNN
        except ImportError as e:
            raise ConfigError(f"the mtcnn detector needs facenet-pytorch ({e}): pip install 'dnfer[detect]', "
                              "or use --detector haar") from None
        self._mtcnn_cls = MTCNN
        self.min_size = min_size
        self.score_threshold = score_threshold
        self.detect_max_side = detect_max_side
        self._nets: dict[int, object] = {}  # one MTCNN per searched minimum face size (downscale factor)

    def _net(self, min_face: int) -> object:
        if min_face not in self._nets:
            # Stage thresholds stay MTCNN's defaults; keep_all: every face, not only the best one.
            self._nets[min_face] = self._mtcnn_cls(keep_all=True, min_face_size=min_face, device="cpu")
        return self._nets[min_face]

    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        small, f = _downscale(rgb, self.detect_max_side)
        # MTCNN's smallest face is 12 px (its first-stage window); below that the scale pyramid is invalid.
        min_face = max(12, int(round(self.min_size * f)))
        if min(small.shape[:2]) < min_face:  # no face fits (and facenet's empty scale pyramid would raise)
            return []
        net = self._net(min_face)
        boxes, probs, points = net.detect(np.ascontiguousarray(small), landmarks=True)  # type: ignore[attr-defined]
        faces = []
        for b, p, pts in zip(boxes if boxes is not None else [], probs if boxes is not None else [],
                             points if boxes is not None else [], strict=True):
            x0, y0, x1, y1 = (float(v) / f for v in b)
            if p is None or float(p) < self.score_threshold or min(x1 - x0, y1 - y0) < self.min_size:
                continue
            lm = tuple((float(px) / f, float(py) / f) for px, py in np.asarray(pts).reshape(5, 2))
            faces.append(FaceBox(box=(x0, y0, x1 - x0, y1 - y0), score=float(p), landmarks=lm))
        return sorted(faces, key=lambda b: -b.box[2] * b.box[3])


def expand_box(box: tuple[float, float, float, float], margin: float) -> tuple[float, float, float, float]:
    """Square box around ``box``'s centre, side ``max(w, h) * (1 + 2 * margin)``.

    ``margin`` is the share of the face size added on each side (detector boxes are tighter
    than the face crops FER datasets are made of). Square because the model input is square:
    a non-square crop would be stretched.
    """
    x, y, w, h = box
    side = max(w, h) * (1.0 + 2.0 * margin)
    cx, cy = x + w / 2.0, y + h / 2.0
    return (cx - side / 2.0, cy - side / 2.0, side, side)


def box_crop(rgb: np.ndarray, box: tuple[float, float, float, float], size: int, margin: float) -> np.ndarray:
    """Crop ``box`` (expanded by ``margin``, clipped to the image) and resize to uint8 ``(size, size, 3)``.

    Uses :func:`dnfer.data.decode.decode_image`, the training decoder, so the crop/resize is
    the one the training images went through.
    """
    return decode_image(rgb, size=size, box=expand_box(box, margin))


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping ``src`` to ``dst``.

    Args:
        src, dst: ``(N, 2)`` point sets, N >= 2.

    Returns:
        ``(2, 3)`` float64 affine matrix ``M`` with ``dst ~ M @ [x, y, 1]``.

    Umeyama's closed form without reflection, written out (a few lines) rather than
    ``cv2.estimateAffinePartial2D``, whose RANSAC default can drop one of only 5 points.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0
    rot = u @ np.diag(d) @ vt
    var_s = (s0**2).sum() / len(src)
    scale = float((sig * d).sum() / var_s) if var_s > 0 else 1.0
    m = np.zeros((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def aligned_crop(rgb: np.ndarray, landmarks: np.ndarray, size: int, margin: float) -> np.ndarray:
    """Warp the face so its 5 landmarks land on :data:`TEMPLATE_112` (shrunk by ``margin``).

    The warp is done at the face's own resolution (at least ``size``), then resized to
    ``size`` with the training resize filter, so large faces are antialiased like training
    images rather than point-sampled by ``warpAffine``.

    Args:
        rgb: uint8 ``(H, W, 3)``.
        landmarks: ``(5, 2)`` points in the YuNet/ArcFace order.

    Returns:
        uint8 ``(size, size, 3)``.
    """
    lm = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    # Template side in px at which the face keeps its native scale (inter-ocular distance).
    eye_px = float(np.linalg.norm(lm[1] - lm[0]))
    eye_t = float(np.linalg.norm(TEMPLATE_112[1] - TEMPLATE_112[0]))
    work = int(np.clip(round(eye_px / eye_t * (1.0 + 2.0 * margin)), size, 4 * size))
    template = (0.5 + (TEMPLATE_112 - 0.5) / (1.0 + 2.0 * margin)) * work
    m = similarity_transform(lm, template)
    warped = cv2.warpAffine(rgb, m, (work, work), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if work == size:
        return warped
    return np.asarray(Image.fromarray(warped).resize((size, size), RESAMPLE), dtype=np.uint8)


def mtcnn_available() -> bool:
    """True if ``facenet-pytorch`` (the MTCNN detector) can be imported."""
    try:
        import facenet_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_detector(kind: str) -> tuple[str, str | None]:
    """``auto`` -> ``mtcnn`` if facenet-pytorch is installed, else ``haar`` plus a one-line note.

    Returns ``(kind, note)``; the note is None unless ``auto`` had to fall back to Haar.
    """
    if kind not in DETECTORS:
        raise ConfigError(f"unknown detector {kind!r}: valid are {', '.join(DETECTORS)} (or --no-detect)")
    if kind != "auto":
        return kind, None
    if mtcnn_available():
        return "mtcnn", None
    return "haar", ("facenet-pytorch is not installed, so faces are found with OpenCV's Haar cascade "
                    "(more false and missed faces); pip install 'dnfer[detect]' for MTCNN")


def make_detector(kind: str = "haar", *, yunet_model: str | Path | None = None, min_size: int = 24,
                  detect_max_side: int = 1280, score_threshold: float | None = None) -> Detector:
    """``haar``, ``mtcnn``, ``yunet`` (needs ``yunet_model``) or ``auto`` (:func:`resolve_detector`).

    ``score_threshold`` None: the detector's own default (MTCNN 0.9, YuNet 0.7; Haar has none).
    """
    kind, _ = resolve_detector(kind)
    if kind == "haar":
        return HaarDetector(min_size=min_size, detect_max_side=detect_max_side)
    if kind == "mtcnn":
        return MTCNNDetector(min_size=min_size, detect_max_side=detect_max_side,
                             score_threshold=MTCNN_SCORE_THRESHOLD if score_threshold is None else score_threshold)
    if yunet_model is None:
        raise ConfigError("the yunet detector needs its ONNX model: pass --yunet MODEL.onnx")
    return YuNetDetector(yunet_model, score_threshold=YUNET_SCORE_THRESHOLD if score_threshold is None else score_threshold,
                         detect_max_side=detect_max_side, min_size=min_size)
