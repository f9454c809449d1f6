"""The shared base of every training method (USB-style: one small file per algorithm).

A method turns a batch of augmented views into a loss. It is an ``nn.Module`` so that whatever
it owns — extra heads (SCN attention, RUL uncertainty), a peer network (co-teaching), threshold
state (EMA thresholds) — is trained, moved to the device and checkpointed with it.

The trainer builds a :class:`TrainBatch`, calls :meth:`Method.training_step` and owns everything
else (optimiser, precision, logging). Methods never see true labels and never pick devices.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dnfer.errors import ConfigError, choices_text


def identity_reduce(t: Tensor) -> Tensor:
    """Single-process stand-in for an all-reduce sum."""
    return t


@dataclass
class StepContext:
    """What a method may know about where training is.

    Attributes:
        epoch: 0-based epoch.
        step: global optimisation step.
        num_epochs: planned epochs.
        reduce_sum: all-reduce sum across processes (identity on one process). Methods use it
            for statistics that must be global-batch properties (DNFER's thresholds).
        world_size: number of processes sharing the global batch.
        gather: concatenate an equal-shaped tensor from every process along dim 0 (identity on
            one process; local batches are equal-sized under DDP). Methods with per-sample state
            use it so every process stores every process's updates.
    """

    epoch: int
    step: int = 0
    num_epochs: int = 1
    reduce_sum: Callable[[Tensor], Tensor] = identity_reduce
    world_size: int = 1
    gather: Callable[[Tensor], Tensor] = identity_reduce


@dataclass
class TrainBatch:
    """One mini-batch.

    Attributes:
        views: view name -> normalised float images ``(B, 3, H, W)``; holds every name in the
            method's ``views``.
        labels: int64 ``(B,)`` given (possibly noisy) labels.
        index: int64 ``(B,)`` row of each sample in the training split (per-sample state).
    """

    views: dict[str, Tensor]
    labels: Tensor
    index: Tensor


@dataclass
class StepResult:
    """What a training step returns.

    Attributes:
        loss: scalar to back-propagate.
        logits: ``(B, K)`` detached logits of the primary (weak) view, for diagnostics.
        selected: bool ``(B, V)`` samples the method trusted in each of ``selection_views``, or
            None for methods that select nothing.
        stats: scalar or ``(K,)`` tensors to log (e.g. ``threshold/weak``, ``loss/sup``),
            detached, on the logits' device. Each reaches ``metrics.jsonl`` as ``name`` with ``/``
            written ``_``, reduced over the epoch as the method's ``stat_reductions`` say (default:
            the mean over the steps that returned it). ``threshold/<view>`` entries are the
            method's selection thresholds (``threshold_<view>``).
        sample_scores: per-sample ``(B,)`` float tensors (e.g. SCN's importance weights), detached;
            the epoch keeps each sample's last value and the record gives their mean over the
            samples seen, and over clean and noisy samples apart when the truth is known.
    """

    loss: Tensor
    logits: Tensor
    selected: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)
    sample_scores: dict[str, Tensor] = field(default_factory=dict)


#: How a step statistic is reduced over an epoch (``Method.stat_reductions``): ``mean`` over the
#: steps that returned it (per-batch quantities, the default), ``sum`` (counts of events), ``last``
#: (running totals, e.g. SCN's relabelled samples so far).
STAT_REDUCTIONS = ("mean", "sum", "last")


@dataclass
class MethodParams:
    """Base of every method's options (``method.params`` in the config).

    Subclasses are dataclasses whose fields are the options with their defaults, and whose
    ``__post_init__`` checks their ranges, so an instance is always valid: a bad value is a
    ConfigError naming ``method.params.<key>``, raised when the config is validated, before any
    data is read.
    """

    def __post_init__(self) -> None:
        """Range checks; subclasses with options override it."""


@dataclass
class NoParams(MethodParams):
    """Methods without options."""


def params_error(key: str, value: Any, valid: str) -> ConfigError:
    """The one-line error for a bad option: ``method.params.KEY must be VALID, got VALUE``."""
    return ConfigError(f"method.params.{key} must be {valid}, got {value!r}")


class Method(nn.Module):
    """Base class. Subclasses set ``name``, ``views``, ``Params`` and implement ``training_step``.

    Attributes (class level):
        name: the registered name (``@METHODS.register`` reads it).
        title: one line naming the method and its paper (``dnfer train --list``, run summaries).
        views: augmented views the method needs, in forward order (``"weak"``, ``"strong"``).
        selection_views: names of the columns of ``StepResult.selected`` (empty: selects nothing).
        needs_noise_rate: the method cannot run without the (estimated) noise rate; its
            ``Params`` then has a ``noise_rate`` field, filled from ``method.noise_rate``.
        Params: dataclass of method-specific options (``method.params`` in the config).
        shortcut_options: the options that ``dnfer train``'s shortcut flags (``--alpha``,
            ``--warmup-epochs``, ``--threshold``, ``--threshold-param``) set; a shortcut is an
            error for a method that does not list its option, even when an option of the same
            name exists (SCE's ``alpha`` is a CE weight, not DNFER's consistency weight: set it
            with ``--method-param alpha=V``).
        stat_reductions: ``StepResult.stats`` name -> ``sum`` or ``last`` for statistics not
            reduced by their epoch mean (see :data:`STAT_REDUCTIONS`).
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    shortcut_options: ClassVar[frozenset[str]] = frozenset()
    views: ClassVar[tuple[str, ...]] = ("weak",)
    selection_views: ClassVar[tuple[str, ...]] = ()
    needs_noise_rate: ClassVar[bool] = False
    Params: ClassVar[type[MethodParams]] = NoParams
    stat_reductions: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        bad = {k: v for k, v in cls.stat_reductions.items() if v not in STAT_REDUCTIONS}
        if bad:  # a programming error in the method, caught at import
            raise TypeError(f"{cls.__name__}.stat_reductions: {bad} (valid: {', '.join(STAT_REDUCTIONS)})")

    def __init__(self, *, num_classes: int, num_train: int, params: MethodParams) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_train = num_train
        self.params = params

    @classmethod
    def selection_warmup_epochs(cls, params: MethodParams) -> int:
        """Epochs at the start whose selections do not steer training (DNFER's warm-up); the
        audit's selection rate leaves them out."""
        return 0

    @classmethod
    def check_run(cls, params: MethodParams, *, epochs: int) -> None:
        """Checks of the options against the rest of the run (called by ``Config.validate``, before
        any data is read); raises ConfigError. Default: nothing to check."""

    def setup(self, model: nn.Module) -> None:
        """Called once with the model before the optimiser is built (e.g. to copy it)."""

    def training_step(self, model: nn.Module, batch: TrainBatch, ctx: StepContext) -> StepResult:
        raise NotImplementedError

    def parameter_groups(self, lr: float, head_lr: float) -> list[dict[str, Any]]:
        """Optimiser groups for the method's own parameters (default: all at the head's rate).

        Override when the method owns a backbone (co-teaching's peer network).
        """
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": head_lr}] if params else []

    def on_epoch_end(self, epoch: int) -> None:
        """Hook for per-epoch state updates (e.g. co-teaching's forget-rate schedule)."""

    def forward_views(self, model: nn.Module, batch: TrainBatch) -> dict[str, Tensor]:
        """Run every view through ``model`` as ONE concatenated batch; logits ``(B, K)`` per view.

        One pass halves the kernel launches and keeps the weights hot in cache; BatchNorm then
        sees the statistics of both views together.
        """
        xs = [batch.views[v] for v in self.views]
        logits = model(torch.cat(xs)) if len(xs) > 1 else model(xs[0])
        return dict(zip(self.views, logits.float().split([x.shape[0] for x in xs]), strict=True))


def parse_params(method_cls: type[Method], raw: dict[str, Any] | None, *,
                 noise_rate: float | None = None) -> MethodParams:
    """Build and check ``method_cls.Params`` from ``method.params`` (plus ``method.noise_rate``).

    Unknown keys are an error listing the valid ones; values are converted to the fields' types
    (``--method-param q=0.5`` arrives as text) and range-checked by the Params' ``__post_init__``.
    A method whose Params has ``noise_rate`` gets ``method.noise_rate`` unless its params set it.
    """
    from dnfer.config import coerce_value

    raw = dict(raw or {})
    fields = {f.name: f for f in dataclasses.fields(method_cls.Params)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        valid = choices_text(list(fields)) or "(none)"
        raise ConfigError(f"method {method_cls.name!r} has no option {unknown[0]!r} (method.params.{unknown[0]}); "
                          f"its options: {valid}")
    if "noise_rate" in fields and noise_rate is not None:
        if raw.get("noise_rate", noise_rate) != noise_rate:
            raise ConfigError(f"method.noise_rate={noise_rate} and method.params.noise_rate={raw['noise_rate']} "
                              "disagree; give one")
        raw["noise_rate"] = noise_rate
    hints = typing.get_type_hints(method_cls.Params)
    values = {k: coerce_value(v, hints[k], f"method.params.{k}") for k, v in raw.items()}
    return method_cls.Params(**values)
