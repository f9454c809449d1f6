"""Inference: face detection, prediction on photos/folders/videos, export to ONNX/TorchScript.

``dnfer.load_predictor(path)`` is the entry point; see :mod:`dnfer.inference.predictor`.
The names below are imported on first use, so that torch-free submodules
(:mod:`dnfer.inference.video`, :mod:`dnfer.inference.track`) load without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FacePrediction", "Prediction", "Predictor", "load_predictor"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dnfer.inference import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'dnfer.inference' has no attribute {name!r}")
