"""Generalized cross-entropy (the L_q loss) on the weak view.

Z. Zhang, M. R. Sabuncu, "Generalized Cross Entropy Loss for Training Deep Neural Networks with
Noisy Labels", NeurIPS 2018.

``L_q(z, y) = (1 - p_y^q) / q`` with ``p = softmax(z)``: q -> 0 gives cross-entropy, q = 1 the
(noise-robust, slow-to-train) mean absolute error; the paper's default is q = 0.7. The paper's
truncated variant (L_q with a per-sample pruning threshold k) is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dnfer.methods.base import Method, MethodParams, StepContext, StepResult, TrainBatch, params_error
from dnfer.registry import METHODS


def gce_loss(logits: Tensor, labels: Tensor, q: float) -> Tensor:
    """Per-sample L_q loss ``(1 - p_y^q) / q``: ``(B, K), (B,) -> (B,)``.

    Computed as ``-expm1(q * log p_y) / q``: the gradient stays finite when ``p_y`` underflows
    to 0 (``p^q`` itself has an infinite derivative at 0 for q < 1), and small q does not lose
    the value to cancellation in ``1 - p^q``.
    """
    log_py = F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
    return -torch.expm1(q * log_py) / q


@dataclass
class GCEParams(MethodParams):
    """Attributes:
        q: exponent in (0, 1]; the paper's default 0.7.
    """

    q: float = 0.7

    def __post_init__(self) -> None:
        if not 0.0 < self.q <= 1.0:
            raise params_error("q", self.q, "in (0, 1]")


@METHODS.register
class GCE(Method):
    """Plain supervised training with the L_q loss instead of cross-entropy."""

    name = "gce"
    title = "generalized cross-entropy (Zhang & Sabuncu, NeurIPS 2018)"
    views = ("weak",)
    Params = GCEParams

    def __init__(self, *, num_classes: int, num_train: int, params: GCEParams) -> None:
        super().__init__(num_classes=num_classes, num_train=num_train, params=params)

    def training_step(self, model: torch.nn.Module, batch: TrainBatch, ctx: StepContext) -> StepResult:
        logits = self.forward_views(model, batch)["weak"]
        loss = gce_loss(logits, batch.labels, float(self.params.q)).mean()
        return StepResult(loss=loss, logits=logits.detach())
