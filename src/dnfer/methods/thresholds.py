"""Threshold policies for DNFER-style clean-sample selection: small stateful objects.

A policy maps the (detached) posteriors of one view of a mini-batch to per-class thresholds
``tau (K,)``. Statistics go through ``reduce_sum`` so that under DDP every process gets the
threshold the *global* batch gives (the paper's threshold is a property of the whole batch).
State (EMA) lives in buffers, so it is checkpointed and moved with the method.

- ``batch_mean`` (the paper, default): tau_c = mean over ALL samples of p(c).
- ``fixed``: one global constant (FixMatch-style).
- ``label_mean``: tau_c = mean of p(c) over samples LABELLED c (confident-learning style); a
  class absent from the batch falls back to the all-sample mean.
- ``ema``: exponential moving average of the batch class means (the class-wise half of
  FreeMatch's threshold, without its global scale).
- ``freematch``: FreeMatch's self-adaptive threshold (Wang et al., ICLR 2023): an EMA of the
  batch's mean max-probability (global confidence) times the EMA of the class means normalised
  by its largest entry.

How they differ from the papers they are named after: FixMatch and FreeMatch threshold the
MAX probability against the pseudo-label of unlabelled data; confident learning thresholds
out-of-sample probabilities of the whole dataset. Here every policy only produces ``tau (K,)``;
DNFER's rule stays ``p_i(y_i) >= tau[y_i]`` with the GIVEN label ``y_i`` (docs/methods.md).
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
    # new_full fills on the device; new_tensor([...]) would be a blocking host-to-device copy per step
    stats = torch.cat([probs.sum(0), probs.new_full((1,), probs.shape[0])])
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


@THRESHOLDS.register
class BatchMeanThreshold(ThresholdPolicy):
    """The paper's rule: recomputed every mini-batch from all samples; no running state."""

    name = "batch_mean"

    def forward(self, probs: Tensor, labels: Tensor, reduce_sum: Reduce = _identity) -> Tensor:
        return batch_class_means(probs, reduce_sum)


@THRESHOLDS.register
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


@THRESHOLDS.register
class LabelMeanThreshold(ThresholdPolicy):
    """tau_c = mean of p(c) over the batch's samples labelled c (confident learning's rule)."""

    name = "label_mean"

    def forward(self, probs: Tensor, labels: Tensor, reduce_sum: Reduce = _identity) -> Tensor:
        probs = probs.detach().float()
        onehot = torch.nn.functional.one_hot(labels, self.num_classes).float()  # (B, K)
        sums = (probs * onehot).sum(0)  # sum of p_i(c) over i labelled c
        counts = onehot.sum(0)
        all_stats = torch.cat([probs.sum(0), probs.new_full((1,), probs.shape[0])])
        reduced = reduce_sum(torch.cat([sums, counts, all_stats]))
        k = self.num_classes
        sums, counts, all_sums, n = reduced[:k], reduced[k : 2 * k], reduced[2 * k : 3 * k], reduced[3 * k]
        fallback = all_sums / n.clamp_min(1.0)
        return torch.where(counts > 0, sums / counts.clamp_min(1.0), fallback)


@THRESHOLDS.register
class EMAThreshold(ThresholdPolicy):
    """EMA of the batch class means (FreeMatch's local estimate); starts at 1/K.

    ``tau_t = m * tau_{t-1} + (1 - m) * mean_j p_j``, updated with every batch before it is used
    (as in FreeMatch). With the default ``momentum=0.999`` it needs thousands of steps to move
    away from 1/K: ``1 - m^t`` of the way after t steps (about 0.2 after 225 steps), so on short
    runs it behaves like a fixed threshold of 1/K.
    """

    name = "ema"

    def __init__(self, num_classes: int, momentum: float = 0.999) -> None:
        super().__init__(num_classes)
        if not 0.0 <= float(momentum) < 1.0:
            raise ConfigError(f"ema threshold momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("tau", torch.full((num_classes,), 1.0 / num_classes))

    def forward(self, probs: Tensor, labels: Tensor, reduce_sum: Reduce = _identity) -> Tensor:
        means = batch_class_means(probs, reduce_sum).to(self.tau.device)
        if self.training:  # a NaN batch (a skipped step) must not poison tau; decided on the device (no sync)
            updated = self.tau.mul(self.momentum).add_(means, alpha=1.0 - self.momentum)
            self.tau.copy_(torch.where(torch.isfinite(means).all(), updated, self.tau))
        return self.tau.clone()


@THRESHOLDS.register
class FreeMatchThreshold(ThresholdPolicy):
    """FreeMatch's self-adaptive threshold (Y. Wang et al., "FreeMatch: Self-adaptive Thresholding
    for Semi-supervised Learning", ICLR 2023, Eq. 5-7).

    Per batch, with posteriors ``p (B, K)`` and momentum m (0.999 in the paper):

    - global confidence ``g_t = m * g_{t-1} + (1 - m) * mean_j max_c p_j(c)``;
    - class means ``q_t = m * q_{t-1} + (1 - m) * mean_j p_j`` (K,);
    - ``tau_t(c) = q_t(c) / max_c' q_t(c') * g_t``.

    Both start at 1/K as in the paper, so early thresholds are low. State lives in buffers
    (checkpointed); statistics go through ``reduce_sum`` so DDP ranks share one threshold.
    """

    name = "freematch"

    def __init__(self, num_classes: int, momentum: float = 0.999) -> None:
        super().__init__(num_classes)
        if not 0.0 <= float(momentum) < 1.0:
            raise ConfigError(f"freematch threshold momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("global_conf", torch.tensor(1.0 / num_classes))
        self.register_buffer("class_means", torch.full((num_classes,), 1.0 / num_classes))

    def forward(self, probs: Tensor, labels: Tensor, reduce_sum: Reduce = _identity) -> Tensor:
        probs = probs.detach().float()
        stats = torch.cat([probs.sum(0), probs.max(1).values.sum()[None], probs.new_full((1,), probs.shape[0])])
        stats = reduce_sum(stats).to(self.class_means.device)
        n = stats[-1].clamp_min(1.0)
        means, conf = stats[: self.num_classes] / n, stats[self.num_classes] / n
        if self.training:
            m = self.momentum
            self.global_conf.mul_(m).add_(conf, alpha=1.0 - m)
            self.class_means.mul_(m).add_(means, alpha=1.0 - m)
        return self.class_means / self.class_means.max().clamp_min(1e-12) * self.global_conf


def create_threshold(name: str, num_classes: int, params: dict[str, Any] | None = None) -> ThresholdPolicy:
    cls = THRESHOLDS.get(name)
    try:
        return cls(num_classes, **dict(params or {}))
    except TypeError as e:
        raise ConfigError(f"threshold policy {name!r}: {e}") from None
