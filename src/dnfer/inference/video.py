"""Video sampling default, drawing, and annotated-video output (``dnfer predict --video-out``).

An annotated video has every frame of the source at the source's frame rate and size. Faces
are detected and classified on the sampled frames only (every ``every``-th frame, the same
sampling as the JSON/CSV output); the frames in between carry the boxes, labels and track ids
of the last sampled frame, so a box can lag a fast-moving face by up to ``every - 1`` frames.
Each sampled frame covers itself and the ``every - 1`` frames after it: with ``max_frames``
the video stops there, not at the end of the source.

The sampling default :data:`VIDEO_EVERY` is defined in :mod:`dnfer.inference.options`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dnfer.errors import ConfigError
from dnfer.inference.options import VIDEO_EVERY

__all__ = ["VIDEO_EVERY", "VideoAnnotator", "check_video_out", "draw_faces"]

#: Box colours (BGR) by track id, so a face keeps its colour through the video.
_PALETTE = ((0, 220, 0), (0, 165, 255), (255, 120, 0), (200, 0, 200), (0, 220, 220), (60, 60, 255), (255, 255, 0))


def draw_faces(bgr: np.ndarray, faces: Sequence[Any], *, no_face_text: str | None = "no face") -> np.ndarray:
    """Draw each face's box and ``[#track] label confidence`` on ``bgr`` uint8 ``(H, W, 3)`` in place.

    ``faces``: :class:`~dnfer.inference.predictor.FacePrediction` objects (``box``, ``label``,
    ``confidence``, ``track_id``). Without faces, ``no_face_text`` is written at the top left.
    """
    import cv2

    h, w = bgr.shape[:2]
    thick = max(1, round(max(h, w) / 400))
    scale = max(0.35, max(h, w) / 1200)
    items: list[tuple[Any, str, tuple[int, int, int] | None]] = []
    for f in faces:
        tid = getattr(f, "track_id", None)
        prefix = f"#{tid} " if tid is not None else ""
        items.append((f.box, f"{prefix}{f.label} {f.confidence:.2f}", _PALETTE[((tid or 1) - 1) % len(_PALETTE)]))
    if not items and no_face_text:
        items.append(((0, 0, w, h), no_face_text, None))
    for (x, y, bw, bh), text, colour in items:
        p0, p1 = (int(round(x)), int(round(y))), (int(round(x + bw)) - 1, int(round(y + bh)) - 1)
        if colour is not None:
            cv2.rectangle(bgr, p0, p1, colour, thick)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        ty = p0[1] - 4 if p0[1] - th - base - 4 >= 0 else p0[1] + th + 4  # above the box, or inside at the top
        cv2.rectangle(bgr, (p0[0], ty - th - 2), (p0[0] + tw + 2, ty + base), (0, 0, 0), -1)
        cv2.putText(bgr, text, (p0[0] + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return bgr


def check_video_out(dst: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> Path:
    """``dst`` as a Path, after checking it is an ``.mp4`` name that is not one of ``inputs``."""
    out = Path(dst)
    if out.suffix.lower() != ".mp4":
        raise ConfigError(f"--video-out {str(out)!r}: the annotated video is written as mp4; name it *.mp4")
    for src in inputs:
        if os.path.exists(src) and os.path.exists(out) and os.path.samefile(src, out):
            raise ConfigError(f"--video-out {str(out)!r} is an input file; choose another output name")
    return out


class VideoAnnotator:
    """Writes the annotated copy of one video from its sampled-frame predictions.

    Feed the :class:`~dnfer.inference.predictor.Prediction` of each sampled frame in frame
    order with :meth:`add`; :meth:`close` writes the frames after the last one and moves the
    finished file into place (written to a temporary name in the same folder, then
    ``os.replace``: an interrupted run never leaves a half-written ``dst``). :meth:`abort`
    removes the temporary file.

    Args:
        src: the video file (read a second time, frame by frame, for the frames to draw on).
        dst: the ``.mp4`` to write (codec ``mp4v``), same size and frame rate as ``src``.
        every: the sampling step the predictions were made with.
    """

    def __init__(self, src: str | os.PathLike, dst: str | os.PathLike, every: int) -> None:
        import cv2

        self.src, self.dst, self.every = str(src), check_video_out(dst, [src]), every
        self._cap = cv2.VideoCapture(self.src)
        if not self._cap.isOpened():
            raise ConfigError(f"--video-out: OpenCV cannot open {self.src!r}")
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if np.isfinite(fps) and fps > 0 else 25.0  # containers without a rate: a common one
        w, h = int(self._cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(self._cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        self.size = (w, h)
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        # The temporary name keeps the .mp4 suffix: OpenCV picks the container from it.
        self._tmp = self.dst.with_name(f".{self.dst.stem}.{os.getpid()}.tmp.mp4")
        self._writer = cv2.VideoWriter(str(self._tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
        if not self._writer.isOpened():
            self._cap.release()
            raise ConfigError(f"--video-out {str(self.dst)!r}: OpenCV cannot write an mp4v video there")
        self._next = 0  # index of the next source frame to write
        self._faces: list[Any] = []  # annotations carried onto the frames until the next sampled one
        self._last_sampled: int | None = None
        self.frames_written = 0

    def _write_until(self, stop: int | None) -> None:
        """Write source frames ``_next .. stop - 1`` (to the end if None) with the carried faces."""
        while stop is None or self._next < stop:
            ok, frame = self._cap.read()
            if not ok:
                return
            self._writer.write(draw_faces(frame, self._faces, no_face_text=None))
            self._next += 1
            self.frames_written += 1

    def add(self, pred: Any) -> None:
        """The prediction of sampled frame ``pred.frame`` (frames must come in increasing order)."""
        if pred.frame is None or pred.error is not None:
            return
        self._write_until(pred.frame)
        self._faces = list(pred.faces)
        self._last_sampled = pred.frame
        self._write_until(pred.frame + 1)

    def close(self) -> Path:
        """Finish the video (the frames the last sampled frame covers) and move it to ``dst``."""
        if self._last_sampled is not None:
            self._write_until(self._last_sampled + self.every)
        self._cap.release()
        self._writer.release()
        if self.frames_written == 0:
            self._tmp.unlink(missing_ok=True)
            raise ConfigError(f"--video-out: no frame of {self.src!r} could be read")
        os.replace(self._tmp, self.dst)
        return self.dst

    def abort(self) -> None:
        self._cap.release()
        self._writer.release()
        self._tmp.unlink(missing_ok=True)
