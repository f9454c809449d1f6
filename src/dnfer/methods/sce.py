"""Symmetric cross-entropy on the weak view.

Y. Wang, X. Ma, Z. Chen, Y. Luo, J. Yi, J. Bailey, "Symmetric Cross Entropy for Robust Learning
with Noisy Labels", ICCV 2019.

``L = alpha * CE(p, q) + beta * RCE(p, q)`` with the label distribution q = one-hot(y) and the
reverse cross-entropy ``RCE = -sum_k p_k log q_k``; ``log 0`` is replaced by a constant A < 0, so
for a one-hot label ``RCE = -A * (1 - p_y)`` (a scaled MAE, bounded and noise-tolerant).

Defaults are the paper's CIFAR-10 setting (alpha = 0.1, beta = 1.0, A = -4), the closest of its
settings to 7-8 class FER; CIFAR-100 used alpha = 6.0, beta = 0.1. The authors' code clips the
one-hot at 1e-4 instead, i.e. A = ln(1e-4) = -9.21 (same as beta x 2.3): pass ``A=-9.21`` to
match it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dnfer.methods.base import Method, MethodParams, StepContext, StepResult, TrainBatch, params_error
from dnfer.registry import METHODS


def reverse_cross_entropy(logits: Tensor, labels: Tensor, log_zero: float = -4.0) -> Tensor:
    """Per-sample RCE with ``log 0 := log_zero``: ``-log_zero * (1 - p_y)``, ``(B, K) -> (B,)``."""
    p_y = F.softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return -log_zero * (1.0 - p_y)


def sce_loss(logits: Tensor, labels: Tensor, *, alpha: float = 0.1, beta: float = 1.0,
             log_zero: float = -4.0) -> Tensor:
    """Batch-mean ``alpha * CE + beta * RCE`` (scalar)."""
    ce = F.cross_entropy(logits.float(), labels)
    return alpha * ce + beta * reverse_cross_entropy(logits, labels, log_zero).mean()


@dataclass
class SCEParams(MethodParams):
    """Attributes:
        alpha: weight of cross-entropy (0.1, the paper's CIFAR-10 value).
        beta: weight of reverse cross-entropy (1.0).
        A: the value that replaces ``log 0`` in RCE (-4, the paper; the authors' code: -9.21).
    """

    alpha: float = 0.1
    beta: float = 1.0
    A: float = -4.0

    def __post_init__(self) -> None:
        if not self.alpha >= 0:
            raise params_error("alpha", self.alpha, ">= 0")
        if not self.beta >= 0:
            raise params_error("beta", self.beta, ">= 0")
        if self.alpha + self.beta == 0:
            raise params_error("beta", self.beta, "> 0 when alpha is 0 (the loss would be 0)")
        if not self.A < 0:
            raise params_error("A", self.A, "< 0 (it stands in for log 0)")


@METHODS.register
class SCE(Method):
    """Plain supervised training with the symmetric cross-entropy."""

    name = "sce"
    title = "symmetric cross-entropy (Wang et al., ICCV 2019)"
    views = ("weak",)
    Params = SCEParams

    def __init__(self, *, num_classes: int, num_train: int, params: SCEParams) -> None:
        super().__init__(num_classes=num_classes, num_train=num_train, params=params)

    def training_step(self, model: torch.nn.Module, batch: TrainBatch, ctx: StepContext) -> StepResult:
        logits = self.forward_views(model, batch)["weak"]
        p = self.params
        loss = sce_loss(logits, batch.labels, alpha=float(p.alpha), beta=float(p.beta), log_zero=float(p.A))
        return StepResult(loss=loss, logits=logits.detach())
