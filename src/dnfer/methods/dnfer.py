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
)
from dnfer.methods.thresholds import batch_class_means, create_threshold
from dnfer.registry import METHODS, THRESHOLDS

Reduce = Callable[[Tensor], Tensor]


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


def supervised_loss(
    logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    *,
    reduce_sum: Reduce = identity_reduce,
    world_size: int = 1,
) -> Tensor:
    """Mean cross-entropy over the selected samples; over all samples if none is selected.

    Under DDP the gradient is averaged over ``world_size`` processes, so each process scales its
    sum by ``world_size / (global selected count)``: the result is the global batch's mean.

    Args:
        logits: ``(B, K)``; labels: int64 ``(B,)``; mask: bool ``(B,)``.
    """
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
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
    """

    alpha: float = 0.5
    warmup_epochs: int = 5
    threshold: str = "batch_mean"
    threshold_params: dict[str, Any] = field(default_factory=dict)
    kl_log_base: float = 2.0

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


@METHODS.register
class DNFER(Method):
    """The paper's method; the threshold rule is a pluggable policy (``method.params.threshold``)."""

    name = "dnfer"
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
        masks, stats = [], {}
        for view, z in (("weak", lw), ("strong", ls)):
            probs = z.detach().softmax(1)
            tau = self.thresholds[view](probs, y, ctx.reduce_sum)
            mask = select_clean(probs, y, tau)
            masks.append(mask)
            stats[f"threshold/{view}"] = tau.detach()
        if ctx.epoch < self.warmup_epochs:
            loss = (F.cross_entropy(lw, y) + F.cross_entropy(ls, y)) / 2
        else:
            kw = {"reduce_sum": ctx.reduce_sum, "world_size": ctx.world_size}
            l_sup = (supervised_loss(lw, y, masks[0], **kw) + supervised_loss(ls, y, masks[1], **kw)) / 2
            l_cons = consistency_loss(lw, ls, log_base=self.params.kl_log_base)
            loss = (1 - self.alpha) * l_sup + self.alpha * l_cons
            stats["loss/sup"] = l_sup.detach()
            stats["loss/cons"] = l_cons.detach()
            # the consistency term's share of the loss: alpha * L_cons / L (0 when the loss is 0)
            stats["dnfer/cons_share"] = (self.alpha * l_cons.detach()) / loss.detach().clamp_min(1e-12)
        return StepResult(loss=loss, logits=lw.detach(), selected=torch.stack(masks, 1), stats=stats)
