"""Datasets, label noise, augmentations and the prepared cache."""
