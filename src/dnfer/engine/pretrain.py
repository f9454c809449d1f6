"""Backbone pretraining (``dnfer pretrain``): identity classification or self-supervision.

The FER papers, DNFER included, start from a ResNet-18 trained to recognise faces on
MS-Celeb-1M; that file cannot be redistributed. :func:`pretrain` makes the analogue for any
registered backbone and writes ``OUT/backbone.safetensors``, which ``dnfer train --pretrained``
loads with a clean report (every backbone tensor matched, the classifier new). docs/pretrain.md.

Objectives:

- ``identity``: softmax cross-entropy over identities (``margin`` 0, as the FER community's
  MS-Celeb ``res18_naive`` model), or CosFace (``margin`` > 0: ``s * (cos - m)`` at the target,
  Wang et al. 2018, https://arxiv.org/abs/1801.09414) — :class:`IdentityHead`.
- ``ssl``: VICReg (Bardes et al. 2022, https://arxiv.org/abs/2105.04906) on two independent
  strong views (:class:`PairBatches`) through a 3-layer expander — :func:`vicreg_loss`.

Same machinery as training: device/precision from :mod:`dnfer.engine.device` (bf16 autocast,
channels_last), seeded batches that are pure functions of ``(seed, epoch, step)``
(:class:`~dnfer.engine.batches.TrainBatches`), DDP under torchrun, atomic rotated checkpoints
of plain data (``torch.load(weights_only=True)`` reads them) and exact ``--resume``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dnfer.data.identity import ImageSet
from dnfer.engine import distributed as dist_utils
from dnfer.engine.batches import AugmentSettings, TrainBatches, gather_uint8, step_seed
from dnfer.engine.checkpoint import rotate_and_save
from dnfer.engine.device import Precision, default_channels_last, resolve_device, resolve_precision
from dnfer.errors import ConfigError, DnferError
from dnfer.io_safety import RunLock, atomic_path, check_output_dir, sweep_temporaries, write_text_atomic
from dnfer.models.factory import FERNet, create_model

OBJECTIVES = ("identity", "ssl")
CHECKPOINT_FORMAT = "dnfer-pretrain-checkpoint"
BACKBONE_FORMAT = "dnfer-backbone"
BACKBONE_FILE = "backbone.safetensors"
#: ``--epochs`` when not given. identity: 15 (on the synthetic identity mode, 15 epochs gave a
#: better fine-tune than 10 at every seed tried; docs/pretrain.md); ssl: 10 (a VICReg step costs
#: ~3.3x an identity step per image).
DEFAULT_EPOCHS = {"identity": 15, "ssl": 10}


@dataclass
class PretrainSettings:
    """Everything a pretraining run depends on (saved in the checkpoint and the backbone file).

    ``image_size`` None: 64 for ``synthetic``, 224 otherwise (as ``dnfer train``). ``epochs``
    None: :data:`DEFAULT_EPOCHS` of the objective (identity 15, ssl 10). ``identities``
    x ``images_per_identity``: the synthetic identity mode's size. ``margin`` 0: softmax CE;
    > 0: CosFace with ``scale``. ``expander_dim`` None: 4x the backbone's feature width (VICReg's
    ratio). ``probe_data`` None: no linear probe.
    """

    objective: str = "identity"
    data: str = "synthetic"
    data_options: dict[str, str] = field(default_factory=dict)
    model: str = "resnet10_slim"
    image_size: int | None = None
    epochs: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 1
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    identities: int = 500
    images_per_identity: int = 20
    margin: float = 0.0
    scale: float = 30.0
    expander_dim: int | None = None
    probe_data: str | None = "synthetic"
    probe_options: dict[str, str] = field(default_factory=dict)
    progress: bool = True

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective {self.objective!r}: valid are {', '.join(OBJECTIVES)}")
        checks = [
            (self.epochs is None or self.epochs >= 1, f"--epochs {self.epochs}: must be >= 1"),
            (self.batch_size >= 2, f"--batch-size {self.batch_size}: must be >= 2 (batch statistics)"),
            (self.lr > 0, f"--lr {self.lr}: must be > 0"),
            (self.weight_decay >= 0, f"--weight-decay {self.weight_decay}: must be >= 0"),
            (self.warmup_epochs >= 0, f"--warmup-epochs {self.warmup_epochs}: must be >= 0"),
            (self.identities >= 2, f"--identities {self.identities}: must be >= 2"),
            (self.images_per_identity >= 1, f"--images-per-identity {self.images_per_identity}: must be >= 1"),
            (0 <= self.margin < 1, f"--margin {self.margin}: must be in [0, 1) (0 = softmax, 0.2-0.35 = CosFace)"),
            (self.scale > 0, f"--scale {self.scale}: must be > 0"),
            (self.image_size is None or 8 <= self.image_size <= 1024,
             f"--image-size {self.image_size}: must be between 8 and 1024"),
            (self.expander_dim is None or self.expander_dim >= 2, f"--expander-dim {self.expander_dim}: must be >= 2"),
            (self.threads is None or self.threads >= 1, f"--threads {self.threads}: must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def resolved_epochs(self) -> int:
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS.get(self.objective, 10)

    def resolved_image_size(self) -> int:
        if self.image_size is not None:
            return self.image_size
        return 64 if self.data.split(":", 1)[0].strip().lower() == "synthetic" else 224


# --- objectives -------------------------------------------------------------------------------


class IdentityHead(nn.Module):
    """Identity logits ``(B, N)`` from features ``(B, D)``.

    ``margin`` 0: a linear layer (softmax CE). ``margin`` m > 0: CosFace,
    ``scale * (cos(w_k, f) - m [k == y])`` with unit-normalised weights and features; the
    margin applies only when ``labels`` are given (training).
    """

    def __init__(self, feature_dim: int, num_identities: int, *, margin: float = 0.0, scale: float = 30.0) -> None:
        super().__init__()
        self.margin, self.scale = float(margin), float(scale)
        self.linear = nn.Linear(feature_dim, num_identities, bias=margin == 0)

    def forward(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.margin == 0:
            return self.linear(features)
        cos = F.linear(F.normalize(features.float(), dim=1), F.normalize(self.linear.weight.float(), dim=1))
        if labels is not None:
            cos = cos - self.margin * F.one_hot(labels, cos.shape[1]).to(cos.dtype)
        return self.scale * cos


class Expander(nn.Module):
    """VICReg's expander: Linear-BN-ReLU, Linear-BN-ReLU, Linear; ``(B, D) -> (B, E)``."""

    def __init__(self, feature_dim: int, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(feature_dim, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
            nn.Linear(width, width))

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features)


class _FullGather(torch.autograd.Function):
    """All ranks' ``(B, E)`` concatenated; backward sums the gradient over ranks and returns this
    rank's slice (VICReg's reference ``FullGatherLayer``: every rank's loss uses every row)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows:(dist.get_rank() + 1) * rows]


def _gather_with_grad(t: Tensor) -> Tensor:
    """``t`` of every rank concatenated along dim 0, differentiable (identity in one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    return _FullGather.apply(t)


def vicreg_loss(z1: Tensor, z2: Tensor, *, sim_weight: float = 25.0, var_weight: float = 25.0,
                cov_weight: float = 1.0, eps: float = 1e-4) -> tuple[Tensor, dict[str, float]]:
    """VICReg loss of embeddings ``z1``, ``z2`` ``(B, E)`` of two views of the same images.

    invariance = mean squared difference; variance = mean over dimensions of
    ``relu(1 - sqrt(var + eps))`` (averaged over the two branches); covariance = sum of squared
    off-diagonal covariances / E (summed over the branches). Weights 25/25/1 as the paper. Under
    DDP the variance and covariance use the global batch (as the reference implementation).
    Returns the weighted sum and the three terms.
    """
    z1, z2 = z1.float(), z2.float()
    invariance = F.mse_loss(z1, z2)
    z1, z2 = _gather_with_grad(z1), _gather_with_grad(z2)
    n, dim = z1.shape
    z1, z2 = z1 - z1.mean(0), z2 - z2.mean(0)
    variance = (F.relu(1 - torch.sqrt(z1.var(0) + eps)).mean() + F.relu(1 - torch.sqrt(z2.var(0) + eps)).mean()) / 2
    off_diagonal = ~torch.eye(dim, dtype=torch.bool, device=z1.device)
    covariance = sum(((z.T @ z) / (n - 1))[off_diagonal].pow(2).sum() / dim for z in (z1, z2))
    loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    return loss, {"invariance": float(invariance.detach()), "variance": float(variance.detach()),
                  "covariance": float(covariance.detach())}


class PretrainNet(nn.Module):
    """The backbone (a :class:`FERNet`, whose own classifier is unused) plus the objective's head.

    ``forward(x (B, 3, H, W), labels) -> (B, N)`` identity logits or ``(B, E)`` embeddings: one
    call, so DDP sees one forward per step.
    """

    def __init__(self, net: FERNet, head: nn.Module) -> None:
        super().__init__()
        self.net, self.objective_head = net, head

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        features = self.net.forward_features(x)
        if isinstance(self.objective_head, IdentityHead):
            return self.objective_head(features, labels)
        return self.objective_head(features)


class PairBatches(TrainBatches):
    """:class:`TrainBatches` whose views are two independent strong views ``a`` and ``b`` of each image."""

    def _device_batch(self, x: Tensor, idx: np.ndarray, epoch: int, step: int
                      ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        x = x.to(self.device, non_blocking=True)
        gen = torch.Generator().manual_seed(step_seed(self.seed, epoch, step, self.rank))
        strong = self.batch_aug["strong"]
        views = self._finish({"a": strong(x, generator=gen), "b": strong(x, generator=gen)})
        labels = torch.from_numpy(self.labels[idx]).to(self.device, non_blocking=True)
        return views, labels, torch.from_numpy(idx).to(self.device, non_blocking=True)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0 over the remaining steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# --- linear probe -----------------------------------------------------------------------------


@torch.no_grad()
def extract_features(net: FERNet, images: Any, *, device: torch.device, precision: Precision,
                     channels_last: bool, batch_size: int = 256) -> Tensor:
    """Pooled backbone features float32 ``(N, D)`` of uint8 images ``(N, S, S, 3)`` (eval mode)."""
    from dnfer.data.transforms import normalize

    pre = net.preprocessing
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    was_training = net.training
    net.eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = gather_uint8(images, np.arange(s, min(s + batch_size, len(images))))
        x = normalize(x.to(device), pre.mean, pre.std).contiguous(memory_format=fmt)
        with precision.autocast(device):
            out.append(net.forward_features(x).float().cpu())
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, net.feature_dim)


def fit_linear_probe(train_x: Tensor, train_y: Tensor, num_classes: int, *, weight_decay: float = 1e-4,
                     max_iter: int = 200) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS, deterministic).

    Returns ``(mean (D,), std (D,), weight (K, D), bias (K,))``: logits = ``((x - mean) / std) @ W.T + b``.
    """
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    z = (train_x - mean) / std
    linear = nn.Linear(z.shape[1], num_classes).double()
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    zd, y = z.double(), train_y.long()
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(zd), y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return mean, std, linear.weight.detach().float(), linear.bias.detach().float()


def linear_probe(net: FERNet, spec: str, *, options: dict[str, str], image_size: int, seed: int,
                 device: torch.device, precision: Precision, channels_last: bool) -> dict[str, Any]:
    """Freeze ``net``, fit a linear classifier on its features of ``spec``'s train split and
    return train/test accuracy (the standard check of a pretrained representation)."""
    from dnfer.data.spec import load_data_spec, parse_data_spec

    ds = load_data_spec(parse_data_spec(spec, options), image_size=image_size, seed=seed)
    kw = dict(device=device, precision=precision, channels_last=channels_last)
    tr, te = extract_features(net, ds.train.images, **kw), extract_features(net, ds.test.images, **kw)
    ytr, yte = torch.from_numpy(np.asarray(ds.train.labels)), torch.from_numpy(np.asarray(ds.test.labels))
    mean, std, w, b = fit_linear_probe(tr, ytr, ds.num_classes)

    def accuracy(x: Tensor, y: Tensor) -> float:
        return float(((((x - mean) / std) @ w.T + b).argmax(1) == y).float().mean()) if len(y) else float("nan")

    return {"data": spec, "options": dict(options), "train_images": len(ytr), "test_images": len(yte),
            "classes": list(ds.class_names), "train_accuracy": accuracy(tr, ytr), "test_accuracy": accuracy(te, yte)}


# --- files ------------------------------------------------------------------------------------


def backbone_state(net: FERNet) -> dict[str, Tensor]:
    """``backbone.*`` tensors of ``net``, contiguous CPU copies (what ``--pretrained`` loads)."""
    return {f"backbone.{k}": v.detach().cpu().contiguous().clone() for k, v in net.backbone.state_dict().items()}


def save_backbone(path: Path, net: FERNet, metadata: dict[str, str]) -> None:
    """Write ``backbone.*`` tensors as safetensors with string ``metadata``, atomically."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError("dnfer pretrain writes safetensors files: pip install 'dnfer[pretrain]'") from None

    with atomic_path(path) as tmp:
        save_file(backbone_state(net), str(tmp), metadata=metadata)


def read_backbone_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a backbone file, with ``settings``/``preprocessing`` parsed from JSON."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    for key in ("settings", "preprocessing", "data"):
        if key in meta:
            meta[key] = json.loads(meta[key])
    return meta


def load_resume_checkpoint(out: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The newest readable of ``out/last.pt`` / ``out/last.prev.pt`` (``weights_only`` loads), or None."""
    errors = []
    for path in (out / "last.pt", out / "last.prev.pt"):
        if not path.exists():
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
                raise ValueError("not a dnfer pretraining checkpoint")
            ckpt["path"] = str(path)
            return ckpt
        except Exception as e:  # truncated zip, unpickling errors, wrong file
            errors.append(f"{path}: {type(e).__name__}: {e}")
            log(f"warning: {path} is unreadable ({e}); trying the previous checkpoint")
    if errors:
        raise DnferError("no readable pretraining checkpoint to resume from: " + "; ".join(errors))
    return None


# --- the loop ---------------------------------------------------------------------------------


def load_images(s: PretrainSettings, image_size: int) -> ImageSet:
    from dnfer.data.identity import load_identity_set, load_unlabelled_set

    if s.objective == "identity":
        return load_identity_set(s.data, image_size=image_size, seed=s.seed, identities=s.identities,
                                 images_per_identity=s.images_per_identity, options=s.data_options)
    return load_unlabelled_set(s.data, image_size=image_size, seed=s.seed, options=s.data_options)


def pretrain(s: PretrainSettings, out: str | Path, *, resume: bool = False, log: Callable[[str], None] = print,
             stop_after_epochs: int | None = None) -> dict[str, Any]:
    """Pretrain ``s.model`` with ``s.objective``; write ``out/backbone.safetensors`` and ``out/summary.json``.

    ``stop_after_epochs`` ends the run (checkpoint written, no backbone file) after that many
    epochs, as an interruption would; ``resume`` then continues it exactly.
    Returns the summary (images/s, last epoch's loss, probe accuracies).
    """
    from dnfer.engine.cpu_tuning.host_memory import (
        release_freed_memory,
        retain_freed_memory,
        retaining_freed_memory,
        system_malloc,
        wants_retained_memory,
    )
    from dnfer.engine.cpu_tuning.small_map_conv import use_small_map_conv, wants_small_map_conv
    from dnfer.registry import MODELS

    s.validate()
    s.image_size = s.resolved_image_size()
    s.epochs = epochs = s.resolved_epochs()
    if not s.model.startswith("timm:"):
        MODELS.get(s.model)  # unknown names fail before any data is made
    out = Path(out)
    info = dist_utils.env_dist_info()
    device = resolve_device(s.device, local_rank=info.local_rank if info.enabled else None)
    created_group = dist_utils.init_distributed(info, device)
    say = log if info.is_main else (lambda _m: None)
    # As the trainer: on a CPU keep freed memory in the process (no page faults on every step's
    # activations; docs/performance.md).
    # Put the process-wide settings back afterwards, as fit() does (thread count, allocator).
    threads_before, undo_malloc = torch.get_num_threads(), None
    if wants_retained_memory("auto", device.type):
        was_retaining = retaining_freed_memory()
        if retain_freed_memory():
            undo_malloc = release_freed_memory if was_retaining else system_malloc
    lock: RunLock | None = None
    try:
        if s.threads:
            torch.set_num_threads(s.threads)
        precision = resolve_precision(s.precision, device)
        ckpt = None
        if resume:
            ckpt = load_resume_checkpoint(out, say)
            if ckpt is None:
                raise ConfigError(f"--resume: {out} has no pretraining checkpoint (last.pt) to continue")
            saved = PretrainSettings(**ckpt["settings"])
            changed = sorted(k for k in ("objective", "data", "data_options", "model", "image_size", "epochs",
                                         "batch_size", "lr", "weight_decay", "warmup_epochs", "seed", "identities",
                                         "images_per_identity", "margin", "scale", "expander_dim")
                             if getattr(saved, k) != getattr(s, k))
            if changed:
                raise ConfigError(f"--resume: {', '.join(changed)} differ from the run in {out}; "
                                  "pass the same settings (or a new --out)")
            if ckpt["world_size"] != info.world_size:
                raise ConfigError(f"--resume: the run used {ckpt['world_size']} process(es), this one "
                                  f"{info.world_size}; batches would differ")
        elif (out / "last.pt").exists() or (out / BACKBONE_FILE).exists():
            raise ConfigError(f"--out {out} already holds a pretraining run; pass --resume to continue it "
                              "or choose another --out")
        if info.is_main:  # one run per folder at a time: a second one exits 2 naming the holder
            check_output_dir(out, option="--out").mkdir(parents=True, exist_ok=True)
            lock = RunLock(out).acquire()
            sweep_temporaries(out)  # checkpoint writes of a killed run
        image_size = s.image_size
        torch.manual_seed(s.seed)
        data = load_images(s, image_size)
        share = -(-len(data) // info.world_size)
        if s.batch_size > share:
            raise ConfigError(f"--batch-size {s.batch_size} is larger than the {len(data)} pretraining images"
                              f"{f' ({share} per process)' if info.enabled else ''}")
        say(f"pretrain: {s.objective} on {data.meta.get('source')} | {len(data)} images"
            f"{f', {len(data.class_names)} identities' if s.objective == 'identity' else ''} | {image_size}px"
            f" | {s.model} | {precision.name} on {device}")

        net = create_model(s.model, 2, image_size=image_size)
        net.head = nn.Identity()  # the FER classifier is not pretrained (and DDP needs every parameter used)
        if s.objective == "identity":
            head: nn.Module = IdentityHead(net.feature_dim, len(data.class_names), margin=s.margin, scale=s.scale)
        else:
            head = Expander(net.feature_dim, s.expander_dim or 4 * net.feature_dim)
        model = PretrainNet(net, head)
        channels_last = default_channels_last(device)
        model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if wants_small_map_conv("auto", device, precision, compiled=False):
            use_small_map_conv(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay,
                                      fused=device.type in ("cpu", "cuda"))
        pre = net.preprocessing
        aug = AugmentSettings(image_size)
        batch_cls = PairBatches if s.objective == "ssl" else TrainBatches
        batches = batch_cls(data.images, data.labels, views=("strong",) if s.objective == "ssl" else ("weak",),
                            batch_size=s.batch_size, device=device, mean=pre.mean, std=pre.std,
                            aug=aug, seed=s.seed, rank=info.rank, world_size=info.world_size,
                            channels_last=channels_last)
        total_steps = epochs * len(batches)
        warmup_steps = min(s.warmup_epochs * len(batches), total_steps - 1)
        state: dict[str, Any] = {"epoch": 0, "global_step": 0, "train_seconds": 0.0, "images_seen": 0, "history": []}
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            torch.set_rng_state(ckpt["torch_rng"])
            state = ckpt["state"]
            say(f"resumed from {ckpt['path']} at epoch {state['epoch']}")
        train_model: nn.Module = model
        if info.enabled:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)

        def set_lr(step: int) -> None:
            for g in optimizer.param_groups:
                g["lr"] = s.lr * lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps)

        progress = s.progress and info.is_main
        last_epoch = epochs if stop_after_epochs is None else min(epochs, stop_after_epochs)
        for epoch in range(state["epoch"], last_epoch):
            epoch_stats = _train_epoch(train_model, batches, optimizer, set_lr, state, epoch, s, device, precision,
                                       progress)
            state["history"].append(epoch_stats)
            state["epoch"] = epoch + 1
            extra = (f" | identity acc {epoch_stats['train_accuracy']:.2%}" if "train_accuracy" in epoch_stats else
                     f" | inv {epoch_stats['invariance']:.3f} var {epoch_stats['variance']:.3f}"
                     f" cov {epoch_stats['covariance']:.3f}")
            say(f"epoch {epoch + 1}/{epochs}: loss {epoch_stats['loss']:.4f}{extra}"
                f" | {epoch_stats['images_per_second']:.0f} img/s")
            if info.is_main:
                rotate_and_save({
                    "format": CHECKPOINT_FORMAT, "settings": asdict(s), "world_size": info.world_size,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(), "state": state,
                }, out)
            dist_utils.barrier()
        summary: dict[str, Any] = {
            "objective": s.objective, "model": s.model, "image_size": image_size, "epochs_done": state["epoch"],
            "images": len(data), "train_seconds": state["train_seconds"],
            "images_per_second": state["images_seen"] / max(state["train_seconds"], 1e-9),
            "precision": precision.name, "device": str(device), "world_size": info.world_size,
            "last_epoch": state["history"][-1] if state["history"] else None, "probe": None,
        }
        if state["epoch"] < epochs:
            say(f"stopped after epoch {state['epoch']} of {epochs}; continue with --resume")
            return summary
        if info.is_main:
            metadata = {
                "format": BACKBONE_FORMAT, "model": s.model, "image_size": str(image_size), "objective": s.objective,
                "feature_dim": str(net.feature_dim), "settings": json.dumps(asdict(s), sort_keys=True),
                "preprocessing": json.dumps(net.preprocessing.to_dict()), "data": json.dumps(data.meta, default=str),
            }
            save_backbone(out / BACKBONE_FILE, net, metadata)
            say(f"wrote {out / BACKBONE_FILE} (fine-tune: dnfer train --pretrained {out / BACKBONE_FILE} "
                f"--model {s.model} --image-size {image_size})")
            if s.probe_data:
                summary["probe"] = probe = linear_probe(
                    net, s.probe_data, options=s.probe_options, image_size=image_size, seed=s.seed, device=device,
                    precision=precision, channels_last=channels_last)
                say(f"linear probe on {s.probe_data} ({', '.join(f'{k}={v}' for k, v in s.probe_options.items()) or 'defaults'}):"
                    f" test accuracy {probe['test_accuracy']:.2%} (train {probe['train_accuracy']:.2%};"
                    f" frozen backbone, logistic regression on {probe['train_images']} train images)")
            summary["backbone"] = str(out / BACKBONE_FILE)
            write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        dist_utils.barrier()
        return summary
    finally:
        if lock is not None:
            lock.release()
        torch.set_num_threads(threads_before)
        if undo_malloc is not None:
            undo_malloc()
        if created_group:
            dist_utils.cleanup()


def _train_epoch(model: nn.Module, batches: TrainBatches, optimizer: torch.optim.Optimizer,
                 set_lr: Callable[[int], None], state: dict[str, Any], epoch: int, s: PretrainSettings,
                 device: torch.device, precision: Precision, progress: bool) -> dict[str, float]:
    """One epoch of steps; updates ``state`` (global step, time, images) and returns the epoch's means."""
    from dnfer.progress import progress_bar

    model.train()
    sums: dict[str, float] = {}
    correct = seen = steps = 0
    t0 = time.perf_counter()
    # on a terminal only: a named backbone built inside `dnfer bench` logs to files
    bar = progress_bar(len(batches), f"pretrain epoch {epoch + 1}/{s.resolved_epochs()}", enabled=progress, unit="step")
    for views, labels, _ in batches.epoch(epoch):
        set_lr(state["global_step"])
        with precision.autocast(device):
            if s.objective == "identity":
                logits = model(views["weak"], labels)
                loss = F.cross_entropy(logits.float(), labels)
                terms = {}
                correct += int((logits.detach().argmax(1) == labels).sum())
            else:
                z = model(torch.cat([views["a"], views["b"]]))
                half = views["a"].shape[0]
                loss, terms = vicreg_loss(z[:half], z[half:])
        if not torch.isfinite(loss):
            raise DnferError(f"pretraining loss is {float(loss.detach())} at epoch {epoch + 1}, step {steps + 1}; "
                             "lower --lr or use --precision fp32")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = labels.shape[0]
        seen += n
        steps += 1
        state["global_step"] += 1
        for k, v in {"loss": float(loss.detach()), **terms}.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    bar.close()
    seconds = time.perf_counter() - t0
    world = batches.world_size
    state["train_seconds"] += seconds
    state["images_seen"] += seen * world
    stats = {k: v / max(steps, 1) for k, v in sums.items()}
    stats["images_per_second"] = seen * world / max(seconds, 1e-9)
    if s.objective == "identity":
        stats["train_accuracy"] = correct / max(seen, 1)  # this process's share, augmented views
    return stats
