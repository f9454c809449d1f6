"""Plain cross-entropy on the weak view: the baseline every noisy-label paper reports."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dnfer.methods.base import Method, StepContext, StepResult, TrainBatch
from dnfer.registry import METHODS


@METHODS.register
class CrossEntropy(Method):
    """Standard supervised training; trusts every label."""

    name = "ce"
    title = "cross-entropy (the baseline)"
    views = ("weak",)

    def training_step(self, model: torch.nn.Module, batch: TrainBatch, ctx: StepContext) -> StepResult:
        logits = self.forward_views(model, batch)["weak"]
        return StepResult(loss=F.cross_entropy(logits, batch.labels), logits=logits.detach())
