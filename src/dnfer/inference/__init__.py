"""Inference: face detection, prediction on photos/folders/videos, export to ONNX/TorchScript.

``dnfer.load_predictor(path)`` is the entry point; see :mod:`dnfer.inference.predictor`.
"""

from dnfer.inference.predictor import FacePrediction, Prediction, Predictor, load_predictor

__all__ = ["FacePrediction", "Prediction", "Predictor", "load_predictor"]
