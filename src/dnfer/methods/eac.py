"""EAC: Erasing Attention Consistency.

Y. Zhang, C. Wang, X. Ling, W. Deng, "Learn From All: Erasing Attention Consistency for Noisy
Label Facial Expression Recognition", ECCV 2022 (authors' code:
github.com/zyh-uaiaaaa/Erasing-Attention-Consistency).

Per mini-batch, from the trainer's weak view ``x``:

- ``x1 = erase(x)`` and ``x2 = erase(flip(x))`` with independent random erasing (the authors'
  noisy-label loader erases the image and its flipped copy independently; torchvision
  ``RandomErasing`` defaults: p = 0.5, area 2-25 %, aspect ratio 0.3-3.3, value 0 in normalised
  space);
- class activation maps ``M_k = sum_d W[k, d] * F_d`` from the last feature map ``F (B, D, h, w)``
  and the classifier weight ``W (K, D)``, with no gradient into W (as the authors');
- ``L = CE(z(x1), y) + lambda * MSE(M(x1), flip(M(x2)))``, lambda = 5 (the authors' ``--lam``).

The consistency term needs no noise rate and no clean-sample selection: it keeps the network from
memorising noisy labels through flip-inconsistent (spurious) attention. The two copies go through
the model as one concatenated batch (BatchNorm sees both; the authors ran two passes).
Erasing uses torch ops and the global torch RNG, which the trainer seeds and checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dnfer.methods.base import Method, MethodParams, StepContext, StepResult, TrainBatch, params_error
from dnfer.registry import METHODS


def random_erasing(x: Tensor, *, p: float = 0.5, scale: tuple[float, float] = (0.02, 0.25),
                   ratio: tuple[float, float] = (0.3, 3.3), value: float = 0.0) -> Tensor:
    """Per-sample random erasing of a batch ``(B, C, H, W)`` (a new tensor; ``x`` is untouched).

    torchvision's ``RandomErasing`` draws one box per call, i.e. one per batch when given a
    batch; this draws an independent box per image, vectorised. Box area ~ U(scale) * H * W and
    log aspect ratio ~ U(log ratio); a box that does not fit is clipped to the image (torchvision
    retries up to 10 times instead — a small difference at the extreme ratios).
    """
    b, _, h, w = x.shape
    dev = x.device
    apply = torch.rand(b, device=dev) < p
    area = torch.empty(b, device=dev).uniform_(*scale) * (h * w)
    log_r = torch.empty(b, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    r = torch.exp(log_r)
    eh = torch.sqrt(area * r).round().clamp(1, h)
    ew = torch.sqrt(area / r).round().clamp(1, w)
    top = (torch.rand(b, device=dev) * (h - eh + 1)).floor()
    left = (torch.rand(b, device=dev) * (w - ew + 1)).floor()
    rows = torch.arange(h, device=dev)[None, :]
    cols = torch.arange(w, device=dev)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + eh)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + ew)[:, None])  # (B, W)
    box = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]  # (B, H, W)
    return x.masked_fill(box[:, None], value)


def class_activation_maps(maps: Tensor, weight: Tensor) -> Tensor:
    """CAMs ``(B, D, h, w), (K, D) -> (B, K, h, w)``: ``sum_d weight[k, d] * maps[:, d]``."""
    return torch.einsum("bdhw,kd->bkhw", maps.float(), weight.float())


def cam_consistency_loss(cam: Tensor, cam_flipped_input: Tensor) -> Tensor:
    """MSE between the CAMs of an image and the horizontally flipped-back CAMs of its flipped copy.

    Args:
        cam: ``(B, K, h, w)`` CAMs of ``x1``; cam_flipped_input: CAMs of ``x2`` (a flipped copy).
    """
    return F.mse_loss(cam, torch.flip(cam_flipped_input, dims=[3]))


@dataclass
class EACParams(MethodParams):
    """Defaults: the authors' code.

    Attributes:
        lam: weight of the CAM consistency loss (5).
        erase_p: probability of erasing each copy (0.5, torchvision's default as used by EAC).
        erase_min, erase_max: erased share of the image area (0.02-0.25).
    """

    lam: float = 5.0
    erase_p: float = 0.5
    erase_min: float = 0.02
    erase_max: float = 0.25

    def __post_init__(self) -> None:
        if not self.lam >= 0:
            raise params_error("lam", self.lam, ">= 0")
        if not 0.0 <= self.erase_p <= 1.0:
            raise params_error("erase_p", self.erase_p, "in [0, 1]")
        if not 0.0 < self.erase_min <= 1.0:
            raise params_error("erase_min", self.erase_min, "in (0, 1]")
        if not self.erase_min <= self.erase_max <= 1.0:
            raise params_error("erase_max", self.erase_max, f"in [erase_min, 1] = [{self.erase_min}, 1]")


@METHODS.register
class EAC(Method):
    """Erasing attention consistency: CE on an erased image + flip-consistency of its CAMs."""

    name = "eac"
    title = "Erasing Attention Consistency (Zhang et al., ECCV 2022)"
    views = ("weak",)
    Params = EACParams

    def __init__(self, *, num_classes: int, num_train: int, params: EACParams) -> None:
        super().__init__(num_classes=num_classes, num_train=num_train, params=params)

    def training_step(self, model: nn.Module, batch: TrainBatch, ctx: StepContext) -> StepResult:
        p = self.params
        x = batch.views["weak"]
        kw = {"p": float(p.erase_p), "scale": (float(p.erase_min), float(p.erase_max))}
        x1 = random_erasing(x, **kw)
        x2 = random_erasing(torch.flip(x, dims=[3]), **kw)
        out = model(torch.cat([x1, x2]), return_features=True)
        b = x.shape[0]
        logits = out.logits.float()[:b]
        weight = getattr(model, "module", model).head.weight.detach()
        cams = class_activation_maps(out.maps, weight)
        l_ce = F.cross_entropy(logits, batch.labels)
        l_cam = cam_consistency_loss(cams[:b], cams[b:])
        loss = l_ce + p.lam * l_cam
        return StepResult(loss=loss, logits=logits.detach(),
                          stats={"loss/ce": l_ce.detach(), "loss/cam": l_cam.detach()})
