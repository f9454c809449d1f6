"""Every registered method builds through the trainer and takes one real training step."""

from __future__ import annotations

import pytest
import torch

from dnfer.config import Config
from dnfer.engine.build import build_optimizer
from dnfer.engine.trainer import build_method
from dnfer.errors import ConfigError
from dnfer.methods.base import StepContext, TrainBatch
from dnfer.models.factory import create_model
from dnfer.registry import METHODS

EXPECTED = {"ce", "dnfer", "scn", "rul", "eac", "coteaching", "gce", "sce"}


def test_peer_methods_are_registered() -> None:
    assert EXPECTED <= set(METHODS.names())


def _config(name: str) -> Config:
    cfg = Config()
    cfg.method.name = name
    if name == "dnfer":
        cfg.method.params = {"warmup_epochs": 1}
    if METHODS.get(name).needs_noise_rate:
        cfg.method.noise_rate = 0.3
    if name == "scn":
        cfg.method.params = {"relabel_epoch": 1}
    return cfg


@pytest.mark.parametrize("name", METHODS.names())
@pytest.mark.parametrize("epoch", [0, 12])  # before and after warm-up / relabel / forget ramp
def test_one_training_step(name: str, epoch: int) -> None:
    torch.manual_seed(0)
    b, k = 8, 7
    model = create_model("tiny_cnn", k, image_size=16)
    cfg = _config(name)
    method = build_method(cfg, k, 32)
    method.setup(model)
    opt = build_optimizer(cfg, model, method)
    batch = TrainBatch({v: torch.randn(b, 3, 16, 16) for v in method.views}, torch.randint(0, k, (b,)),
                       torch.randint(0, 32, (b,)))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = method.training_step(model, batch, StepContext(epoch=epoch, num_epochs=20))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.logits.shape == (b, k) and not out.logits.requires_grad
    if method.selection_views:
        assert out.selected is not None and out.selected.dtype == torch.bool
        assert out.selected.shape == (b, len(method.selection_views))
    else:
        assert out.selected is None
    for v in out.stats.values():
        assert not v.requires_grad and torch.isfinite(v).all()
    opt.zero_grad()
    out.loss.backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "no gradient reached the backbone"
    # every optimised parameter (model, method heads, co-teaching's peer) takes part in the loss
    missing = [i for i, g in enumerate(opt.param_groups) for p in g["params"] if p.grad is None]
    assert not missing, f"parameters without gradient in groups {sorted(set(missing))}"
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_noise_rate_demanded_by_trainer() -> None:
    cfg = Config()
    cfg.method.name = "coteaching"
    with pytest.raises(ConfigError, match="--noise-rate"):
        build_method(cfg, 7, 10)


def test_unknown_method_option_is_named() -> None:
    cfg = Config()
    cfg.method.name = "gce"
    cfg.method.params = {"qq": 0.5}
    with pytest.raises(ConfigError, match="'qq'.*q"):
        build_method(cfg, 7, 10)
