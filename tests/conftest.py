"""Shared fixtures: tiny, fast training configs on the embedded synthetic set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dnfer.config import Config

# Keep generated synthetic data inside the test session, not the user's cache.
os.environ.setdefault("DNFER_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "dnfer-test-cache"))
# Tests never download weights; the download tests turn this off and serve files from 127.0.0.1.
os.environ["DNFER_OFFLINE"] = "1"


def tiny_config(out: str, **train: object) -> Config:
    """A config that trains tiny_cnn on 16-px synthetic faces in about a second per epoch."""
    cfg = Config()
    cfg.data.options = {"n_train": "96", "n_test": "32"}
    cfg.data.image_size = 16
    cfg.data.noise = "symmetric:0.3"
    cfg.model.name = "tiny_cnn"
    cfg.method.params = {"warmup_epochs": 1}
    cfg.train.epochs = 2
    cfg.train.batch_size = 16
    cfg.train.eval_batch_size = 64
    cfg.train.precision = "fp32"
    cfg.train.threads = 1
    cfg.train.progress = False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    if cfg.train.epochs <= 1:  # DNFER's warm-up must leave an epoch that selects (Config.validate)
        cfg.method.params = {"warmup_epochs": 0}
    cfg.out = out
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    return tiny_config(str(tmp_path / "run"))


#: A learnable control set: each class a hue plus pixel noise (a tiny CNN learns it in 2 epochs).
COLOUR_CLASSES = {"happiness": (220, 60, 60), "sadness": (60, 60, 220), "anger": (60, 200, 60),
                  "neutral": (200, 200, 60)}


def make_colour_dataset(root: Path, per_class: int, size: int = 16, seed: int = 0) -> Path:
    """``root/<class>/*.png`` for the ``folder`` adapter."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, rgb in COLOUR_CLASSES.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.array(rgb, float)[None, None] * rng.uniform(0.7, 1.0) + rng.normal(0, 20, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{name}_{i:03d}.png")
    return root


def colour_run_config(data: Path, out: Path, *, epochs: int) -> Config:
    """DNFER at 30% symmetric noise on the colour set: tiny_cnn, 16 px, fp32, one thread."""
    cfg = Config()
    cfg.data.spec = f"folder:{data}"
    cfg.data.image_size = 16
    cfg.data.noise = "symmetric:0.3"
    cfg.model.name = "tiny_cnn"
    cfg.method.params = {"warmup_epochs": 1 if epochs > 1 else 0}
    cfg.train.epochs = epochs
    cfg.train.batch_size = 32
    cfg.train.precision = "fp32"
    cfg.train.threads = 1  # 2 threads spin against other jobs on a shared 2-core machine
    cfg.train.progress = False
    cfg.out = str(out)
    return cfg


class FixedLogits(torch.nn.Module):
    """A "model" that returns preset logits ``(N, K)`` for the first ``N`` rows of its input,
    ignoring pixels: methods' steps tested against hand-computed losses (the concatenated
    (weak; strong) batch of a two-view method takes all ``N``). The logits are a parameter, so
    their gradient can be checked."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: x.shape[0]]
