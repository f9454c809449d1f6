"""Threshold policies for DNFER-style clean-sample selection: small stateful objects.

A policy maps the (detached) posteriors of one view of a mini-batch to per-class thresholds
``tau (K,)``. Statistics go through ``reduce_sum`` so that under DDP every process gets the
threshold the *global* batch gives (the paper's threshold is a property of the whole batch).
State (EMA) lives in buffers, so it is checkpointed and moved with the method.

- ``batch_mean`` (the paper, default): tau_c = mean over ALL samples of p(c).
- ``fixed``: one global constant (FixMatch-style).
- ``label_mean``: tau_c = mean of p(c) over samples LABELLED c (confident-learning style); a
  class absent from the batch falls back to the all-sample mean.
- ``ema``: exponential moving average of the batch class means (FreeMatch-style).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dnfer.errors import ConfigError
from dnfer.registry import THRESHOLDS

Reduce = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


def batch_class_means(probs: Tensor, reduce_sum: Reduce = _identity) -> Tensor:
    """Mean posterior of each class over all samples: ``(B, K) -> (K,)``, no gradient.

    Sums and the count are reduced separately so the result equals the global batch's mean.
    """
    probs = probs.detach().float()
    stats = torch.cat([probs.sum(0), probs.new_tensor([probs.shape[0]])])
    stats = reduce_sum(stats)
    return stats[:-1] / stats[-1].clamp_min(1.0)


class ThresholdPolicy(nn.Module):
    """Base: ``policy(probs (B,K), labels (B,), reduce_sum) -> tau (K,)``."""

    name: ClassVar[str] = ""

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise ConfigError(f"threshold policy {self.name!r} has no option {sorted(kwargs)[0]!r}")
        self.num_classes = num_classes

    def forward(self, probs: Tensor, labels: Tensor, reduce_sum: Reduce = _identity) -> Tensor:  # noqa: D102
        raise NotImplementedError


@THRESHOLDS.register("batch_mean")
class BatchMeanThreshold(ThresholdPolicy):
    """The paper's rule: recomputed every mini-batch from all samples; no running state."""

    name = "batch_mean"

    def forward(self, probs: Tensor, labels: Tensor, reduce_sum: Reduce = _identity) -> Tensor:
        return batch_class_means(probs, reduce_sum)


@THRESHOLDS.register("fixed")
class FixedThreshold(ThresholdPolicy):
    """One confidence threshold for every class (FixMatch uses 0.95 on max-probability)."""

    name = "fixed"

    def __init__(self, num_classes: int, value: float = 0.5) -> None:
        super().__init__(num_classes)
        if not 0.0 <= float(value) <= 1.0:
            raise ConfigError(f"fixed threshold value must be in [0, 1], got {value}")
        self.value = float(value)

    def forward(self, probs: Tensor, labels: Tensor, reduce_sum: Reduce = _identity) -> Tensor:
        return probs.new_full((self.num_classes,), self.value, dtype=torch.float32)


@THRESHOLDS.register("label_mean")
class LabelMeanThreshold(ThresholdPolicy):
    """tau_c = mean of p(c) over the batch's samples labelled c (confident learning's rule)."""

    name = "label_mean"

    def forward(self, probs: Tensor, labels: Tensor, reduce_sum: Reduce = _identity) -> Tensor:
        probs = probs.detach().float()
        onehot = torch.nn.functional.one_hot(labels, self.num_classes).float()  # (B, K)
        sums = (probs * onehot).sum(0)  # sum of p_i(c) over i labelled c
        counts = onehot.sum(0)
        all_stats = torch.cat([probs.sum(0), probs.new_tensor([probs.shape[0]])])
        reduced = reduce_sum(torch.cat([sums, counts, all_stats]))
        k = self.num_classes
        sums, counts, all_sums, n = reduced[:k], reduced[k : 2 * k], reduced[2 * k : 3 * k], reduced[3 * k]
        fallback = all_sums / n.clamp_min(1.0)
        return torch.where(counts > 0, sums / counts.clamp_min(1.0), fallback)


@THRESHOLDS.register("ema")
class EMAThreshold(ThresholdPolicy):
    """EMA of the batch class means (FreeMatch-style); starts at 1/K."""

    name = "ema"

    def __init__(self, num_classes: int, momentum: float = 0.999) -> None:
        super().__init__(num_classes)
        if not 0.0 <= float(momentum) < 1.0:
            raise ConfigError(f"ema threshold momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("tau", torch.full((num_classes,), 1.0 / num_classes))

    def forward(self, probs: Tensor, labels: Tensor, reduce_sum: Reduce = _identity) -> Tensor:
        means = batch_class_means(probs, reduce_sum).to(self.tau.device)
        if self.training and bool(torch.isfinite(means).all()):  # a NaN batch (skipped step) must not poison tau
            self.tau.mul_(self.momentum).add_(means, alpha=1.0 - self.momentum)
        return self.tau.clone()


def create_threshold(name: str, num_classes: int, params: dict[str, Any] | None = None) -> ThresholdPolicy:
    cls = THRESHOLDS.get(name)
    try:
        return cls(num_classes, **dict(params or {}))
    except TypeError as e:
        raise ConfigError(f"threshold policy {name!r}: {e}") from None
