"""SCN: Self-Cure Network.

K. Wang, X. Peng, J. Yang, S. Lu, Y. Qiao, "Suppressing Uncertainties for Large-Scale Facial
Expression Recognition", CVPR 2020 (authors' code: github.com/kaiwang960112/Self-Cure-Network).

Per mini-batch (one view, the weak one):

- self-attention importance ``a_i = sigmoid(fc(f_i)) in (0, 1)`` from the pooled features, and
  logit weighting: the loss is cross-entropy of ``a_i * z_i`` (a positive scale, so the argmax,
  and hence evaluation through the plain model, is unchanged);
- rank regularisation: sort by ``a``; the top ``M = int(beta * B)`` form the high-importance
  group, the rest the low group; ``L_RR = max(0, margin_1 - (mean_high - mean_low))``;
- relabelling from epoch ``relabel_epoch`` (1-based, as the authors' ``--relabel_epoch``): a
  sample whose largest weighted-softmax probability beats that of its current label by more than
  ``margin_2`` takes the predicted class as its new label from then on. The paper relabels only
  the low-importance group (``relabel_scope="low"``, default); the authors' code relabels every
  sample of the batch (``relabel_scope="all"``).

Relabels live in a buffer of size ``num_train`` indexed by ``batch.index`` (-1 = keep the given
label), so they are checkpointed with the method. ``StepResult.selected`` reports the
high-importance group (column ``importance``), ``StepResult.sample_scores["scn/importance"]`` each
sample's weight ``a_i``; ``scn/relabelled`` counts the relabels made (summed over the epoch) and
``scn/relabelled_total`` the samples relabelled so far (its last value).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dnfer.methods.base import Method, MethodParams, StepContext, StepResult, TrainBatch, params_error
from dnfer.registry import METHODS


def rank_regularization(weights: Tensor, beta: float, margin: float) -> tuple[Tensor, Tensor]:
    """SCN's rank loss and the high-importance mask.

    Args:
        weights: ``(B,)`` importance weights (with gradient).
        beta: share of the batch in the high-importance group (``int(beta * B)`` samples).
        margin: required gap between the two groups' mean weights.

    Returns:
        ``(loss, high)``: scalar ``max(0, margin - (mean_high - mean_low))`` (0 when either group
        is empty) and bool ``(B,)`` membership of the high group.
    """
    b = weights.shape[0]
    tops = int(b * beta)
    high = torch.zeros(b, dtype=torch.bool, device=weights.device)
    if tops == 0 or tops == b:
        return weights.sum() * 0.0, high | (tops == b)
    order = torch.argsort(weights.detach(), descending=True)
    high[order[:tops]] = True
    gap = weights[high].mean() - weights[~high].mean()
    return F.relu(margin - gap), high


def relabel_candidates(probs: Tensor, labels: Tensor, margin: float) -> tuple[Tensor, Tensor]:
    """Which samples SCN relabels and to what: ``max_c p(c) - p(y) > margin``.

    Args:
        probs: ``(B, K)`` (detached) posteriors; labels: int64 ``(B,)`` current labels.

    Returns:
        bool ``(B,)`` mask and int64 ``(B,)`` predicted classes.
    """
    p_max, pred = probs.max(1)
    p_label = probs.gather(1, labels[:, None]).squeeze(1)
    return (p_max - p_label) > margin, pred


@dataclass
class SCNParams(MethodParams):
    """Defaults: the authors' code (paper Sec. 4: beta 0.7, margins 0.15 / 0.2).

    Attributes:
        beta: share of each batch in the high-importance group.
        margin_1: rank-regularisation margin.
        margin_2: relabelling margin.
        relabel_epoch: first epoch (1-based) with relabelling.
        relabel_scope: ``low`` (the paper: only the low-importance group) or ``all`` (authors' code).
    """

    beta: float = 0.7
    margin_1: float = 0.15
    margin_2: float = 0.2
    relabel_epoch: int = 10
    relabel_scope: str = "low"

    def __post_init__(self) -> None:
        if not 0.0 < self.beta < 1.0:
            raise params_error("beta", self.beta, "in (0, 1)")
        if not self.margin_1 >= 0:
            raise params_error("margin_1", self.margin_1, ">= 0")
        if not self.margin_2 >= 0:
            raise params_error("margin_2", self.margin_2, ">= 0")
        if self.relabel_epoch < 1:
            raise params_error("relabel_epoch", self.relabel_epoch, ">= 1 (1-based)")
        if self.relabel_scope not in ("low", "all"):
            raise params_error("relabel_scope", self.relabel_scope, "low or all")


@METHODS.register
class SCN(Method):
    """Self-Cure Network: attention-weighted logits, rank regularisation, relabelling."""

    name = "scn"
    title = "Self-Cure Network (Wang et al., CVPR 2020)"
    views = ("weak",)
    selection_views = ("importance",)
    Params = SCNParams
    stat_reductions = {"scn/relabelled": "sum", "scn/relabelled_total": "last"}

    def __init__(self, *, num_classes: int, num_train: int, params: SCNParams) -> None:
        super().__init__(num_classes=num_classes, num_train=num_train, params=params)
        # -1 = no relabel: the given label stands.
        self.register_buffer("relabels", torch.full((num_train,), -1, dtype=torch.long))
        self.attention: nn.Module | None = None

    def setup(self, model: nn.Module) -> None:
        dim = getattr(model, "module", model).feature_dim
        self.attention = nn.Sequential(nn.Linear(dim, 1), nn.Sigmoid())

    def current_labels(self, batch: TrainBatch) -> Tensor:
        """int64 ``(B,)``: relabelled class where SCN relabelled the sample, else the given label."""
        r = self.relabels[batch.index.to(self.relabels.device)].to(batch.labels.device)
        return torch.where(r >= 0, r, batch.labels)

    def training_step(self, model: nn.Module, batch: TrainBatch, ctx: StepContext) -> StepResult:
        if self.attention is None:
            raise RuntimeError("SCN.setup(model) must run before training")
        out = model(batch.views["weak"], return_features=True)
        logits = out.logits.float()
        weights = self.attention(out.features.float()).squeeze(1)  # (B,)
        weighted = weights[:, None] * logits
        y = self.current_labels(batch)
        p = self.params
        l_rr, high = rank_regularization(weights, p.beta, p.margin_1)
        loss = F.cross_entropy(weighted, y) + l_rr
        stats = {"scn/rank_loss": l_rr.detach(), "scn/weight_mean": weights.detach().mean()}
        if ctx.epoch + 1 >= p.relabel_epoch:
            mask, pred = relabel_candidates(weighted.detach().softmax(1), y, p.margin_2)
            if p.relabel_scope == "low":
                mask &= ~high
            stats["scn/relabelled"] = self._store_relabels(batch.index, mask, pred, ctx)
        stats["scn/relabelled_total"] = (self.relabels >= 0).sum().float()
        return StepResult(loss=loss, logits=logits.detach(), selected=high[:, None], stats=stats,
                          sample_scores={"scn/importance": weights.detach()})

    @torch.no_grad()
    def _store_relabels(self, index: Tensor, mask: Tensor, pred: Tensor, ctx: StepContext) -> Tensor:
        """Write this batch's relabels; under DDP every rank gets every rank's relabels.

        Returns:
            float 0-d: how many samples of the (global) batch were relabelled (each relabel
            changes the label: the predicted class beats the current one by a margin).
        """
        idx = index.to(self.relabels.device)
        if ctx.world_size == 1:
            self.relabels[idx[mask.to(idx.device)]] = pred.to(idx.device)[mask.to(idx.device)]
            return mask.sum().float()
        # A dense (3, N) sum of (class + 1, its square, count) costs a few KB per step; a sample
        # that two ranks both hold (sampler padding) is relabelled only if they agree.
        upd = torch.zeros(3, self.num_train, device=self.relabels.device, dtype=torch.float32)
        m = mask.to(idx.device)
        c = pred.to(idx.device)[m].float() + 1
        upd[0, idx[m]] = c
        upd[1, idx[m]] = c * c
        upd[2, idx[m]] = 1
        upd = ctx.reduce_sum(upd)
        count = upd[2].clamp_min(1)
        mean = upd[0] / count
        agree = (upd[2] > 0) & ((upd[1] / count - mean * mean).abs() < 1e-3)
        self.relabels[agree] = mean[agree].round().long() - 1
        return agree.sum().float()
