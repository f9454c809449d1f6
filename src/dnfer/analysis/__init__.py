"""Diagnostics of a training run: label audit, HTML report, TensorBoard logging."""
