"""DNFER's optional variants (``sup_loss``, ``selection``, ``top_ratio``, ``elr_lambda``, ``relabel_threshold``) against
hand-computed tensors; their defaults are the paper's method (docs/methods.md)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import FixedLogits, tiny_config

from dnfer.engine.trainer import fit
from dnfer.errors import ConfigError
from dnfer.methods.base import StepContext, TrainBatch
from dnfer.methods.dnfer import (
    DNFER,
    DNFERParams,
    combine_masks,
    consistency_loss,
    elr_loss,
    elr_targets_update,
    make_sup_loss,
    relabel_loss,
    select_clean,
    select_top_ratio,
    supervised_loss,
)
from dnfer.methods.gce import gce_loss
from dnfer.methods.sce import sce_loss


def test_defaults_are_the_paper() -> None:
    p = DNFERParams()
    assert (p.sup_loss, p.sup_loss_params, p.selection, p.top_ratio, p.relabel_threshold) == (
        "ce", {}, "independent", None, None)


def test_sup_loss_gce_is_gce_on_selected_rows() -> None:
    z, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1])
    mask = torch.tensor([True, False, True, True, False])
    got = supervised_loss(z, y, mask, loss_fn=make_sup_loss("gce", {"q": 0.5}))
    assert got.item() == pytest.approx(gce_loss(z[mask], y[mask], 0.5).mean().item(), rel=1e-6)
    default_q = supervised_loss(z, y, mask, loss_fn=make_sup_loss("gce", {}))
    assert default_q.item() == pytest.approx(gce_loss(z[mask], y[mask], 0.7).mean().item(), rel=1e-6)


def test_sup_loss_sce_is_sce_on_selected_rows() -> None:
    z, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 1])
    mask = torch.tensor([False, True, True, False, True])
    got = supervised_loss(z, y, mask, loss_fn=make_sup_loss("sce", {"alpha": 0.3, "beta": 2.0, "A": -6.0}))
    expected = sce_loss(z[mask], y[mask], alpha=0.3, beta=2.0, log_zero=-6.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_sup_loss_ce_is_the_paper_and_none_selected_falls_back() -> None:
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    none = torch.zeros(4, dtype=torch.bool)
    assert supervised_loss(z, y, none, loss_fn=make_sup_loss("ce", {})).item() == pytest.approx(
        F.cross_entropy(z, y).item(), rel=1e-6)
    gce_all = supervised_loss(z, y, none, loss_fn=make_sup_loss("gce", {}))  # fallback: whole batch
    assert gce_all.item() == pytest.approx(gce_loss(z, y, 0.7).mean().item(), rel=1e-6)


def test_agree_masks_combine_by_and() -> None:
    mw = torch.tensor([True, True, False, False])
    ms = torch.tensor([True, False, True, False])
    both_w, both_s = combine_masks(mw, ms, "agree")
    assert both_w.tolist() == both_s.tolist() == [True, False, False, False]
    same_w, same_s = combine_masks(mw, ms, "independent")
    assert same_w.tolist() == mw.tolist() and same_s.tolist() == ms.tolist()


def test_top_ratio_rejects_a_wrong_minority_label_the_paper_keeps() -> None:
    # thresholds: class 0 a majority (0.5), classes 1, 2 minorities (0.1, 0.4)
    tau = torch.tensor([0.5, 0.1, 0.4])
    probs = torch.tensor([[0.80, 0.12, 0.08],   # labelled 1: clears tau_1 (0.12 >= 0.1), ratios 1.6 / 1.2 / 0.2
                          [0.30, 0.50, 0.20],   # labelled 1: ratios 0.6 / 5.0 / 0.5 -> the normalised argmax
                          [0.55, 0.05, 0.40],   # labelled 2: ratios 1.1 / 0.5 / 1.0 -> within 0.9 of 1.1
                          [0.50, 0.10, 0.40]])  # labelled 0: ratios 1.0 / 1.0 / 1.0 -> a tie counts
    y = torch.tensor([1, 1, 2, 0])
    assert select_clean(probs, y, tau).tolist() == [True, True, True, True]
    assert select_top_ratio(probs, y, tau, 1.0).tolist() == [False, True, False, True]
    assert select_top_ratio(probs, y, tau, 0.9).tolist() == [False, True, True, True]
    assert select_top_ratio(probs, y, tau, 0.7).tolist() == [True, True, True, True]


def test_top_ratio_in_a_step_is_the_and_of_both_rules() -> None:
    torch.manual_seed(3)
    zw, zs = torch.randn(8, 4) * 2, torch.randn(8, 4) * 2
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    method = DNFER(num_classes=4, num_train=8, params=DNFERParams(warmup_epochs=0, top_ratio=1.0))
    batch = TrainBatch({"weak": torch.zeros(8, 3, 4, 4), "strong": torch.zeros(8, 3, 4, 4)}, y, torch.arange(8))
    out = method.training_step(FixedLogits(torch.cat([zw, zs])), batch, StepContext(epoch=0))
    for col, z in enumerate((zw, zs)):
        p = z.softmax(1)
        tau = p.mean(0)
        expected = select_clean(p, y, tau) & (p / tau).argmax(1).eq(y)
        assert out.selected[:, col].tolist() == expected.tolist()
    assert out.selected.sum() < 16  # the seed rejects something


def test_elr_targets_update_hand_value() -> None:
    t = torch.tensor([[0.5, 0.5, 0.0]])
    p = torch.tensor([[0.2, 0.3, 0.5]])
    got = elr_targets_update(t, p, 0.7)
    assert torch.allclose(got, torch.tensor([[0.41, 0.44, 0.15]]), atol=1e-6)
    # clamping: an exact 0/1 posterior is clamped to [1e-4, 1 - 1e-4] and renormalised
    hard = elr_targets_update(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), 0.0)
    assert torch.allclose(hard, torch.tensor([[1 - 1e-4, 1e-4]]), atol=1e-7)


def test_elr_loss_hand_value_and_pull_towards_target() -> None:
    z = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]], requires_grad=True)  # p = (.25,.75), (.75,.25)
    t = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    expected = (math.log(1 - 0.25) + math.log(1 - 0.5)) / 2
    loss = elr_loss(z, t)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    with torch.no_grad():  # one gradient step raises <t, p> for the sample whose target differs
        before = (t[0] * z[0].softmax(0)).sum()
        after = (t[0] * (z[0] - 0.1 * z.grad[0]).softmax(0)).sum()
    assert after > before


def test_elr_step_matches_hand_assembly_and_writes_only_batch_rows() -> None:
    torch.manual_seed(5)
    zw, zs = torch.randn(4, 3), torch.randn(4, 3)
    y, index = torch.tensor([0, 1, 2, 0]), torch.tensor([6, 1, 3, 8])
    method = DNFER(num_classes=3, num_train=10, params=DNFERParams(warmup_epochs=0, elr_lambda=3.0, elr_beta=0.7))
    method.elr_targets[index] = torch.full((4, 3), 0.2)
    batch = TrainBatch({"weak": torch.zeros(4, 3, 4, 4), "strong": torch.zeros(4, 3, 4, 4)}, y, index)
    out = method.training_step(FixedLogits(torch.cat([zw, zs])), batch, StepContext(epoch=0))

    pw, ps = zw.softmax(1), zs.softmax(1)
    targets = 0.7 * 0.2 + 0.3 * pw.clamp(1e-4, 1 - 1e-4) / pw.clamp(1e-4, 1 - 1e-4).sum(1, keepdim=True)
    sup = (supervised_loss(zw, y, select_clean(pw, y, pw.mean(0)))
           + supervised_loss(zs, y, select_clean(ps, y, ps.mean(0)))) / 2
    elr = torch.log(1 - (targets * pw).sum(1)).mean()
    expected = 0.5 * (sup + 3.0 * elr) + 0.5 * consistency_loss(zw, zs)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(method.elr_targets[index], targets, atol=1e-6)
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[index] = False
    assert method.elr_targets[untouched].abs().sum().item() == 0.0


def test_elr_targets_store_every_process_rows_under_a_gather() -> None:
    """Under DDP each process stores the other processes' rows too (through ``ctx.gather``)."""
    other_index, other_targets = torch.tensor([2, 5]), torch.tensor([[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])

    def fake_gather(t: torch.Tensor) -> torch.Tensor:  # this process first, then a second one
        return torch.cat([t, other_index if t.dtype == torch.long else other_targets])

    method = DNFER(num_classes=3, num_train=8, params=DNFERParams(warmup_epochs=0, elr_lambda=1.0))
    z = torch.randn(4, 3)
    batch = TrainBatch({"weak": torch.zeros(2, 3, 4, 4), "strong": torch.zeros(2, 3, 4, 4)},
                       torch.tensor([0, 1]), torch.tensor([0, 7]))
    method.training_step(FixedLogits(z), batch, StepContext(epoch=0, world_size=2, gather=fake_gather))
    assert torch.equal(method.elr_targets[other_index], other_targets)
    assert method.elr_targets[torch.tensor([0, 7])].sum().item() > 0


def test_paper_state_has_no_elr_buffer() -> None:
    """Checkpoints of the published method keep exactly their state (resume compatibility)."""
    assert "elr_targets" not in DNFER(num_classes=3, num_train=5, params=DNFERParams()).state_dict()
    assert DNFER(num_classes=3, num_train=5, params=DNFERParams(elr_lambda=1.0)).state_dict()["elr_targets"].shape == (5, 3)


@pytest.mark.parametrize("grad", ["both", "strong"])
def test_consistency_grad_strong_detaches_the_weak_view(grad: str) -> None:
    torch.manual_seed(1)
    model = FixedLogits(torch.randn(8, 3))
    y = torch.tensor([0, 1, 2, 0])
    method = DNFER(num_classes=3, num_train=4, params=DNFERParams(warmup_epochs=0, alpha=1.0, consistency_grad=grad))
    batch = TrainBatch({"weak": torch.zeros(4, 3, 4, 4), "strong": torch.zeros(4, 3, 4, 4)}, y, torch.arange(4))
    out = method.training_step(model, batch, StepContext(epoch=0))  # alpha 1: the consistency loss alone
    assert out.loss.item() == pytest.approx(consistency_loss(model.logits[:4], model.logits[4:]).item(), rel=1e-6)
    out.loss.backward()
    weak_grad, strong_grad = model.logits.grad[:4].abs().sum(), model.logits.grad[4:].abs().sum()
    assert strong_grad > 0
    assert (weak_grad == 0) == (grad == "strong")


def test_sup_views_weak_is_the_weak_views_loss_only() -> None:
    torch.manual_seed(2)
    zw, zs = torch.randn(6, 3), torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    method = DNFER(num_classes=3, num_train=6, params=DNFERParams(warmup_epochs=0, sup_views="weak"))
    batch = TrainBatch({"weak": torch.zeros(6, 3, 4, 4), "strong": torch.zeros(6, 3, 4, 4)}, y, torch.arange(6))
    out = method.training_step(FixedLogits(torch.cat([zw, zs])), batch, StepContext(epoch=0))
    pw = zw.softmax(1)
    expected = 0.5 * supervised_loss(zw, y, select_clean(pw, y, pw.mean(0))) + 0.5 * consistency_loss(zw, zs)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("sup", ["ce", "sce", "gce"])
def test_warmup_uses_the_sup_loss_on_every_sample(sup: str) -> None:
    torch.manual_seed(4)
    zw, zs = torch.randn(5, 3), torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 0, 1])
    method = DNFER(num_classes=3, num_train=5, params=DNFERParams(warmup_epochs=2, sup_loss=sup))
    batch = TrainBatch({"weak": torch.zeros(5, 3, 4, 4), "strong": torch.zeros(5, 3, 4, 4)}, y, torch.arange(5))
    out = method.training_step(FixedLogits(torch.cat([zw, zs])), batch, StepContext(epoch=1))  # still warm-up
    per_sample = {"ce": lambda z: F.cross_entropy(z, y, reduction="none"),
                  "sce": lambda z: 0.1 * F.cross_entropy(z, y, reduction="none") + 4.0 * (1 - z.softmax(1)[range(5), y]),
                  "gce": lambda z: (1 - z.softmax(1)[range(5), y] ** 0.7) / 0.7}[sup]
    expected = (per_sample(zw).mean() + per_sample(zs).mean()) / 2
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_relabel_loss_hand_value_on_three_samples() -> None:
    probs_w = torch.tensor([[0.97, 0.03], [0.96, 0.04], [0.6, 0.4]])
    selected = torch.tensor([False, True, False])  # row 1 is confident but already clean
    zs = torch.tensor([[0.0, math.log(3.0)], [5.0, 0.0], [0.0, 0.0]], requires_grad=True)
    loss, relabelled = relabel_loss(zs, probs_w, selected, 0.95)
    assert relabelled.tolist() == [True, False, False]  # row 2 is unselected but not confident
    # CE of [0, ln 3] towards class 0 = ln(1 + 3); divided by the batch size 3
    assert loss.item() == pytest.approx(math.log(4.0) / 3, rel=1e-6)
    loss.backward()
    assert zs.grad[0].abs().sum() > 0 and zs.grad[1:].abs().sum() == 0


def test_relabel_pseudo_label_comes_from_weak_argmax_not_given_label() -> None:
    probs_w = torch.tensor([[0.02, 0.98, 0.0]])
    zs = torch.tensor([[2.0, 1.0, 0.0]])
    loss, relabelled = relabel_loss(zs, probs_w, torch.tensor([False]), 0.9)
    assert relabelled.tolist() == [True]
    assert loss.item() == pytest.approx(F.cross_entropy(zs, torch.tensor([1])).item(), rel=1e-6)


def test_relabel_loss_global_batch_under_reduce_sum() -> None:
    """Two processes of 2 samples each: each scales its sum so that their mean is the global value."""
    probs_w = torch.tensor([[0.99, 0.01], [0.5, 0.5]])
    zs = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    loss, _ = relabel_loss(zs, probs_w, torch.tensor([False, False]), 0.95,
                           reduce_sum=lambda t: t * 2, world_size=2)
    # global batch 4, one relabelled sample with CE ln 2 here: this process contributes 2 * ln2 / 4
    assert loss.item() == pytest.approx(2 * math.log(2.0) / 4, rel=1e-6)


@pytest.mark.parametrize(("params", "key"), [
    ({"sup_loss": "mae"}, "sup_loss"),
    ({"sup_loss": "gce", "sup_loss_params": {"q": 2.0}}, "q"),
    ({"sup_loss": "sce", "sup_loss_params": {"gamma": 1.0}}, "gamma"),
    ({"sup_loss": "ce", "sup_loss_params": {"q": 0.5}}, "sup_loss_params"),
    ({"selection": "both"}, "selection"),
    ({"top_ratio": 0.0}, "top_ratio"),
    ({"top_ratio": 1.2}, "top_ratio"),
    ({"elr_lambda": -1.0}, "elr_lambda"),
    ({"consistency_grad": "weak"}, "consistency_grad"),
    ({"sup_views": "strong"}, "sup_views"),
    ({"elr_beta": 1.0}, "elr_beta"),
    ({"relabel_threshold": 0.0}, "relabel_threshold"),
    ({"relabel_threshold": 1.5}, "relabel_threshold"),
])
def test_bad_option_is_one_line_naming_it(params: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key) as e:
        DNFERParams(**params)
    assert "\n" not in str(e.value)


def test_step_with_all_options_matches_hand_assembly() -> None:
    torch.manual_seed(0)
    zw, zs = torch.randn(6, 3) * 3, torch.randn(6, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    params = DNFERParams(warmup_epochs=0, sup_loss="gce", selection="agree", relabel_threshold=0.6)
    method = DNFER(num_classes=3, num_train=6, params=params)
    batch = TrainBatch({"weak": torch.zeros(6, 3, 4, 4), "strong": torch.zeros(6, 3, 4, 4)}, y, torch.arange(6))
    out = method.training_step(FixedLogits(torch.cat([zw, zs])), batch, StepContext(epoch=0))

    pw, ps = zw.softmax(1), zs.softmax(1)
    both = select_clean(pw, y, pw.mean(0)) & select_clean(ps, y, ps.mean(0))
    sup = (gce_loss(zw[both], y[both], 0.7).mean() + gce_loss(zs[both], y[both], 0.7).mean()) / 2
    confident = (~both) & (pw.max(1).values >= 0.6)
    relabel = (F.cross_entropy(zs, pw.argmax(1), reduction="none") * confident).sum() / 6
    expected = 0.5 * (sup + relabel) + 0.5 * consistency_loss(zw, zs)
    assert both.any() and confident.any()  # the seed exercises both terms
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.selected[:, 0].tolist() == out.selected[:, 1].tolist() == both.tolist()
    assert out.sample_scores["dnfer/relabelled"].tolist() == confident.float().tolist()


def test_one_epoch_fit_with_all_options(tmp_path) -> None:
    cfg = tiny_config(str(tmp_path / "run"), epochs=1)
    cfg.method.params = {"warmup_epochs": 0, "sup_loss": "sce", "selection": "agree", "relabel_threshold": 0.5,
                         "top_ratio": 0.5, "elr_lambda": 3.0}
    fit(cfg, log=lambda msg: None)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(record["train_loss"])
    assert "loss_relabel" in record and math.isfinite(record["loss_relabel"])
    assert 0.0 <= record["dnfer_relabelled_mean"] <= 1.0
    assert math.isfinite(record["loss_elr"]) and record["loss_elr"] < 0  # log(1 - <t, p>) with <t, p> in (0, 1)
