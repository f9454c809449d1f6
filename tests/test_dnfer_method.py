"""DNFER's pieces against hand-computed tensors (Gera et al., arXiv:2208.10221; docs/methods.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import FixedLogits

from dnfer.methods.base import StepContext, TrainBatch
from dnfer.methods.dnfer import (
    DNFER,
    DNFERParams,
    class_thresholds,
    consistency_loss,
    select_clean,
    supervised_loss,
)
from dnfer.methods.thresholds import create_threshold

P = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.4, 0.4, 0.2], [0.2, 0.2, 0.6]])


def test_threshold_is_mean_over_all_samples_whatever_their_label() -> None:
    tau = class_thresholds(P)
    # hand: column means (0.7+0.1+0.4+0.2)/4 = 0.35, (0.2+0.6+0.4+0.2)/4 = 0.35, (0.1+0.3+0.2+0.6)/4 = 0.3
    assert torch.allclose(tau, torch.tensor([0.35, 0.35, 0.30]))


def test_threshold_defined_for_class_absent_from_batch_labels() -> None:
    labels = torch.tensor([0, 0, 1, 1])  # class 2 is nobody's label
    tau = class_thresholds(P)
    assert torch.isfinite(tau).all() and tau[2] == pytest.approx(0.3)
    mask = select_clean(P, labels, tau)
    # sample 0: p0=0.7>=0.35 yes; 1: p0=0.1<0.35 no; 2: p1=0.4>=0.35 yes; 3: p1=0.2<0.35 no
    assert mask.tolist() == [True, False, True, False]


def test_threshold_has_no_gradient() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    assert not class_thresholds(logits.softmax(1)).requires_grad


def test_selection_uses_given_label_column_and_ties_are_selected() -> None:
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    tau = class_thresholds(probs)
    assert select_clean(probs, torch.tensor([0, 1]), tau).all()  # p == tau counts as clean (>=)


def test_supervised_loss_averages_over_selected_only() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0]])
    labels = torch.tensor([0, 0, 1])
    mask = torch.tensor([True, False, True])
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert supervised_loss(logits, labels, mask).item() == pytest.approx(((ce[0] + ce[2]) / 2).item())


def test_supervised_loss_all_selected_equals_plain_ce() -> None:
    logits = torch.randn(5, 4)
    labels = torch.randint(0, 4, (5,))
    out = supervised_loss(logits, labels, torch.ones(5, dtype=torch.bool))
    assert out.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_supervised_loss_none_selected_falls_back_to_whole_batch() -> None:
    logits = torch.randn(5, 4)
    labels = torch.randint(0, 4, (5,))
    out = supervised_loss(logits, labels, torch.zeros(5, dtype=torch.bool))
    assert out.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)


def test_supervised_loss_gradients_follow_the_chosen_branch() -> None:
    """The selected/whole-batch choice is made on the device (torch.where, no host sync): the
    gradient must still come from the chosen branch alone, in both cases."""
    logits = torch.randn(6, 4)
    labels = torch.randint(0, 4, (6,))
    mask = torch.tensor([True, False, True, False, False, False])
    for m, expect_rows in ((mask, mask), (torch.zeros(6, dtype=torch.bool), torch.ones(6, dtype=torch.bool))):
        x = logits.clone().requires_grad_(True)
        supervised_loss(x, labels, m).backward()
        ref = logits[expect_rows].clone().requires_grad_(True)
        F.cross_entropy(ref, labels[expect_rows]).backward()
        assert torch.allclose(x.grad[expect_rows], ref.grad, atol=1e-7)
        assert torch.equal(x.grad[~expect_rows], torch.zeros_like(x.grad[~expect_rows]))


def test_ema_threshold_ignores_a_non_finite_batch() -> None:
    """Regression for the device-side check: a NaN batch (a step that will be skipped) leaves
    tau exactly as it was, and the next finite batch updates it as usual."""
    ema = create_threshold("ema", 3, {"momentum": 0.5})
    labels = torch.tensor([0, 1, 1, 2])
    ema(P, labels)
    before = ema.tau.clone()
    bad = P.clone()
    bad[1, 2] = float("nan")
    ema(bad, labels)
    assert torch.equal(ema.tau, before)
    assert torch.allclose(ema(P, labels), 0.5 * before + 0.5 * class_thresholds(P))


def test_consistency_is_symmetric_kl_in_bits() -> None:
    za = torch.tensor([[1.0, 0.0, -1.0]])
    zb = torch.tensor([[0.0, 0.5, 0.0]])
    pa, pb = za.softmax(1), zb.softmax(1)
    kl_ab = (pa * (pa / pb).log()).sum()
    kl_ba = (pb * (pb / pa).log()).sum()
    expected = (kl_ab + kl_ba) / math.log(2)
    assert consistency_loss(za, zb).item() == pytest.approx(expected.item(), rel=1e-5)
    assert consistency_loss(zb, za).item() == pytest.approx(expected.item(), rel=1e-5)
    assert consistency_loss(za, zb, log_base=math.e).item() == pytest.approx((kl_ab + kl_ba).item(), rel=1e-5)


def test_consistency_zero_for_identical_views_and_averaged_over_batch() -> None:
    z = torch.randn(6, 7)
    assert consistency_loss(z, z).item() == pytest.approx(0.0, abs=1e-7)
    za, zb = torch.randn(2, 3), torch.randn(2, 3)
    both = consistency_loss(za, zb)
    singles = (consistency_loss(za[:1], zb[:1]) + consistency_loss(za[1:], zb[1:])) / 2
    assert both.item() == pytest.approx(singles.item(), rel=1e-5)


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_extreme_logits_give_finite_losses_and_gradients(scale: float) -> None:
    za = torch.tensor([[scale, -scale, 0.0], [-scale, scale, 0.0]], requires_grad=True)
    zb = torch.tensor([[-scale, scale, 0.0], [0.0, 0.0, scale]], requires_grad=True)
    labels = torch.tensor([1, 2])
    mask = select_clean(za.softmax(1), labels, class_thresholds(za.softmax(1)))
    loss = supervised_loss(za, labels, mask) + consistency_loss(za, zb)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(za.grad).all() and torch.isfinite(zb.grad).all()


def test_consistency_gradient_flows_through_both_views() -> None:
    za = torch.randn(3, 4, requires_grad=True)
    zb = torch.randn(3, 4, requires_grad=True)
    consistency_loss(za, zb).backward()
    assert za.grad.abs().sum() > 0 and zb.grad.abs().sum() > 0


def _step(logits_w: torch.Tensor, logits_s: torch.Tensor, labels: torch.Tensor, epoch: int):
    b = len(labels)
    method = DNFER(num_classes=logits_w.shape[1], num_train=b, params=DNFERParams(warmup_epochs=1))
    model = FixedLogits(torch.cat([logits_w, logits_s]))
    batch = TrainBatch({"weak": torch.zeros(b, 3, 4, 4), "strong": torch.zeros(b, 3, 4, 4)}, labels, torch.arange(b))
    return method.training_step(model, batch, StepContext(epoch=epoch))


def test_dnfer_step_warmup_is_mean_ce_of_both_views() -> None:
    zw, zs, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    out = _step(zw, zs, y, epoch=0)
    expected = (F.cross_entropy(zw, y) + F.cross_entropy(zs, y)) / 2
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.selected.shape == (4, 2)


def test_dnfer_step_after_warmup_matches_hand_assembly() -> None:
    zw, zs, y = torch.randn(6, 3), torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    out = _step(zw, zs, y, epoch=1)
    mw = select_clean(zw.softmax(1), y, zw.softmax(1).mean(0))
    ms = select_clean(zs.softmax(1), y, zs.softmax(1).mean(0))
    sup = (supervised_loss(zw, y, mw) + supervised_loss(zs, y, ms)) / 2
    expected = 0.5 * sup + 0.5 * consistency_loss(zw, zs)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.selected[:, 0].tolist() == mw.tolist() and out.selected[:, 1].tolist() == ms.tolist()


def test_dnfer_step_batch_of_one_selects_it_and_is_finite() -> None:
    out = _step(torch.randn(1, 7), torch.randn(1, 7), torch.tensor([3]), epoch=5)
    assert out.selected.all()  # its own posterior is the batch mean
    assert torch.isfinite(out.loss)


def test_threshold_policies_shapes_and_rules() -> None:
    labels = torch.tensor([0, 1, 1, 2])
    assert torch.allclose(create_threshold("fixed", 3, {"value": 0.8})(P, labels), torch.full((3,), 0.8))
    lm = create_threshold("label_mean", 3)(P, labels)
    # class 0: only sample 0 -> 0.7; class 1: samples 1,2 -> (0.6+0.4)/2 = 0.5; class 2: sample 3 -> 0.6
    assert torch.allclose(lm, torch.tensor([0.7, 0.5, 0.6]))
    lm_absent = create_threshold("label_mean", 3)(P, torch.tensor([0, 0, 0, 0]))
    assert torch.allclose(lm_absent[1:], class_thresholds(P)[1:])  # absent classes fall back to the batch mean
    ema = create_threshold("ema", 3, {"momentum": 0.5})
    t1 = ema(P, labels)
    assert torch.allclose(t1, 0.5 * torch.full((3,), 1 / 3) + 0.5 * class_thresholds(P))
    state = ema.state_dict()
    ema2 = create_threshold("ema", 3, {"momentum": 0.5})
    ema2.load_state_dict(state)
    assert torch.allclose(ema2(P, labels), ema(P, labels))


def test_threshold_reduce_sum_gives_global_batch_mean() -> None:
    """Two halves reduced through a fake all-reduce equal the whole batch's mean."""
    halves = [P[:2], P[2:]]
    totals = {}

    def fake_reduce_for(part: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            other = halves[1 - part]
            # what the other rank contributes to the same reduction
            contrib = torch.cat([other.sum(0), other.new_tensor([other.shape[0]])])
            totals[part] = t + contrib
            return totals[part]

        return reduce

    from dnfer.methods.thresholds import batch_class_means

    for part in (0, 1):
        assert torch.allclose(batch_class_means(halves[part], fake_reduce_for(part)), class_thresholds(P))


def test_unknown_threshold_policy_names_choices() -> None:
    from dnfer.errors import ConfigError

    with pytest.raises(ConfigError, match="batch_mean"):
        create_threshold("nope", 3)
