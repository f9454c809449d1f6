"""dnfer_plus, the default method: DNFER with one option default changed, nothing else."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.conftest import FixedLogits, tiny_config

from dnfer.config import Config
from dnfer.engine.trainer import fit
from dnfer.methods.base import StepContext, TrainBatch
from dnfer.methods.dnfer import DNFER, DNFERParams
from dnfer.methods.dnfer_plus import DNFERPlus, DNFERPlusParams
from dnfer.registry import METHODS


def test_defaults_differ_from_the_paper_in_exactly_the_documented_options() -> None:
    paper, plus = dataclasses.asdict(DNFERParams()), dataclasses.asdict(DNFERPlusParams())
    changed = {k: (paper[k], plus[k]) for k in paper if paper[k] != plus[k]}
    assert changed == {"consistency_grad": ("both", "strong")}
    assert set(paper) == set(plus)


def test_default_method_is_dnfer_plus_and_dnfer_stays_the_paper() -> None:
    assert Config().method.name == "dnfer_plus"
    assert METHODS.get("dnfer_plus") is DNFERPlus and METHODS.get("dnfer").Params is DNFERParams
    assert "--method dnfer" in DNFERPlus.title and "as published" in DNFER.title


@pytest.mark.parametrize("epoch", [0, 3])  # warm-up, then selection
def test_a_step_equals_dnfer_with_the_option(epoch: int) -> None:
    torch.manual_seed(7)
    logits = torch.randn(16, 4) * 2
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])

    batch = TrainBatch({"weak": torch.zeros(8, 3, 4, 4), "strong": torch.zeros(8, 3, 4, 4)}, y, torch.arange(8))
    results = []
    for method in (DNFERPlus(num_classes=4, num_train=8, params=DNFERPlusParams(warmup_epochs=2)),
                   DNFER(num_classes=4, num_train=8,
                         params=DNFERParams(warmup_epochs=2, consistency_grad="strong"))):
        model = FixedLogits(logits)
        out = method.training_step(model, batch, StepContext(epoch=epoch))
        out.loss.backward()
        results.append((out.loss.item(), out.selected.tolist(), model.logits.grad.clone()))
    (la, sa, ga), (lb, sb, gb) = results
    assert la == lb and sa == sb and torch.equal(ga, gb)
    # the paper's method: the same loss value (the options change only where the gradient flows)
    # but a different gradient once the consistency term is on
    paper, model = DNFER(num_classes=4, num_train=8, params=DNFERParams(warmup_epochs=2)), FixedLogits(logits)
    out = paper.training_step(model, batch, StepContext(epoch=epoch))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(la, rel=1e-6)
    assert torch.equal(model.logits.grad, ga) == (epoch < 2)  # identical in the warm-up (CE only)


def test_fit_with_the_default_method_names_it_and_the_paper(tmp_path) -> None:
    cfg = tiny_config(str(tmp_path / "run"), epochs=2)
    assert cfg.method.name == "dnfer_plus"
    cfg.method.params = {"warmup_epochs": 1}
    summary = fit(cfg, log=lambda m: None)
    assert summary["method"] == "dnfer_plus" and "--method dnfer" in summary["method_title"]
    assert 0.0 <= summary["selection_precision"] <= 1.0
