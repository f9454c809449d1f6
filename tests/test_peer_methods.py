"""Peer methods' losses and pieces against hand-computed tensors (each method's paper: docs/methods.md)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dnfer.errors import ConfigError
from dnfer.methods.base import StepContext, TrainBatch
from dnfer.methods.coteaching import (
    CoTeaching,
    CoteachingParams,
    coteaching_losses,
    forget_rate,
    num_kept,
    small_loss_mask,
)
from dnfer.methods.eac import EAC, EACParams, cam_consistency_loss, class_activation_maps, random_erasing
from dnfer.methods.gce import GCEParams, gce_loss
from dnfer.methods.rul import add_up_loss, uncertainty_mixup
from dnfer.methods.sce import reverse_cross_entropy, sce_loss
from dnfer.methods.scn import SCN, SCNParams, rank_regularization, relabel_candidates
from dnfer.methods.thresholds import create_threshold
from dnfer.models.factory import FERNet, create_model


# ---------------------------------------------------------------- GCE
def test_gce_hand_value() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0]])  # p = (0.75, 0.25)
    q = 0.5
    assert gce_loss(logits, torch.tensor([0]), q).item() == pytest.approx((1 - 0.75**0.5) / 0.5, rel=1e-6)
    assert gce_loss(logits, torch.tensor([1]), 1.0).item() == pytest.approx(0.75, rel=1e-6)  # q=1: MAE-like 1-p_y


def test_gce_tends_to_ce_as_q_goes_to_zero() -> None:
    logits, y = torch.randn(6, 7), torch.randint(0, 7, (6,))
    ce = F.cross_entropy(logits, y, reduction="none")
    assert torch.allclose(gce_loss(logits, y, 1e-5), ce, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(gce_loss(logits, y, 0.7), ce, rtol=1e-2)


def test_gce_gradient_finite_when_label_probability_underflows() -> None:
    logits = torch.tensor([[200.0, -200.0]], requires_grad=True)
    gce_loss(logits, torch.tensor([1]), 0.7).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_gce_rejects_bad_q() -> None:
    with pytest.raises(ConfigError, match="q must be in"):
        GCEParams(q=0.0)


# ---------------------------------------------------------------- SCE
def test_sce_reverse_ce_for_one_hot_is_minus_a_times_one_minus_py() -> None:
    logits = torch.tensor([[math.log(3.0), 0.0, math.log(2.0)]])  # p = (0.5, 1/6, 1/3)
    y = torch.tensor([2])
    assert reverse_cross_entropy(logits, y, -4.0).item() == pytest.approx(4.0 * (1 - 1 / 3), rel=1e-6)
    # the definition: -sum_k p_k log q_k with log 0 := A, log 1 = 0
    p = logits.softmax(1)[0]
    direct = -(p[0] * -4.0 + p[1] * -4.0 + p[2] * 0.0)
    assert reverse_cross_entropy(logits, y, -4.0).item() == pytest.approx(direct.item(), rel=1e-6)


def test_sce_combines_ce_and_rce_with_weights() -> None:
    logits, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    ce = F.cross_entropy(logits, y)
    rce = (4.0 * (1 - logits.softmax(1).gather(1, y[:, None]).squeeze(1))).mean()
    assert sce_loss(logits, y, alpha=0.1, beta=1.0, log_zero=-4.0).item() == pytest.approx((0.1 * ce + rce).item(), rel=1e-5)
    assert sce_loss(logits, y, alpha=1.0, beta=0.0).item() == pytest.approx(ce.item(), rel=1e-6)


# ---------------------------------------------------------------- SCN
def test_scn_rank_loss_hand_example() -> None:
    w = torch.tensor([0.9, 0.2, 0.8, 0.5, 0.1], requires_grad=True)
    # beta 0.6 -> int(3.0) = 3 high: 0.9, 0.8, 0.5 (mean 0.7333); low: 0.2, 0.1 (mean 0.15)
    loss, high = rank_regularization(w, 0.6, 0.15)
    assert high.tolist() == [True, False, True, True, False]
    assert loss.item() == pytest.approx(0.0)  # gap 0.583 > margin
    loss, _ = rank_regularization(w, 0.6, 0.7)
    assert loss.item() == pytest.approx(0.7 - (0.7333333 - 0.15), abs=1e-5)
    loss.backward()
    # d/dw: high members -1/3, low members +1/2
    assert torch.allclose(w.grad, torch.tensor([-1 / 3, 0.5, -1 / 3, -1 / 3, 0.5]))


def test_scn_rank_loss_degenerate_batch_is_zero() -> None:
    loss, high = rank_regularization(torch.tensor([0.4], requires_grad=True), 0.7, 0.15)
    assert loss.item() == 0.0 and high.tolist() == [False]


def test_scn_relabel_candidates_use_margin() -> None:
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.45, 0.3, 0.25], [0.1, 0.1, 0.8]])
    y = torch.tensor([1, 1, 2])
    mask, pred = relabel_candidates(probs, y, 0.2)
    # 0.6-0.3 = 0.3 > 0.2 yes; 0.45-0.3 = 0.15 no; 0.8-0.8 = 0 no
    assert mask.tolist() == [True, False, False] and pred[0].item() == 0


def _batch(b: int, size: int = 16, views: tuple[str, ...] = ("weak",), labels: torch.Tensor | None = None) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    return TrainBatch({v: torch.randn(b, 3, size, size, generator=g) for v in views},
                      labels if labels is not None else torch.arange(b) % 3, torch.arange(b))


def test_scn_relabels_persist_in_buffer_and_are_used_as_labels() -> None:
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 3, image_size=16)
    m = SCN(num_classes=3, num_train=8, params=SCNParams(relabel_epoch=1, margin_2=0.0, relabel_scope="all"))
    m.setup(model)
    batch = _batch(8)
    out = m.training_step(model, batch, StepContext(epoch=0))
    assert out.selected.shape == (8, 1) and out.selected.sum().item() == int(8 * 0.7)
    changed = m.relabels >= 0
    assert changed.any()  # margin 0: every sample whose argmax differs from its label
    assert torch.equal(m.current_labels(batch)[changed], m.relabels[changed])
    state = m.state_dict()
    assert "relabels" in state and state["relabels"].shape == (8,)


def test_scn_low_scope_never_relabels_high_group() -> None:
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 3, image_size=16)
    m = SCN(num_classes=3, num_train=8, params=SCNParams(relabel_epoch=1, margin_2=0.0))
    m.setup(model)
    out = m.training_step(model, _batch(8), StepContext(epoch=0))
    assert not (m.relabels >= 0)[out.selected[:, 0]].any()


# ---------------------------------------------------------------- RUL
def test_rul_mixture_weights_sum_to_one_and_mix_hand_example() -> None:
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    s = torch.tensor([1.0, 3.0, 2.0])
    perm = torch.tensor([1, 2, 0])
    mixed, w_self, w_partner = uncertainty_mixup(f, s, perm)
    assert torch.allclose(w_self + w_partner, torch.ones(3))
    assert torch.allclose(w_self, torch.tensor([0.25, 0.6, 2 / 3]))
    # sample 0 (s=1) with sample 1 (s=3): 0.25 * (1, 0) + 0.75 * (0, 1)
    assert torch.allclose(mixed[0], torch.tensor([0.25, 0.75]))


def test_rul_add_up_loss_is_mean_of_both_labels_ce() -> None:
    logits = torch.randn(4, 3)
    y, perm = torch.tensor([0, 1, 2, 0]), torch.tensor([3, 2, 1, 0])
    expected = (F.cross_entropy(logits, y) + F.cross_entropy(logits, y[perm])) / 2
    assert add_up_loss(logits, y, perm).item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------- EAC
def _sym_net() -> FERNet:
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_((conv.weight + conv.weight.flip(3)) / 2)  # horizontally symmetric kernels
    return FERNet(torch.nn.Sequential(conv, torch.nn.ReLU()), 4, 3)


def test_eac_cam_loss_zero_for_symmetric_input_and_weights() -> None:
    torch.manual_seed(0)
    net = _sym_net()
    x = torch.randn(2, 3, 8, 8)
    x = (x + x.flip(3)) / 2  # horizontally symmetric images
    m = EAC(num_classes=3, num_train=2, params=EACParams(erase_p=0.0))
    out = m.training_step(net, TrainBatch({"weak": x}, torch.tensor([0, 1]), torch.arange(2)), StepContext(epoch=0))
    assert out.stats["loss/cam"].item() == pytest.approx(0.0, abs=1e-10)
    # ... and positive for an asymmetric kernel, so the check can fail
    with torch.no_grad():
        net.backbone[0].weight[:, :, :, 0] += 1.0
    out = m.training_step(net, TrainBatch({"weak": torch.randn(2, 3, 8, 8)}, torch.tensor([0, 1]), torch.arange(2)),
                          StepContext(epoch=0))
    assert out.stats["loss/cam"].item() > 1e-6


def test_eac_cam_is_weighted_channel_sum_and_flip_consistency() -> None:
    maps = torch.arange(2 * 2 * 1 * 3, dtype=torch.float32).reshape(2, 2, 1, 3)
    w = torch.tensor([[1.0, 0.0], [1.0, -1.0]])
    cam = class_activation_maps(maps, w)
    assert torch.allclose(cam[:, 0], maps[:, 0]) and torch.allclose(cam[:, 1], maps[:, 0] - maps[:, 1])
    assert cam_consistency_loss(cam, cam.flip(3)).item() == 0.0
    assert cam_consistency_loss(cam, cam).item() > 0


def test_random_erasing_per_sample_boxes_within_area_range() -> None:
    torch.manual_seed(0)
    x = torch.ones(64, 3, 32, 32)
    out = random_erasing(x, p=1.0, scale=(0.02, 0.25))
    share = (out[:, 0] == 0).float().mean((1, 2))
    assert (share > 0).all() and (share <= 0.25 + 0.05).all()  # clipping/rounding slack
    assert len(set(share.tolist())) > 10  # independent boxes, not one for the batch
    assert torch.equal(random_erasing(x, p=0.0), x) and torch.equal(x, torch.ones_like(x))


# ---------------------------------------------------------------- co-teaching
def test_coteaching_keeps_ceil_and_exchanges_selection() -> None:
    assert num_kept(10, 0.3) == 7  # 0.7 * 10 = 7.000000000000001 must not round up to 8
    assert num_kept(10, 0.25) == 8 and num_kept(3, 0.99) == 1
    labels = torch.tensor([0, 1, 0, 1, 0])
    # main's per-sample loss order: 4 < 3 < 2 < 1 < 0; peer's: 0 < 1 < 2 < 3 < 4
    main = torch.tensor([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0], [0.0, 1.5], [3.0, 0.0]])
    main[0] = torch.tensor([-2.0, 0.0])  # sample 0: label 0, strongly wrong
    peer = torch.tensor([[5.0, 0.0], [0.0, 4.0], [2.0, 0.0], [0.0, 0.5], [-1.0, 0.0]])
    lm, lp, kept_by_peer, kept_by_main = coteaching_losses(main, peer, labels, 0.5)
    assert kept_by_peer.sum().item() == 3 and kept_by_main.sum().item() == 3  # ceil(0.5 * 5)
    ce_main = F.cross_entropy(main, labels, reduction="none")
    ce_peer = F.cross_entropy(peer, labels, reduction="none")
    assert kept_by_peer.tolist() == small_loss_mask(ce_peer, 3).tolist() == [True, True, True, False, False]
    assert kept_by_main.tolist() == small_loss_mask(ce_main, 3).tolist()
    assert lm.item() == pytest.approx(ce_main[kept_by_peer].mean().item())  # main learns from the PEER's picks
    assert lp.item() == pytest.approx(ce_peer[kept_by_main].mean().item())


def test_coteaching_forget_schedule() -> None:
    assert forget_rate(0, 0.3, 10) == 0.0
    assert forget_rate(5, 0.3, 10) == pytest.approx(0.15)
    assert forget_rate(10, 0.3, 10) == pytest.approx(0.3) and forget_rate(30, 0.3, 10) == pytest.approx(0.3)
    assert forget_rate(3, 0.3, 0) == 0.3


def test_coteaching_needs_noise_rate_and_peer_differs() -> None:
    with pytest.raises(ConfigError, match="noise-rate"):
        CoteachingParams()
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 3, image_size=16)
    before = torch.get_rng_state()
    for init, backbone_equal in (("head", True), ("all", False)):
        m = CoTeaching(num_classes=3, num_train=4, params=CoteachingParams(peer_init=init, noise_rate=0.2))
        m.setup(model)
        assert not torch.equal(m.peer.head.weight, model.head.weight)
        same = torch.equal(m.peer.backbone[0][0].weight, model.backbone[0][0].weight)
        assert same == backbone_equal
    assert torch.equal(torch.get_rng_state(), before)  # the peer's draw leaves the global stream alone
    groups = m.parameter_groups(1e-3, 1e-2)
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert sum(len(g["params"]) for g in groups) == len(list(m.peer.parameters()))
    assert CoteachingParams(noise_rate=0.2).peer_init == "all"  # the paper's independent networks


def test_coteaching_all_keeps_pretrained_layers_in_both_networks(tmp_path) -> None:
    """With --pretrained weights, ``peer_init=all`` re-draws only what the file did not hold:
    here the file holds the first block, so it is shared; later blocks and the head differ."""
    from dnfer.models.pretrained import load_pretrained

    torch.manual_seed(0)
    source = create_model("tiny_cnn", 3, image_size=16)
    first = {k: v for k, v in source.state_dict().items() if k.startswith("backbone.0.")}
    torch.save(first, tmp_path / "first_block.pt")
    model = create_model("tiny_cnn", 3, image_size=16)
    load_pretrained(model, tmp_path / "first_block.pt", allow_partial=True)
    assert model.pretrained_keys == frozenset(first)
    m = CoTeaching(num_classes=3, num_train=4, params=CoteachingParams(noise_rate=0.2))
    m.setup(model)
    peer, main = m.peer.state_dict(), model.state_dict()
    for k in first:
        assert torch.equal(peer[k], main[k]), k
    assert not torch.equal(peer["backbone.1.0.weight"], main["backbone.1.0.weight"])
    assert not torch.equal(peer["head.weight"], main["head.weight"])


# ---------------------------------------------------------------- threshold policies
def test_freematch_threshold_hand_values() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    pol = create_threshold("freematch", 3, {"momentum": 0.5})
    tau = pol(probs, torch.tensor([0, 1]))
    # global: 0.5 * 1/3 + 0.5 * mean(0.7, 0.6) = 0.49167; class means (0.4, 0.4, 0.2) ->
    # q = 0.5/3 + 0.5 * (0.4, 0.4, 0.2) = (0.36667, 0.36667, 0.26667); tau = q / max(q) * global
    g = 0.5 / 3 + 0.5 * 0.65
    q = torch.tensor([0.5 / 3 + 0.2, 0.5 / 3 + 0.2, 0.5 / 3 + 0.1])
    assert torch.allclose(tau, q / q.max() * g)
    pol.eval()
    assert torch.allclose(pol(probs * 0 + 1 / 3, torch.tensor([0, 1])), tau)  # eval: no update


def test_ema_threshold_barely_moves_with_default_momentum() -> None:
    pol = create_threshold("ema", 7)
    probs = torch.zeros(4, 7)
    probs[:, 0] = 1.0
    for _ in range(10):
        tau = pol(probs, torch.zeros(4, dtype=torch.long))
    assert tau[0].item() == pytest.approx(1 / 7 + (1 - 1 / 7) * (1 - 0.999**10), rel=1e-4)
