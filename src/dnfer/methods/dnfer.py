"""DNFER: dynamic class-specific thresholds for noisy-label FER.

D. Gera, N. S. K. Badveeti, B. V. R. Kumar, S. Balasubramanian, "Dynamic Adaptive Threshold based
Learning for Noisy Annotations Robust Facial Expression Recognition", arXiv:2208.10221 (2022);
Multimedia Tools and Applications (2023).

Per mini-batch and per view v (weak, strong), with posteriors ``p = softmax(z)``:

- threshold ``tau_c^v = mean_j p_j^v(c)`` over ALL samples (no gradient; pluggable policy);
- sample i is clean in view v iff ``p_i^v(y_i) >= tau^v_{y_i}`` (views select independently);
- ``L_sup^v`` = mean CE over the clean samples, or over the whole batch if none is clean;
- ``L_cons`` = symmetric KL between the two views' posteriors, summed over classes, averaged over
  ALL samples, gradient through both views;
- warm-up epochs: ``(CE(z_w, y) + CE(z_s, y)) / 2`` on all samples; afterwards
  ``(1 - alpha) * (L_sup^w + L_sup^s) / 2 + alpha * L_cons``.

Options beyond the paper (each off by default, so the defaults are the published method):

- ``sup_loss``: ``gce`` / ``sce`` replace the CE of ``L_sup^v`` with the peer methods' per-sample
  loss (:func:`dnfer.methods.gce.gce_loss`, SCE's ``alpha * CE + beta * RCE``) on the clean set,
  and in the warm-up on every sample (a warm-up of plain CE would fit the wrong labels first);
- ``selection="agree"``: a sample is clean for both views only when both views select it
  (mask ``m_w AND m_s``);
- ``top_ratio``: a sample is clean only if also ``r_i(y_i) >= top_ratio * max_c r_i(c)`` with
  ``r_i(c) = p_i(c) / tau_c`` the posterior relative to its class threshold (1.0: the given label is
  the argmax of the threshold-normalised posterior). A wrongly-labelled sample barely clears a
  small minority-class threshold but its true class clears its own threshold by far more, so it is
  rejected; the normalisation keeps minority classes selectable against the majority's posteriors;
- ``elr_lambda``: early-learning regularisation (Liu et al., NeurIPS 2020) on the weak view of
  every sample: a per-sample target ``t_i <- beta t_i + (1 - beta) p_i`` (running average of the
  network's own detached posteriors) and ``lambda * mean_i log(1 - <t_i, p_i>)`` joins ``L_sup``
  (and the warm-up loss). It pulls each posterior towards what the network predicted while it was
  still learning the easy, mostly right patterns, so labels that pass the threshold but are
  wrong cannot be memorised; the unselected samples are trained towards their own targets;
- ``consistency_grad="strong"``: the weak view's posterior is a detached target of the consistency
  loss (the FixMatch/UDA/mean-teacher convention), so the strong view cannot pull the weak view's
  predictions, which make the selection, towards its own noisier ones;
- ``sup_views="weak"``: only the weak view's clean samples get ``L_sup``; the strong view learns
  through the consistency loss alone (as FixMatch's strong view);
- ``relabel_threshold``: an unselected (weak-view mask) sample whose weak-view max posterior is
  ``>= relabel_threshold`` adds ``CE(z_s, argmax p_w)`` (pseudo-label from the detached weak view,
  learnt by the strong view, as FixMatch), summed and divided by the batch size, to ``L_sup``.

The pieces are pure functions below so they can be tested against hand-computed tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dnfer.errors import ConfigError, choices_text
from dnfer.methods.base import (
    Method,
    MethodParams,
    StepContext,
    StepResult,
    TrainBatch,
    identity_reduce,
    params_error,
    parse_params,
)
from dnfer.methods.gce import GCE, gce_loss
from dnfer.methods.sce import SCE, reverse_cross_entropy
from dnfer.methods.thresholds import batch_class_means, create_threshold
from dnfer.registry import METHODS, THRESHOLDS

Reduce = Callable[[Tensor], Tensor]
#: Per-sample loss ``(logits (B, K), labels (B,)) -> (B,)``.
PerSampleLoss = Callable[[Tensor, Tensor], Tensor]

#: ``sup_loss`` choices: the paper's cross-entropy and the peer methods' robust losses.
SUP_LOSSES = ("ce", "gce", "sce")
#: ``consistency_grad`` choices: gradient through both views (the paper) or the strong view only.
CONSISTENCY_GRADS = ("both", "strong")
#: ``sup_views`` choices: ``L_sup`` on both views (the paper) or on the weak view only.
SUP_VIEWS = ("both", "weak")
#: ``selection`` choices: each view its own mask (the paper), or both views the AND of the masks.
SELECTIONS = ("independent", "agree")


def per_sample_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample cross-entropy ``(B, K), (B,) -> (B,)`` (float32)."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def make_sup_loss(name: str, params: dict[str, Any]) -> PerSampleLoss:
    """The per-sample loss of ``L_sup`` for ``sup_loss=name``.

    ``gce``: :func:`dnfer.methods.gce.gce_loss` with ``params`` as GCE's options (``q``);
    ``sce``: ``alpha * CE + beta * RCE`` per sample (:func:`dnfer.methods.sce.reverse_cross_entropy`,
    whose batch mean is :func:`dnfer.methods.sce.sce_loss`) with SCE's options (``alpha``,
    ``beta``, ``A``). Options are checked by those methods' own Params.
    """
    if name == "ce":
        if params:
            raise ConfigError(f"method.params.sup_loss_params: sup_loss 'ce' takes no options, got {sorted(params)}")
        return per_sample_ce
    try:
        p = parse_params(GCE if name == "gce" else SCE, params)
    except ConfigError as e:
        raise ConfigError(f"method.params.sup_loss_params (sup_loss {name!r}): {e}") from None
    if name == "gce":
        q = float(p.q)  # type: ignore[attr-defined]
        return lambda z, y: gce_loss(z, y, q)
    a, b, log_zero = float(p.alpha), float(p.beta), float(p.A)  # type: ignore[attr-defined]
    return lambda z, y: a * per_sample_ce(z, y) + b * reverse_cross_entropy(z, y, log_zero)


def combine_masks(mask_weak: Tensor, mask_strong: Tensor, selection: str) -> tuple[Tensor, Tensor]:
    """The masks each view's ``L_sup`` uses: unchanged (``independent``) or both ``m_w & m_s``.

    Args:
        mask_weak, mask_strong: bool ``(B,)`` each view's own selection.
    """
    if selection == "agree":
        both = mask_weak & mask_strong
        return both, both
    return mask_weak, mask_strong


def relabel_loss(
    logits_strong: Tensor,
    probs_weak: Tensor,
    selected: Tensor,
    threshold: float,
    *,
    reduce_sum: Reduce = identity_reduce,
    world_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """FixMatch-style pseudo-label loss on the confident unselected samples.

    ``r_i = (not selected_i) and max_c p_w(i, c) >= threshold``;
    loss ``= sum_i r_i * CE(z_s_i, argmax_c p_w(i, c)) / B`` with B the (global) batch size,
    so a batch with few confident samples adds little (FixMatch's normalisation).

    Args:
        logits_strong: ``(B, K)``, gradient flows.
        probs_weak: ``(B, K)`` weak-view posteriors (detached here).
        selected: bool ``(B,)`` the weak view's clean mask.
        threshold: confidence in (0, 1].

    Returns:
        ``(loss, relabelled)``: scalar loss and bool ``(B,)`` ``r``.
    """
    conf, pseudo = probs_weak.detach().float().max(1)
    relabelled = (~selected) & (conf >= threshold)
    ce = per_sample_ce(logits_strong, pseudo)
    n_total = reduce_sum(torch.ones_like(ce).sum())
    loss = (ce * relabelled.float()).sum() * world_size / n_total.clamp_min(1.0)
    return loss, relabelled


#: ELR clamps posteriors to [ELR_CLAMP, 1 - ELR_CLAMP] (the authors' code) so ``log(1 - <t, p>)`` stays finite.
ELR_CLAMP = 1e-4


def elr_targets_update(targets: Tensor, probs: Tensor, beta: float) -> Tensor:
    """ELR's temporal ensembling of one batch's targets: ``beta * t + (1 - beta) * p_hat`` with
    ``p_hat`` the clamped posterior renormalised to sum 1. ``(B, K), (B, K) -> (B, K)`` float32."""
    p = probs.detach().float().clamp(ELR_CLAMP, 1 - ELR_CLAMP)
    return beta * targets.float() + (1 - beta) * p / p.sum(1, keepdim=True)


def elr_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """ELR's regulariser ``mean_i log(1 - <t_i, p_i>)`` (p clamped as in :func:`elr_targets_update`).

    Minimising it raises ``<t_i, p_i>``: the posterior is pulled towards the target; the gradient
    grows as ``<t, p>`` nears 1, i.e. it is strongest where the network already agrees with
    its early predictions and a wrong label would have to pull it away.

    Args:
        logits: ``(B, K)``, gradient flows.
        targets: ``(B, K)`` detached targets (rows of the running average).
    """
    p = logits.float().softmax(1).clamp(ELR_CLAMP, 1 - ELR_CLAMP)
    return torch.log(1 - (targets.detach().float() * p).sum(1)).mean()


def class_thresholds(probs: Tensor) -> Tensor:
    """The paper's threshold: per-class mean posterior over the batch. ``(B, K) -> (K,)``."""
    return batch_class_means(probs)


def select_clean(probs: Tensor, labels: Tensor, thresholds: Tensor) -> Tensor:
    """bool ``(B,)``: ``probs[i, y_i] >= thresholds[y_i]``.

    Args:
        probs: ``(B, K)`` posteriors (detached).
        labels: int64 ``(B,)`` given labels.
        thresholds: ``(K,)``.
    """
    p_label = probs.detach().float().gather(1, labels[:, None]).squeeze(1)
    return p_label >= thresholds.to(p_label.dtype)[labels]


def select_top_ratio(probs: Tensor, labels: Tensor, thresholds: Tensor, top_ratio: float) -> Tensor:
    """bool ``(B,)``: the given label's threshold-normalised posterior is within ``top_ratio`` of
    the largest: ``r[i, y_i] >= top_ratio * max_c r[i, c]`` with ``r[i, c] = probs[i, c] / thresholds[c]``.

    ``top_ratio = 1`` asks that the given label be the argmax of ``p(c) / tau_c`` (ties count as
    selected). Thresholds are clamped at 1e-12 so an empty class cannot divide by zero.

    Args:
        probs: ``(B, K)`` posteriors (detached).
        labels: int64 ``(B,)`` given labels.
        thresholds: ``(K,)`` per-class thresholds (> 0).
        top_ratio: in (0, 1].
    """
    ratio = probs.detach().float() / thresholds.detach().float().clamp_min(1e-12)[None, :]
    r_label = ratio.gather(1, labels[:, None]).squeeze(1)
    return r_label >= top_ratio * ratio.max(1).values


def supervised_loss(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    *,
    reduce_sum: Reduce = identity_reduce,
    world_size: int = 1,
    loss_fn: PerSampleLoss = per_sample_ce,
) -> Tensor:
    """Mean per-sample loss (cross-entropy: the paper) over the selected samples; over all
    samples if none is selected.

    Under DDP the gradient is averaged over ``world_size`` processes, so each process scales its
    sum by ``world_size / (global selected count)``: the result is the global batch's mean.

    Args:
        logits: ``(B, K)``; labels: int64 ``(B,)``; mask: bool ``(B,)``.
        loss_fn: per-sample loss ``(B, K), (B,) -> (B,)`` (:func:`make_sup_loss`).
    """
    ce = loss_fn(logits, labels)
    n_selected = reduce_sum(mask.sum().float())
    selected_mean = (ce * mask.float()).sum() * world_size / n_selected.clamp_min(1.0)
    # Chosen on the device: an `if` on the count would make the host wait for the GPU every step.
    return torch.where(n_selected > 0, selected_mean, ce.mean())


def consistency_loss(logits_a: Tensor, logits_b: Tensor, *, log_base: float = 2.0) -> Tensor:
    """Symmetric KL ``KL(p_a||p_b) + KL(p_b||p_a)``, summed over classes, mean over the batch.

    Computed from log-softmax: ``sum_c (p_a - p_b) * (log p_a - log p_b)``, which cannot produce
    NaN (the authors' ``log2`` of raw softmax can). Log-probabilities are clamped at -1e4 so
    that even logits that overflow stay finite; a class with p < e^-1e4 contributes 0 either way.
    ``log_base=2`` matches the authors' code (bits); ``math.e`` gives nats.

    Args:
        logits_a, logits_b: ``(B, K)``; gradient flows through both.
    """
    la = F.log_softmax(logits_a.float(), dim=1).clamp_min(-1e4)
    lb = F.log_softmax(logits_b.float(), dim=1).clamp_min(-1e4)
    sym = ((la.exp() - lb.exp()) * (la - lb)).sum(1)
    return sym.mean() / math.log(log_base)


@dataclass
class DNFERParams(MethodParams):
    """DNFER's options (``method.params``); defaults are the paper's.

    Attributes:
        alpha: weight of the consistency loss after warm-up, in [0, 1].
        warmup_epochs: epochs of plain CE on both views before selection starts.
        threshold: threshold policy (``batch_mean`` = the paper; ``fixed``, ``label_mean``,
            ``ema``, ``freematch``).
        threshold_params: options of the policy (e.g. ``value`` for fixed, ``momentum`` for ema).
        kl_log_base: logarithm base of the consistency loss (2 = the authors' code).
        sup_loss: per-sample loss of ``L_sup`` on the clean set: ``ce`` (the paper), ``gce``,
            ``sce`` (the peer methods' losses).
        sup_loss_params: options of ``sup_loss`` (GCE: ``q``; SCE: ``alpha``, ``beta``, ``A``;
            the peer methods' defaults when omitted).
        selection: ``independent`` (the paper: each view trains on its own clean set) or
            ``agree`` (both views train on the samples both views select).
        top_ratio: None (the paper) or a value in (0, 1]: a clean sample must also have its given
            label's ``p / tau`` within this factor of the largest (:func:`select_top_ratio`).
        elr_lambda: weight of the early-learning regulariser on the weak view (0 = off, the
            paper; the ELR paper uses 3 for 10 classes).
        elr_beta: momentum of ELR's per-sample targets (the ELR paper: 0.7).
        consistency_grad: ``both`` (the paper) or ``strong`` (weak-view posteriors detached).
        sup_views: ``both`` (the paper: ``(L_sup^w + L_sup^s) / 2``) or ``weak`` (``L_sup^w`` only).
        relabel_threshold: None (the paper) or a confidence in (0, 1]: unselected samples whose
            weak-view max posterior reaches it are learnt by the strong view towards the weak
            view's argmax (:func:`relabel_loss`).
    """

    alpha: float = 0.5
    warmup_epochs: int = 5
    threshold: str = "batch_mean"
    threshold_params: dict[str, Any] = field(default_factory=dict)
    kl_log_base: float = 2.0
    sup_loss: str = "ce"
    sup_loss_params: dict[str, Any] = field(default_factory=dict)
    selection: str = "independent"
    top_ratio: float | None = None
    elr_lambda: float = 0.0
    elr_beta: float = 0.7
    consistency_grad: str = "both"
    sup_views: str = "both"
    relabel_threshold: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise params_error("alpha", self.alpha, "in [0, 1]")
        if self.warmup_epochs < 0:
            raise params_error("warmup_epochs", self.warmup_epochs, ">= 0")
        if not (self.kl_log_base > 0 and self.kl_log_base != 1):
            raise params_error("kl_log_base", self.kl_log_base, "> 0 and not 1")
        if self.threshold not in THRESHOLDS:
            raise params_error("threshold", self.threshold, f"one of {choices_text(THRESHOLDS.names())}")
        try:  # the policy checks its own options (e.g. ema momentum in [0, 1))
            create_threshold(self.threshold, 2, self.threshold_params)
        except ConfigError as e:
            raise ConfigError(f"method.params.threshold_params: {e}") from None
        if self.sup_loss not in SUP_LOSSES:
            raise params_error("sup_loss", self.sup_loss, f"one of {choices_text(SUP_LOSSES)}")
        make_sup_loss(self.sup_loss, self.sup_loss_params)  # checks the loss's options
        if self.selection not in SELECTIONS:
            raise params_error("selection", self.selection, f"one of {choices_text(SELECTIONS)}")
        if self.top_ratio is not None and not 0.0 < self.top_ratio <= 1.0:
            raise params_error("top_ratio", self.top_ratio, "in (0, 1] or none")
        if self.consistency_grad not in CONSISTENCY_GRADS:
            raise params_error("consistency_grad", self.consistency_grad, f"one of {choices_text(CONSISTENCY_GRADS)}")
        if self.sup_views not in SUP_VIEWS:
            raise params_error("sup_views", self.sup_views, f"one of {choices_text(SUP_VIEWS)}")
        if not self.elr_lambda >= 0.0:
            raise params_error("elr_lambda", self.elr_lambda, ">= 0 (0 = off)")
        if not 0.0 <= self.elr_beta < 1.0:
            raise params_error("elr_beta", self.elr_beta, "in [0, 1)")
        if self.relabel_threshold is not None and not 0.0 < self.relabel_threshold <= 1.0:
            raise params_error("relabel_threshold", self.relabel_threshold, "in (0, 1] or none")


@METHODS.register
class DNFER(Method):
    """The paper's method; the threshold rule is a pluggable policy (``method.params.threshold``)."""

    name = "dnfer"
    title = "DNFER as published (Gera et al., arXiv:2208.10221)"
    shortcut_options = frozenset({"alpha", "warmup_epochs", "threshold", "threshold_params"})
    views = ("weak", "strong")
    selection_views = ("weak", "strong")
    Params = DNFERParams

    def __init__(self, *, num_classes: int, num_train: int, params: DNFERParams) -> None:
        super().__init__(num_classes=num_classes, num_train=num_train, params=params)
        self.alpha = float(params.alpha)
        self.warmup_epochs = int(params.warmup_epochs)
        # One policy per view: stateful policies (EMA) keep each view's statistics apart.
        self.thresholds = torch.nn.ModuleDict(
            {v: create_threshold(params.threshold, num_classes, params.threshold_params) for v in self.views})
        self.sup_loss_fn = make_sup_loss(params.sup_loss, params.sup_loss_params)
        if params.elr_lambda > 0:  # only then: the paper's checkpoints keep their exact state
            self.register_buffer("elr_targets", torch.zeros(num_train, num_classes))

    @classmethod
    def selection_warmup_epochs(cls, params: DNFERParams) -> int:  # type: ignore[override]
        return int(params.warmup_epochs)

    @classmethod
    def check_run(cls, params: DNFERParams, *, epochs: int) -> None:  # type: ignore[override]
        if params.warmup_epochs >= epochs:
            raise ConfigError(f"method.params.warmup_epochs ({params.warmup_epochs}) >= train.epochs ({epochs}): "
                              "DNFER would never select a sample; lower --warmup-epochs or raise --epochs")

    def training_step(self, model: torch.nn.Module, batch: TrainBatch, ctx: StepContext) -> StepResult:
        logits = self.forward_views(model, batch)
        lw, ls = logits["weak"], logits["strong"]
        y = batch.labels
        masks, probs_by_view, stats = [], {}, {}
        for view, z in (("weak", lw), ("strong", ls)):
            probs = z.detach().softmax(1)
            probs_by_view[view] = probs
            tau = self.thresholds[view](probs, y, ctx.reduce_sum)
            mask = select_clean(probs, y, tau)
            if self.params.top_ratio is not None:
                mask = mask & select_top_ratio(probs, y, tau, float(self.params.top_ratio))
            masks.append(mask)
            stats[f"threshold/{view}"] = tau.detach()
        masks = list(combine_masks(masks[0], masks[1], self.params.selection))
        sample_scores: dict[str, Tensor] = {}
        l_elr = None
        if self.params.elr_lambda > 0:
            targets = self._update_elr_targets(batch.index, probs_by_view["weak"], ctx).to(lw.device)
            l_elr = elr_loss(lw, targets)
            stats["loss/elr"] = l_elr.detach()
        if ctx.epoch < self.warmup_epochs:
            if self.params.sup_loss == "ce":  # the paper, computed exactly as published
                loss = (F.cross_entropy(lw, y) + F.cross_entropy(ls, y)) / 2
            else:  # a robust sup_loss replaces cross-entropy in the warm-up too
                loss = (self.sup_loss_fn(lw, y).mean() + self.sup_loss_fn(ls, y).mean()) / 2
            if l_elr is not None:
                loss = loss + self.params.elr_lambda * l_elr
        else:
            kw = {"reduce_sum": ctx.reduce_sum, "world_size": ctx.world_size}
            l_sup = supervised_loss(lw, y, masks[0], loss_fn=self.sup_loss_fn, **kw)
            if self.params.sup_views == "both":
                l_sup = (l_sup + supervised_loss(ls, y, masks[1], loss_fn=self.sup_loss_fn, **kw)) / 2
            if self.params.relabel_threshold is not None:
                l_relabel, relabelled = relabel_loss(
                    ls, probs_by_view["weak"], masks[0], float(self.params.relabel_threshold), **kw)
                l_sup = l_sup + l_relabel
                stats["loss/relabel"] = l_relabel.detach()
                # per-sample flag: the record splits the relabelled share by clean / noisy samples
                sample_scores["dnfer/relabelled"] = relabelled.float()
            if l_elr is not None:
                l_sup = l_sup + self.params.elr_lambda * l_elr
            target_w = lw.detach() if self.params.consistency_grad == "strong" else lw
            l_cons = consistency_loss(target_w, ls, log_base=self.params.kl_log_base)
            loss = (1 - self.alpha) * l_sup + self.alpha * l_cons
            stats["loss/sup"] = l_sup.detach()
            stats["loss/cons"] = l_cons.detach()
            # the consistency term's share of the loss: alpha * L_cons / L (0 when the loss is 0)
            stats["dnfer/cons_share"] = (self.alpha * l_cons.detach()) / loss.detach().clamp_min(1e-12)
        return StepResult(loss=loss, logits=lw.detach(), selected=torch.stack(masks, 1), stats=stats,
                          sample_scores=sample_scores)

    @torch.no_grad()
    def _update_elr_targets(self, index: Tensor, probs: Tensor, ctx: StepContext) -> Tensor:
        """Update this batch's ELR targets (every process stores every process's rows) and
        return this process's rows ``(B, K)``."""
        buf = self.elr_targets
        idx = index.to(buf.device)
        new = elr_targets_update(buf[idx], probs.to(buf.device), float(self.params.elr_beta))
        all_idx, all_new = ctx.gather(idx), ctx.gather(new)
        buf[all_idx] = all_new  # a row twice in the global batch (sampler padding): one write wins
        return new
