"""RUL: Relative Uncertainty Learning.

Y. Zhang, C. Wang, W. Deng, "Relative Uncertainty Learning for Facial Expression Recognition",
NeurIPS 2021 (authors' code: github.com/zyh-uaiaaaa/Relative-Uncertainty-Learning).

An uncertainty branch maps each sample's features to a positive scalar ``s_i`` (the mean of
``exp`` of a learned log-variance vector). Each sample is paired with a random partner
``j = perm(i)`` of the same batch and their features are mixed with the relative weights

    ``w_i = s_i / (s_i + s_j)``,  ``w_j = s_j / (s_i + s_j)``,  ``m_i = w_i f_i + w_j f_j``,

and the classifier is trained with the "add-up" loss ``(CE(h(m_i), y_i) + CE(h(m_i), y_j)) / 2``.
To satisfy both labels from one mixture the network must give the easier (more confident)
sample the larger weight, so ``s`` becomes a learned, relative (batch-wise) uncertainty.

Adaptation (documented in docs/methods.md): the authors mix a 64-d embedding computed from the
flattened 7x7 feature map (BatchNorm + dropout 0.4 + linear + BatchNorm) and classify it with a
separate linear layer. Here the mixture is of the model's pooled features and the classifier is
the model's own head, so evaluating the plain model (``head(pool(f(x)))``) is RUL's test-time
path; the uncertainty branch reads the pooled features (image-size independent) with the same
BatchNorm/dropout/linear/BatchNorm layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dnfer.methods.base import Method, MethodParams, StepContext, StepResult, TrainBatch, params_error
from dnfer.registry import METHODS


def uncertainty_mixup(features: Tensor, weights: Tensor, perm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mix each sample with its partner by relative weights.

    Args:
        features: ``(B, D)``; weights: ``(B,)`` positive uncertainty values ``s``;
        perm: int64 ``(B,)`` partner of each sample.

    Returns:
        ``(mixed (B, D), w_self (B,), w_partner (B,))`` with ``w_self + w_partner = 1``.
    """
    denom = weights + weights[perm]
    w_self = weights / denom
    w_partner = weights[perm] / denom
    mixed = w_self[:, None] * features + w_partner[:, None] * features[perm]
    return mixed, w_self, w_partner


def add_up_loss(logits: Tensor, labels: Tensor, perm: Tensor) -> Tensor:
    """``(CE(logits, y) + CE(logits, y[perm])) / 2`` (scalar)."""
    logits = logits.float()
    return 0.5 * F.cross_entropy(logits, labels) + 0.5 * F.cross_entropy(logits, labels[perm])


@dataclass
class RULParams(MethodParams):
    """Defaults: the authors' code.

    Attributes:
        uncertainty_dim: width of the log-variance vector whose ``exp`` is averaged (64).
        dropout: dropout before the branch's linear layer (0.4).
    """

    uncertainty_dim: int = 64
    dropout: float = 0.4

    def __post_init__(self) -> None:
        if self.uncertainty_dim < 1:
            raise params_error("uncertainty_dim", self.uncertainty_dim, ">= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise params_error("dropout", self.dropout, "in [0, 1)")


@METHODS.register
class RUL(Method):
    """Relative uncertainty learning: uncertainty-weighted feature mixup + add-up loss."""

    name = "rul"
    title = "Relative Uncertainty Learning (Zhang et al., NeurIPS 2021)"
    views = ("weak",)
    Params = RULParams

    def __init__(self, *, num_classes: int, num_train: int, params: RULParams) -> None:
        super().__init__(num_classes=num_classes, num_train=num_train, params=params)
        self.log_var: nn.Module | None = None

    def setup(self, model: nn.Module) -> None:
        dim = getattr(model, "module", model).feature_dim
        p = self.params
        self.log_var = nn.Sequential(
            nn.BatchNorm1d(dim, eps=2e-5, affine=False), nn.Dropout(p.dropout),
            nn.Linear(dim, p.uncertainty_dim), nn.BatchNorm1d(p.uncertainty_dim, eps=2e-5))

    def parameter_groups(self, lr: float, head_lr: float) -> list[dict[str, Any]]:
        # The authors train the uncertainty branch with the backbone's (10x smaller) rate.
        params = [q for q in self.parameters() if q.requires_grad]
        return [{"params": params, "lr": lr}] if params else []

    def uncertainty(self, features: Tensor) -> Tensor:
        """``(B, D) -> (B,)`` positive relative-uncertainty weights ``mean(exp(log_var))``."""
        if self.log_var is None:
            raise RuntimeError("RUL.setup(model) must run before training")
        return self.log_var(features).float().exp().mean(1)

    def training_step(self, model: nn.Module, batch: TrainBatch, ctx: StepContext) -> StepResult:
        net = getattr(model, "module", model)
        out = model(batch.views["weak"], return_features=True)
        features, y = out.features.float(), batch.labels
        b = features.shape[0]
        if b < 2:  # BatchNorm cannot train on one sample and there is no partner to mix with
            loss = F.cross_entropy(out.logits.float(), y)
            return StepResult(loss=loss, logits=out.logits.detach().float())
        s = self.uncertainty(features)
        perm = torch.randperm(b, device=features.device)
        mixed, w_self, _ = uncertainty_mixup(features, s, perm)
        # The head is called directly on the mixture; under DDP its parameters still get their
        # gradient hooks (same Parameter objects), so gradient sync is unaffected.
        logits_mix = net.head(net.dropout(mixed.to(net.head.weight.dtype)))
        loss = add_up_loss(logits_mix, y, perm)
        # per-sample uncertainty: the record compares its mean over clean and noisy samples
        return StepResult(loss=loss, logits=out.logits.detach().float(),
                          stats={"rul/weight_self_mean": w_self.detach().mean()},
                          sample_scores={"rul/uncertainty": s.detach()})
