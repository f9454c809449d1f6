"""Building a run from its config: the run directory, seeding and deterministic mode, the model,
the method and the optimiser."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dnfer.config import Config
from dnfer.errors import ConfigError
from dnfer.methods.base import Method, parse_params
from dnfer.models.factory import FERNet, create_model, split_parameters
from dnfer.registry import METHODS


def default_run_dir(cfg: Config) -> Path:
    """``runs/METHOD-NOISE-sSEED`` when no ``--out`` is given."""
    noise = "noisefile" if cfg.data.noise_file else "noisematrix" if cfg.data.noise_matrix else cfg.data.noise.replace(":", "")
    return Path("runs") / f"{cfg.method.name}-{noise}-s{cfg.train.seed}"


def prepare_run_dir(run_dir: Path, main: bool) -> None:
    """Create the run directory (on the main process) and check that it is writable."""
    if not main:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {str(run_dir)!r} is not a writable directory ({e.strerror})") from None


def seed_everything(seed: int, deterministic: bool) -> Callable[[], None]:
    """Seed Python's, NumPy's and torch's RNGs; set deterministic kernels (or cuDNN's autotuner).

    Returns the callable that puts back the process-wide settings it changed (deterministic
    mode and its fill flag, ``cudnn.benchmark``, ``CUBLAS_WORKSPACE_CONFIG``); not the RNGs.
    """
    undo = _process_settings_restorer()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode would also fill every new tensor with NaN (a debugging aid against
        # reading uninitialised memory): an extra write pass over each activation, ~15% of a
        # CPU step in torch.profiler. Results do not depend on it.
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True
    return undo


def _process_settings_restorer() -> Callable[[], None]:
    """Snapshot of the process-wide settings :func:`seed_everything` changes; call to restore."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    benchmark = torch.backends.cudnn.benchmark
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")

    def restore() -> None:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]
        torch.backends.cudnn.benchmark = benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas

    return restore


def build_model(cfg: Config, num_classes: int, image_size: int, log: Callable[[str], None], *,
                trust_checkpoint: bool = False) -> FERNet:
    """The configured model, with ``--pretrained`` weights if asked (``trust_checkpoint``: allow
    pretrained files that need arbitrary unpickling; unsafe)."""
    model = create_model(cfg.model.name, num_classes, image_size=image_size, small_input=cfg.model.small_input,
                         dropout=cfg.model.dropout)
    if cfg.model.pretrained:
        from dnfer.models.pretrained import load_pretrained

        report = load_pretrained(model, cfg.model.pretrained, allow_partial=cfg.model.allow_partial_pretrained,
                                 model_name=cfg.model.name, trust=trust_checkpoint)
        log(f"pretrained {cfg.model.pretrained}: {report.summary()}")
    return model


def build_optimizer(cfg: Config, model: FERNet, method: Method) -> torch.optim.Optimizer:
    backbone, head = split_parameters(model)
    head_lr = cfg.optim.resolved_head_lr(cfg.model.pretrained)
    groups = [{"params": backbone, "lr": cfg.optim.lr}, {"params": head, "lr": head_lr}]
    groups += method.parameter_groups(cfg.optim.lr, head_lr)
    o = cfg.optim
    # PyTorch's fused kernels (one pass over all parameters, CPU and CUDA): Adam's step on ResNet-18
    # took 14 instead of 25 ms on the 2-core CPU, results within 6e-8 of the foreach kernels.
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    if o.name == "adam":
        return torch.optim.Adam(groups, weight_decay=o.weight_decay, fused=fused)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, weight_decay=o.weight_decay, fused=fused)
    return torch.optim.SGD(groups, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True, fused=fused)


__all__ = ["build_model", "build_optimizer", "default_run_dir", "prepare_run_dir", "seed_everything"]


def build_method(cfg: Config, num_classes: int, num_train: int) -> Method:
    """The configured method with its typed options (checked by ``Config.validate``)."""
    cls = METHODS.get(cfg.method.name)
    params = parse_params(cls, cfg.method.params, noise_rate=cfg.method.noise_rate)
    return cls(num_classes=num_classes, num_train=num_train, params=params)


def training_module(model: nn.Module, *, distributed: bool, device: torch.device, compile: bool) -> nn.Module:
    """What the training step calls: ``model`` under DDP when distributed, compiled if asked."""
    out: nn.Module = model
    if distributed:
        out = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        out = torch.compile(out)  # type: ignore[assignment]
    return out


def check_batch_fits(batch_size: int, num_train: int, world_size: int) -> None:
    """ConfigError when one process's share of the training split cannot fill a batch."""
    share = -(-num_train // world_size)  # training rows per process
    if batch_size > share:
        raise ConfigError(f"train.batch_size {batch_size} is larger than the training split"
                          f" ({num_train} rows{f' = {share} per process' if world_size > 1 else ''});"
                          f" use --batch-size <= {share}")
