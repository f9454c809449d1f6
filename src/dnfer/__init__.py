"""dnfer: noise-robust facial expression recognition.

Library entry points (docs/api.md): :func:`dnfer.engine.trainer.fit`,
:func:`dnfer.data.noise.apply_noise`, :func:`dnfer.models.create_model`, the DNFER loss pieces
in :mod:`dnfer.methods.dnfer`, :func:`dnfer.analysis.audit.audit_scores`, and
:func:`load_predictor` for inference.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dnfer.inference.predictor import Predictor

__version__ = "0.1.0"


def load_predictor(path: str | os.PathLike, *, device: str = "cpu", detector: str = "auto",
                   yunet_model: str | os.PathLike | None = None, margin: float = 0.2, align: bool = True,
                   batch_size: int = 32, max_faces: int | None = None, min_face: int = 24,
                   threads: int | None = None, score_threshold: float | None = None,
                   trust_checkpoint: bool = False) -> Predictor:
    """Load a dnfer checkpoint (``.pt``), exported ONNX or TorchScript model for prediction.

    The same function as :func:`dnfer.inference.predictor.load_predictor` (its docstring details
    every argument), importable without loading torch until it is called.

    Args:
        path: the model file; the format is recognised from its content/extension.
        device: ``cpu``/``cuda``/``auto`` for checkpoints and TorchScript (ONNX runs on CPU).
        detector: ``auto`` (default: ``mtcnn`` if facenet-pytorch is installed, else ``haar``),
            ``mtcnn``, ``haar`` or ``yunet`` (then ``yunet_model`` is the YuNet ONNX file).
        margin: share of the face box added on each side before cropping.
        align: crop by 5-point alignment when the detector gives landmarks (MTCNN, YuNet).
        batch_size: faces per model call.
        max_faces: keep at most this many (largest) faces per image; None = all.
        min_face: smallest face side in px the detector reports.
        threads: onnxruntime intra-op threads (None: its default).
        score_threshold: minimum detector confidence (None: MTCNN 0.9, YuNet 0.7).
        trust_checkpoint: allow TorchScript archives and checkpoints that need arbitrary
            unpickling (they can run code). Unsafe: only for files whose origin you trust.

    Returns:
        a :class:`~dnfer.inference.predictor.Predictor`: ``predict(images)`` gives one
        ``Prediction`` per image (faces with box, label, confidence, probabilities);
        ``predict_crops(uint8 (N, H, W, 3) RGB crops)`` gives float32 ``(N, K)`` probabilities.
    """
    from dnfer.inference.predictor import load_predictor as _load

    return _load(path, device=device, detector=detector, yunet_model=yunet_model, margin=margin, align=align,
                 batch_size=batch_size, max_faces=max_faces, min_face=min_face, threads=threads,
                 score_threshold=score_threshold, trust_checkpoint=trust_checkpoint)
