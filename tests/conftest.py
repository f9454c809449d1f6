"""Shared fixtures: tiny, fast training configs on the embedded synthetic set."""

from __future__ import annotations

import os

import pytest

from dnfer.config import Config

# Keep generated synthetic data inside the test session, not the user's cache.
os.environ.setdefault("DNFER_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "dnfer-test-cache"))


def tiny_config(out: str, **train: object) -> Config:
    """A config that trains tiny_cnn on 16-px synthetic faces in about a second per epoch."""
    cfg = Config()
    cfg.data.options = {"n_train": "96", "n_test": "32"}
    cfg.data.image_size = 16
    cfg.data.noise = "symmetric:0.3"
    cfg.model.name = "tiny_cnn"
    cfg.method.warmup_epochs = 1
    cfg.train.epochs = 2
    cfg.train.batch_size = 16
    cfg.train.eval_batch_size = 64
    cfg.train.precision = "fp32"
    cfg.train.threads = 1
    cfg.train.progress = False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    cfg.out = out
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    return tiny_config(str(tmp_path / "run"))
