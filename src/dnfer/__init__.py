"""dnfer: noise-robust facial expression recognition.

Library entry points: :func:`dnfer.engine.trainer.fit`, :func:`dnfer.data.noise.apply_noise`,
:func:`dnfer.models.create_model`, and :func:`load_predictor` for inference.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_predictor(path: str, **kwargs: Any) -> Any:
    """Load a trained checkpoint (or exported ONNX model) for inference; see dnfer.inference."""
    from dnfer.inference.predictor import load_predictor as _load

    return _load(path, **kwargs)
