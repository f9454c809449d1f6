"""Co-teaching: two networks teach each other with their small-loss samples.

B. Han, Q. Yao, X. Yu, G. Niu, M. Xu, W. Hu, I. W. Tsang, M. Sugiyama, "Co-teaching: Robust
Training of Deep Neural Networks with Extremely Noisy Labels", NeurIPS 2018 (authors' code:
github.com/bhanML/Co-teaching).

Per mini-batch (same weak view for both networks): each network ranks the batch by its own
per-sample cross-entropy and keeps the ``ceil((1 - R(T)) * B)`` smallest; the MAIN network is then
updated on the samples the PEER kept, and the peer on those the main network kept. The forget
rate grows linearly to the noise rate over the first ``Tk`` epochs and stays there:
``R(T) = tau * min((T / Tk)^c, 1)`` (paper: c = 1, Tk = 10; T = 0-based epoch).

Why it needs the noise rate: ``tau`` (how many samples to drop per batch) IS the (estimated)
share of wrong labels; the method has no way of its own to find it, and the paper assumes it is
known (or estimated, e.g. from a clean validation subset). Too small keeps noisy samples, too
large throws away clean hard ones. Hence ``needs_noise_rate = True`` (``--noise-rate R``).

The peer is a deep copy of the model made in :meth:`setup`, re-initialised with a different seed
so the two disagree. ``peer_init="all"`` (default) re-draws every layer: the paper's (and the
authors' code's) two independently initialised networks. Layers loaded from ``--pretrained``
weights are the exception: both networks keep them (a peer that lost the pretraining would be a
much weaker teacher), so with a pretrained backbone the two differ by their classifiers (and any
layer the file did not hold). ``peer_init="head"`` re-draws only the classifier, also when
training from scratch. The trainer evaluates and checkpoints the main model; the peer is
checkpointed inside the method.

Differences from the authors' code: it keeps ``int((1 - R) * B)`` samples (we round up, so a
batch always keeps at least one sample) and divides the already-averaged loss by the kept count
again (a learning-rate rescaling we do not copy); its schedule is ``linspace(0, tau, Tk)``, i.e.
tau is reached at epoch Tk - 1 instead of Tk.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dnfer.errors import ConfigError
from dnfer.methods.base import Method, MethodParams, StepContext, StepResult, TrainBatch, params_error
from dnfer.registry import METHODS


def forget_rate(epoch: int, noise_rate: float, tk: int, exponent: float = 1.0) -> float:
    """``R(T) = noise_rate * min((epoch / tk)^exponent, 1)`` (0-based epoch; tk = 0: constant)."""
    if tk <= 0:
        return float(noise_rate)
    return float(noise_rate) * min((epoch / tk) ** exponent, 1.0)


def num_kept(batch_size: int, forget: float) -> int:
    """``ceil((1 - forget) * B)``, robust to float noise (0.7 * 10 is 7.000000000000001)."""
    return max(1, min(batch_size, math.ceil((1.0 - forget) * batch_size - 1e-6)))


def small_loss_mask(losses: Tensor, keep: int) -> Tensor:
    """bool ``(B,)``: the ``keep`` samples with the smallest loss (ties broken by position)."""
    order = torch.argsort(losses.detach(), stable=True)
    mask = torch.zeros_like(losses, dtype=torch.bool)
    mask[order[:keep]] = True
    return mask


def _all_pretrained(name: str, module: nn.Module, pretrained: frozenset[str]) -> bool:
    """True when every tensor ``module`` itself holds (not its children's) came from pretrained
    weights (BatchNorm's batch counter aside: files may lack it)."""
    own = [f"{name}.{k}" if name else k
           for k, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
           if k != "num_batches_tracked"]
    return bool(own) and all(k in pretrained for k in own)


def coteaching_losses(logits_main: Tensor, logits_peer: Tensor, labels: Tensor, forget: float
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The exchange step.

    Args:
        logits_main, logits_peer: ``(B, K)``; labels: int64 ``(B,)``; forget: rate in [0, 1).

    Returns:
        ``(loss_main, loss_peer, kept_by_peer, kept_by_main)``: mean CE of the main network over
        the samples the peer kept (bool ``(B,)``) and of the peer over those the main one kept.
    """
    ce_main = F.cross_entropy(logits_main.float(), labels, reduction="none")
    ce_peer = F.cross_entropy(logits_peer.float(), labels, reduction="none")
    keep = num_kept(labels.shape[0], forget)
    kept_by_main = small_loss_mask(ce_main, keep)
    kept_by_peer = small_loss_mask(ce_peer, keep)
    loss_main = ce_main[kept_by_peer].mean()
    loss_peer = ce_peer[kept_by_main].mean()
    return loss_main, loss_peer, kept_by_peer, kept_by_main


@dataclass
class CoteachingParams(MethodParams):
    """Attributes:
        tk: epochs over which the forget rate ramps up to the noise rate (paper: 10).
        exponent: c in ``(T / Tk)^c`` (paper: 1).
        peer_init: ``all`` (re-draw every layer not loaded from ``--pretrained`` weights: the
            paper's independent initialisation) or ``head`` (re-draw only the classifier).
        peer_seed_offset: the peer's initialisation seed is ``torch.initial_seed() + offset``.
        noise_rate: the (estimated) share of wrong labels, in [0, 1): the final forget rate.
            Required; the config fills it from ``method.noise_rate`` (``--noise-rate``).
    """

    tk: int = 10
    exponent: float = 1.0
    peer_init: str = "all"
    peer_seed_offset: int = 1
    noise_rate: float | None = None

    def __post_init__(self) -> None:
        if self.noise_rate is None:
            raise ConfigError("method 'coteaching' needs the noise rate: pass --noise-rate R (your estimate of "
                              "the share of wrong labels, in [0, 1))")
        if not 0.0 <= self.noise_rate < 1.0:
            raise params_error("noise_rate", self.noise_rate, "in [0, 1) (--noise-rate)")
        if self.tk < 0:
            raise params_error("tk", self.tk, ">= 0")
        if not self.exponent > 0:
            raise params_error("exponent", self.exponent, "> 0")
        if self.peer_init not in ("head", "all"):
            raise params_error("peer_init", self.peer_init, "head or all")


@METHODS.register
class CoTeaching(Method):
    """Two networks exchanging small-loss samples; needs ``--noise-rate``."""

    name = "coteaching"
    title = "Co-teaching (Han et al., NeurIPS 2018)"
    views = ("weak",)
    #: ``main``: samples the main network learned from (kept by the peer); ``peer``: the reverse.
    selection_views = ("main", "peer")
    needs_noise_rate = True
    Params = CoteachingParams

    def __init__(self, *, num_classes: int, num_train: int, params: CoteachingParams) -> None:
        super().__init__(num_classes=num_classes, num_train=num_train, params=params)
        self.peer: nn.Module | None = None

    def setup(self, model: nn.Module) -> None:
        net = getattr(model, "module", model)
        peer = copy.deepcopy(net)
        # fork_rng: the peer's draw must not shift the global stream the rest of training uses.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch.initial_seed() + int(self.params.peer_seed_offset))
            if self.params.peer_init == "head":
                targets = list(peer.head.modules())
            else:
                pretrained = getattr(net, "pretrained_keys", frozenset())
                targets = [m for name, m in peer.named_modules() if not _all_pretrained(name, m, pretrained)]
            for m in targets:
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        self.peer = peer

    def parameter_groups(self, lr: float, head_lr: float) -> list[dict[str, Any]]:
        if self.peer is None:
            return []
        head_ids = {id(q) for q in self.peer.head.parameters()}
        backbone = [q for q in self.peer.parameters() if q.requires_grad and id(q) not in head_ids]
        head = [q for q in self.peer.head.parameters() if q.requires_grad]
        return [{"params": backbone, "lr": lr}, {"params": head, "lr": head_lr}]

    def training_step(self, model: nn.Module, batch: TrainBatch, ctx: StepContext) -> StepResult:
        if self.peer is None:
            raise RuntimeError("CoTeaching.setup(model) must run before training")
        x = batch.views["weak"]
        self.peer.train(model.training)
        logits_main = model(x).float()
        logits_peer = self.peer(x).float()
        rate = forget_rate(ctx.epoch, float(self.params.noise_rate), self.params.tk, self.params.exponent)
        loss_main, loss_peer, kept_by_peer, kept_by_main = coteaching_losses(
            logits_main, logits_peer, batch.labels, rate)
        # filled on the device: a host tensor copied there would make the host wait for the GPU
        stats = {"coteaching/forget_rate": logits_main.new_full((), rate), "loss/main": loss_main.detach(),
                 "loss/peer": loss_peer.detach()}
        # The two networks share no parameters: the sum's gradient is each network's own loss's.
        return StepResult(loss=loss_main + loss_peer, logits=logits_main.detach(),
                          selected=torch.stack([kept_by_peer, kept_by_main], 1), stats=stats)
