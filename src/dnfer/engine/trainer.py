"""The training loop: ``fit`` on a few lines, over a ``_Training`` object whose methods are the
set-up, the restore, one epoch's steps and the end of an epoch.

``fit(cfg)`` prepares the data, builds model + method + optimiser, resumes if asked, then per
epoch: trains (both views in one forward pass, mixed precision), evaluates validation and test,
logs one JSON line, checkpoints atomically and keeps the best-on-validation model. Model
selection uses the validation split carved from the noisy training labels — never the test set.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dnfer.config import Config
from dnfer.data.base import FERDataset
from dnfer.data.pipeline import prepare_data, resolve_image_size
from dnfer.engine import distributed as dist_utils
from dnfer.engine.batches import AugmentSettings, TrainBatches, predict_probs
from dnfer.engine.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_save,
    find_resumable,
    remove_previous,
    rng_state,
    rotate_and_save,
    set_rng_state,
    to_numpy,
    to_plain,
)
from dnfer.engine.device import Precision, default_channels_last, resolve_device, resolve_precision
from dnfer.engine.host_memory import release_freed_memory, retain_freed_memory, wants_retained_memory
from dnfer.engine.metrics import accuracy, confusion_matrix, per_class_accuracy, selection_quality
from dnfer.engine.small_map_conv import use_small_map_conv, wants_small_map_conv
from dnfer.errors import ConfigError, DnferError
from dnfer.methods.base import Method, StepContext, TrainBatch, parse_params
from dnfer.models.factory import FERNet, create_model, split_parameters
from dnfer.registry import METHODS, load_builtins

#: Config keys that may differ between a run and its ``--resume`` (everything else must match).
#: Besides bookkeeping, the NaN-recovery knobs (nan_policy, grad_clip) may change: "stopped on a
#: NaN, resume with --nan-policy skip / --grad-clip" is the intended workflow.
RESUME_MUTABLE = {"train.epochs", "train.progress", "train.device", "train.tensorboard", "out",
                  "train.nan_policy", "optim.grad_clip", "train.save_every_steps", "train.eval_batch_size",
                  "train.threads", "data.cache", "train.small_map_conv",
                  "train.malloc", "train.keep_checkpoints"}


class NumericalError(DnferError):
    """A non-finite loss or gradient under ``nan_policy=stop``."""

    exit_code = 3


@dataclass
class EpochStats:
    """Per-epoch accumulators; per-sample arrays index the training split.

    Attributes:
        selected: int8 ``(N, V)`` selection of each sample in each view this epoch (-1 = unseen).
        probs: float16 ``(N, K)`` weak-view posterior of each sample this epoch.
    """

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    steps: int = 0
    skipped_steps: int = 0
    threshold_sums: dict[str, np.ndarray] = field(default_factory=dict)
    selected: np.ndarray | None = None
    probs: np.ndarray | None = None


def default_run_dir(cfg: Config) -> Path:
    noise = cfg.data.noise.replace(":", "") if not cfg.data.noise_file else "noisefile"
    return Path("runs") / f"{cfg.method.name}-{noise}-s{cfg.train.seed}"


def seed_everything(seed: int, deterministic: bool) -> None:
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


def build_method(cfg: Config, num_classes: int, num_train: int) -> Method:
    cls = METHODS.get(cfg.method.name)
    noise_rate = cfg.method.noise_rate
    if cls.needs_noise_rate and noise_rate is None:
        raise ConfigError(
            f"method {cls.name!r} needs the noise rate: pass --noise-rate R (your estimate of the share of wrong labels)"
        )
    params = parse_params(cls, cfg.method.params)
    return cls(num_classes=num_classes, num_train=num_train, params=params, noise_rate=noise_rate, common=cfg.method)


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
    groups = [{"params": backbone, "lr": cfg.optim.lr}, {"params": head, "lr": cfg.optim.head_lr}]
    groups += method.parameter_groups(cfg.optim.lr, cfg.optim.head_lr)
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


def check_resume_compatible(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> None:
    """Raise ConfigError naming the first setting that differs from the checkpoint's run."""
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if name in RESUME_MUTABLE:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and name not in ("data.options", "method.params"):
            check_resume_compatible(a, b, f"{name}.")
        elif a != b:
            raise ConfigError(
                f"--resume: setting {name} is {b!r} now but {a!r} in the checkpoint; "
                "resume with the original settings or start a new --out directory"
            )


def _write_text_atomic(path: Path, text: str) -> None:
    """Write via a hidden temporary file and a rename: readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsLog:
    """Appends one JSON object per epoch to ``metrics.jsonl`` (and TensorBoard scalars if asked)."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("--tensorboard needs the tensorboard package: pip install 'dnfer[tensorboard]'") from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict[str, Any], class_names: list[str]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            from dnfer.analysis.tensorboard import log_epoch

            log_epoch(self.tb, record, class_names)

    def truncate_after(self, epoch: int) -> None:
        """Drop lines of epochs > ``epoch`` (written by a run killed after its last checkpoint)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for ln in self.path.read_text().splitlines():
            try:
                if json.loads(ln)["epoch"] <= epoch:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
                continue
        _write_text_atomic(self.path, "".join(ln + "\n" for ln in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _epoch_record(epoch: int, stats: EpochStats, ds: FERDataset, views: tuple[str, ...], val_probs: np.ndarray | None,
                  test_probs: np.ndarray, lrs: list[float], seconds: float, train_images_per_s: float) -> dict[str, Any]:
    """The per-epoch diagnostics written to metrics.jsonl (accuracies as fractions)."""
    k = ds.num_classes
    rec: dict[str, Any] = {"epoch": epoch + 1, "lr": lrs[0], "head_lr": lrs[1] if len(lrs) > 1 else lrs[0]}
    rec["train_loss"] = stats.loss_sum / max(stats.steps - stats.skipped_steps, 1)
    rec["train_acc_given"] = stats.correct / max(stats.seen, 1)
    rec["skipped_steps"] = stats.skipped_steps
    if val_probs is not None and ds.val is not None:
        rec["val_acc"] = accuracy(ds.val.labels, val_probs.argmax(1))
    test_pred = test_probs.argmax(1)
    cm = confusion_matrix(ds.test.labels, test_pred, k)
    rec["test_acc"] = accuracy(ds.test.labels, test_pred)
    rec["test_per_class_acc"] = [None if math.isnan(a) else float(a) for a in per_class_accuracy(cm)]
    rec["test_confusion"] = cm.tolist()
    for v, sums in stats.threshold_sums.items():
        rec[f"threshold_{v}"] = (sums / max(stats.steps - stats.skipped_steps, 1)).tolist()
    if stats.selected is not None and views:
        seen = stats.selected[:, 0] >= 0
        labels = ds.train.labels[seen]
        clean = (ds.train.labels == ds.train.true_labels)[seen] if ds.train.true_labels is not None else None
        for j, v in enumerate(views):
            sel = stats.selected[seen, j] == 1
            rec[f"selected_fraction_{v}"] = float(sel.mean()) if len(sel) else float("nan")
            rec[f"selected_fraction_per_class_{v}"] = [
                float(sel[labels == c].mean()) if (labels == c).any() else None for c in range(k)
            ]
            if clean is not None:
                q = selection_quality(sel, clean)
                rec[f"selection_precision_{v}"], rec[f"selection_recall_{v}"], rec[f"selection_f1_{v}"] = (
                    q["precision"], q["recall"], q["f1"])
    rec["epoch_seconds"] = seconds
    rec["train_images_per_second"] = train_images_per_s
    return {k2: (None if isinstance(v2, float) and math.isnan(v2) else v2) for k2, v2 in rec.items()}


def fit(cfg: Config, *, log: Callable[[str], None] = print, resume: bool = False,
        trust_checkpoint: bool = False) -> dict[str, Any]:
    """Train according to ``cfg``; returns the summary (also written to ``summary.json``).

    ``trust_checkpoint`` lets ``--pretrained`` and ``--resume`` load files that need arbitrary
    unpickling (``--trust-checkpoint``; unsafe: such a file can run code).
    """
    run = _Training(cfg, log, trust_checkpoint)  # data, model, method, optimiser, batches, run directory
    run.start(resume)  # fresh, or from the run directory's last checkpoint
    for epoch in range(run.state["epoch"], cfg.train.epochs):
        t0, train_time, images = run.train_epoch(epoch)
        run.end_epoch(epoch, t0, train_time, images)  # evaluate, log, checkpoint
    return run.finish()


class _Training:
    """One run of :func:`fit`: what it builds, and the pieces of its loop.

    ``state`` is the plain-data progress (epoch, step, best scores, ...) saved in every
    checkpoint; ``stats`` the current epoch's accumulators.
    """

    def __init__(self, cfg: Config, log: Callable[[str], None], trust_checkpoint: bool = False) -> None:
        load_builtins()
        cfg.validate()
        self.cfg = cfg
        self.trust_checkpoint = trust_checkpoint
        self.info = info = dist_utils.env_dist_info()
        self.device = device = resolve_device(cfg.train.device, local_rank=info.local_rank if info.enabled else None)
        if cfg.train.sync_bn and info.enabled and device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU implementation); drop it on CPU")
        self.created_group = dist_utils.init_distributed(info, device)
        self.main = main = info.is_main
        self.log = log
        self.say = say = log if main else (lambda _m: None)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.retained_memory = wants_retained_memory(cfg.train.malloc, device.type) and retain_freed_memory()
        self.precision = precision = resolve_precision(cfg.train.precision, device)
        seed_everything(cfg.train.seed + info.rank, cfg.train.deterministic)
        self.run_dir = run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        cfg.out = str(run_dir)
        _prepare_run_dir(run_dir, main)

        if info.enabled and not main:  # rank 0 builds any cache first, the others then read it
            dist_utils.barrier()
        self.ds = ds = prepare_data(cfg, log=say)
        if info.enabled and main:
            dist_utils.barrier()
        image_size = resolve_image_size(cfg)
        cfg.data.image_size = image_size  # resolved, so config.yaml and checkpoints say what ran
        if main:
            (run_dir / "config.yaml").write_text(cfg.to_yaml())
        model = build_model(cfg, ds.num_classes, image_size, say, trust_checkpoint=trust_checkpoint)
        self.method = method = build_method(cfg, ds.num_classes, len(ds.train))
        method.setup(model)
        self.channels_last = channels_last = (cfg.train.channels_last if cfg.train.channels_last is not None
                                              else default_channels_last(device))
        model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        method.to(device)
        if cfg.train.sync_bn and info.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif cfg.train.sync_bn:
            say("note: --sync-bn has no effect in a single process")
        if wants_small_map_conv(cfg.train.small_map_conv, device, precision, compiled=cfg.train.compile):
            use_small_map_conv(model, method)  # the method may own networks too (co-teaching's peer)
        self.model = model
        self.optimizer = optimizer = build_optimizer(cfg, model, method)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.optim.lr_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)
        train_model: nn.Module = model
        if info.enabled:
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.train.compile:
            train_model = torch.compile(train_model)
        self.train_model = train_model

        self.mean, self.std = mean, std = model.preprocessing.mean, model.preprocessing.std
        self.batches = TrainBatches(
            ds.train.images, ds.train.labels, views=method.views, batch_size=cfg.train.batch_size, device=device,
            mean=mean, std=std, seed=cfg.train.seed, backend=cfg.data.augment, workers=cfg.data.workers,
            rank=info.rank, world_size=info.world_size, channels_last=channels_last,
            aug=AugmentSettings(image_size, cfg.data.pad, cfg.data.cutout, cfg.data.randaug_ops,
                                cfg.data.randaug_magnitude),
        )
        share = -(-len(ds.train) // info.world_size)  # training rows per process
        if cfg.train.batch_size > share:
            raise ConfigError(f"train.batch_size {cfg.train.batch_size} is larger than the training split"
                              f" ({len(ds.train)} rows{f' = {share} per process' if info.enabled else ''});"
                              f" use --batch-size <= {share}")
        self.views = views = method.selection_views
        self.history = (np.full((cfg.train.epochs, len(ds.train), max(len(views), 1)), -1, dtype=np.int8)
                        if views else None)
        self.state: dict[str, Any] = {
            "epoch": 0, "step": 0, "global_step": 0, "best_val": -1.0, "best_epoch": 0,
            "best_test_at_val": float("nan"), "best_test": -1.0, "train_seconds": 0.0, "images_seen": 0,
            "skipped_total": 0, "epoch_stats": None, "world_size": info.world_size}
        self.metrics_log = MetricsLog(run_dir, cfg.train.tensorboard, main)
        self.progress = cfg.train.progress and main
        # Without fp16's GradScaler (which decides its own skips), a step is checked one step late:
        # the fused optimiser skips a faulty update on the device by itself (found_inf), and the
        # host reads the verdict with the step's results after queuing the next step, so it never
        # waits for the GPU to drain. The GradScaler path decides at once, as it must.
        self.lagged = not precision.use_grad_scaler and bool(optimizer.defaults.get("fused"))
        self.pending: _StepResults | None = None  # the last step, its verdict and results on their way
        self.stats = EpochStats()

    def start(self, resume: bool) -> None:
        """Start fresh, or restore everything from the run directory's last checkpoint."""
        cfg, info, state, say = self.cfg, self.info, self.state, self.say
        ckpt = find_resumable(self.run_dir, say, trust=self.trust_checkpoint) if resume else None
        if ckpt is None:
            if resume:
                say(f"--resume: no checkpoint in {self.run_dir}; starting from scratch")
            elif (self.run_dir / "last.pt").exists():
                say(f"warning: {self.run_dir} holds an earlier run; starting over (pass --resume to continue it instead)")
            self.metrics_log.truncate_after(0)  # a fresh run never appends to an older run's metrics
        else:
            check_resume_compatible(ckpt.config, cfg.to_dict())
            saved = ckpt.resume
            assert saved is not None  # find_resumable returns resumable checkpoints only
            saved_ws = saved["state"].get("world_size", 1)
            if saved["state"]["step"] > 0 and saved_ws != info.world_size:
                raise ConfigError(f"--resume: {ckpt.path} was written mid-epoch by {saved_ws} process(es) but "
                                  f"{info.world_size} run now; resume with {saved_ws} (the epoch's sample order depends on it)")
            if saved_ws != info.world_size:
                say(f"note: resuming {saved_ws}-process training with {info.world_size}: the global batch is now "
                    f"{info.world_size} x {cfg.train.batch_size}")
            self.model.load_state_dict(ckpt.model)
            self.method.load_state_dict(saved["method"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.scaler.load_state_dict(saved["scaler"])
            rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
            if info.rank < len(rngs):  # per-rank RNG (dropout); a new rank keeps its fresh seed
                set_rng_state(rngs[info.rank])
            # the checkpoint holds tensors (plain data); the epoch's accumulators are numpy
            state.update(saved["state"], world_size=info.world_size, epoch_stats=to_numpy(saved["state"]["epoch_stats"]))
            if self.history is not None and saved.get("selection_history") is not None:
                old = np.asarray(saved["selection_history"])
                self.history[: min(len(old), len(self.history))] = old[: len(self.history)]
            self.metrics_log.truncate_after(state["epoch"])
            say(f"resumed from {ckpt.path} at epoch {state['epoch'] + 1}, step {state['step']}")

        dist_utils.broadcast_state(self.method)  # method-owned modules were initialised per rank (seed + rank)
        self.method_params = [p for p in self.method.parameters() if p.requires_grad]
        self.clip_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        from tqdm.auto import tqdm

        self.epoch_bar = tqdm(total=cfg.train.epochs, initial=state["epoch"], desc="epochs",
                              disable=not self.progress, position=0)

    def make_checkpoint(self, rngs: list[Any] | None) -> Checkpoint:
        """The run's checkpoint; with ``rngs`` None the weights only (``best.pt``: enough for
        eval, predict, export and audit, a fraction of the size without the optimiser state)."""
        cfg = self.cfg
        resume = None
        if rngs is not None:
            resume = {
                "method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "rng": rngs,
                "state": to_plain(dict(self.state)), "selection_history": to_plain(self.history),
            }
        return Checkpoint(model_name=cfg.model.name, model=self.model.state_dict(),
                          preprocessing=self.model.preprocessing.with_classes(self.ds.class_names),
                          config=cfg.to_dict(), resume=resume)

    def save_last(self, rngs: list[Any] | None = None) -> None:
        """Collective: every rank calls it (to gather the RNG states); rank 0 writes."""
        rngs = rngs or dist_utils.gather_objects(rng_state())
        if self.main:
            rotate_and_save(self.make_checkpoint(rngs), self.run_dir, "last.pt")

    def settle(self) -> bool:
        """Decide on the step in flight: add its results to the epoch's ``stats``, or handle its
        fault (``skip``: count it; ``stop``: checkpoint right before it and raise). True if it was
        fine (or there was none)."""
        p, self.pending = self.pending, None
        if p is None:
            return True
        p.wait()
        stats, state = self.stats, self.state
        if not p.faulty_ranks:
            p.add_to(stats, self.info.world_size)
            return True
        p_epoch, p_step, p_global = p.where
        fault = _fault_message(p_epoch, p_step, p_global, *p.fault, self.info, p.local_bad)
        if self.cfg.train.nan_policy == "stop":
            # Its update never happened (skipped on the device, or never queued), nor did a later one.
            stats.steps = p_step
            state.update(epoch=p_epoch, step=p_step, global_step=p_global, epoch_stats=_stats_dict(stats))
            self.save_last(dist_utils.gather_objects(p.rng) if p.rng is not None else None)
            raise NumericalError(f"{fault}; stopped with a checkpoint in {self.run_dir} at this step "
                                 "(--resume repeats it; --nan-policy skip or --grad-clip may get past it)")
        if p.local_bad:
            self.log(f"warning: {fault}; step skipped")
        stats.skipped_steps += 1
        state["skipped_total"] += 1
        return False

    def train_epoch(self, epoch: int) -> tuple[float, float, int]:
        """One epoch's steps (from a mid-epoch checkpoint's step on resume), accumulated in ``stats``.

        Returns the epoch's start time, training seconds and images trained on.
        """
        cfg, info, state, batches = self.cfg, self.info, self.state, self.batches
        optimizer, scaler, precision, device = self.optimizer, self.scaler, self.precision, self.device
        start_step = state["step"]
        views, n_train = self.views, len(self.ds.train)
        self.stats = stats = EpochStats(**state["epoch_stats"]) if state["epoch_stats"] else EpochStats(
            selected=np.full((n_train, max(len(views), 1)), -1, np.int8) if views else None,
            probs=np.zeros((n_train, self.ds.num_classes), np.float16))
        t0 = time.perf_counter()
        self.train_model.train()
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches), initial=start_step, desc=f"epoch {epoch + 1}", leave=False,
                   disable=not self.progress, position=1)
        reduce_sum = dist_utils.all_reduce_sum
        for step, (xviews, labels, index) in enumerate(batches.epoch(epoch, start_step), start=start_step):
            ctx = StepContext(epoch=epoch, step=state["global_step"], num_epochs=cfg.train.epochs,
                              reduce_sum=reduce_sum, world_size=info.world_size)
            rng_before = rng_state() if self.lagged and cfg.train.nan_policy == "stop" else None  # for its checkpoint
            with precision.autocast(device):
                out = self.method.training_step(self.train_model, TrainBatch(xviews, labels, index), ctx)
            loss = out.loss.float()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # even when non-finite: under DDP every rank must join the all-reduce
            dist_utils.average_gradients(self.method_params)  # method-owned modules are outside DDP
            scaler.unscale_(optimizer)
            gnorm = torch.nn.utils.clip_grad_norm_(self.clip_params, cfg.optim.grad_clip or float("inf"))
            # fp16's GradScaler skips inf-gradient steps itself; a non-finite loss is always a fault
            bad = ~torch.isfinite(loss) | (~torch.isfinite(gnorm) & (not precision.use_grad_scaler))
            loss_bad = reduce_sum(torch.stack([loss.detach(), bad.float()]))  # [sum of rank losses, faulty ranks]
            current = _StepResults.start(out, labels, index, loss_bad, bad, where=(epoch, step, state["global_step"]),
                                         fault=(index, out.logits, loss.detach(), gnorm), rng=rng_before)
            if self.lagged:
                self.settle()  # the previous step (the GPU finished it while this one was queued)
                optimizer.found_inf = (loss_bad[1] > 0).float()  # nonzero: the fused kernels skip the update
                optimizer.grad_scale = None
                optimizer.step()
                del optimizer.found_inf, optimizer.grad_scale
                self.pending = current
            else:
                self.pending = current
                if self.settle():  # waits for this step's verdict
                    scaler.step(optimizer)
                    scaler.update()
            stats.steps += 1
            state["global_step"] += 1
            bar.update(1)
            if cfg.train.save_every_steps and (step + 1) % cfg.train.save_every_steps == 0 and step + 1 < len(batches):
                self.settle()
                state.update(epoch=epoch, step=step + 1, epoch_stats=_stats_dict(stats))
                self.save_last()
        self.settle()
        bar.close()
        train_time = time.perf_counter() - t0
        images = (len(batches) - start_step) * cfg.train.batch_size * info.world_size
        return t0, train_time, images

    def end_epoch(self, epoch: int, t0: float, train_time: float, images: int) -> None:
        """Evaluate on validation and test, write the epoch's record, checkpoint."""
        cfg, info, state, ds, views, stats = self.cfg, self.info, self.state, self.ds, self.views, self.stats
        state["train_seconds"] += train_time
        state["images_seen"] += images
        if self.history is not None:
            self.history[epoch] = stats.selected
        self.method.on_epoch_end(epoch)
        self.scheduler.step()
        # DDP syncs parameters but not buffers updated in training (BatchNorm statistics): use rank 0's
        dist_utils.broadcast_state(self.model, buffers_only=True)
        dist_utils.broadcast_state(self.method, buffers_only=True)

        eval_kw = dict(batch_size=cfg.train.eval_batch_size, device=self.device, mean=self.mean, std=self.std,
                       precision=self.precision, channels_last=self.channels_last, rank=info.rank,
                       world_size=info.world_size)
        val_probs = predict_probs(self.model, ds.val.images, **eval_kw) if ds.val is not None else None
        test_probs = predict_probs(self.model, ds.test.images, **eval_kw)
        rec = _epoch_record(epoch, stats, ds, views, val_probs, test_probs,
                            [g["lr"] for g in self.optimizer.param_groups], time.perf_counter() - t0,
                            images / max(train_time, 1e-9))
        val_acc = rec.get("val_acc", rec["test_acc"] if ds.val is None else None)
        state["best_test"] = max(state["best_test"], rec["test_acc"])
        improved = ds.val is not None and rec["val_acc"] > state["best_val"]
        if improved:
            state.update(best_val=rec["val_acc"], best_epoch=epoch + 1, best_test_at_val=rec["test_acc"])
        state.update(epoch=epoch + 1, step=0, epoch_stats=None, last_record=rec)
        self.metrics_log.write(rec, ds.class_names)
        rngs = dist_utils.gather_objects(rng_state())
        if self.main:  # last.pt goes last: it is the commit point --resume starts from
            if improved:
                atomic_save(self.make_checkpoint(None), self.run_dir / "best.pt")
            _save_dynamics(self.run_dir, ds, self.history, stats, epoch)
        self.save_last(rngs)
        self.epoch_bar.update(1)
        self.epoch_bar.set_postfix(loss=f"{rec['train_loss']:.3f}",
                                   val=f"{val_acc if val_acc is not None else float('nan'):.3f}",
                                   test=f"{rec['test_acc']:.3f}")
        if not self.progress:
            self.say(_epoch_line(rec, views))

    def finish(self) -> dict[str, Any]:
        """Write ``summary.json`` and release what the run held; returns the summary."""
        self.epoch_bar.close()
        self.metrics_log.close()
        summary = _summary(self.cfg, self.ds, self.state, self.precision, self.device, self.run_dir, self.views)
        if self.main and not self.cfg.train.keep_checkpoints:
            remove_previous(self.run_dir)  # last.pt is complete: a finished run needs no fallback
        if self.main:
            # Atomic: summary.json marks a finished run (dnfer bench skips such cells and reads it
            # while other cells still train), so it must never be seen half written.
            _write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        dist_utils.barrier()
        if self.created_group:
            dist_utils.cleanup()
        if self.retained_memory:
            release_freed_memory()  # the heap stays set to retain, but gives its peak back now
        return summary


def _epoch_line(rec: dict[str, Any], views: tuple[str, ...]) -> str:
    parts = [f"epoch {rec['epoch']:3d}", f"loss {rec['train_loss']:.4f}"]
    if rec.get("val_acc") is not None:
        parts.append(f"val {rec['val_acc']:.4f}")
    parts.append(f"test {rec['test_acc']:.4f}")
    if views and rec.get(f"selection_precision_{views[0]}") is not None:
        parts.append(f"sel P/R {rec[f'selection_precision_{views[0]}']:.3f}/{rec[f'selection_recall_{views[0]}']:.3f}")
    parts.append(f"{rec['train_images_per_second']:.0f} img/s")
    return " | ".join(parts)


class _StepResults:
    """One step's verdict (were its loss and gradients finite on every rank?) and per-sample
    results on their way to the host, read one step later.

    Reading them at once would make the host wait for the GPU to finish the step, and the GPU
    then wait while the host did the bookkeeping and launched the next step. :meth:`start`
    queues one packed device-to-host copy instead (non-blocking into pinned memory on CUDA);
    :meth:`wait` and :meth:`add_to` read it while the next step is queued, by which time the GPU
    is past it. The values, and their order of accumulation, are those of reading at once.
    Under DDP the rows are gathered from every rank first, so every rank's ``stats`` describe
    the global batch: the epoch record is global, and the checkpoint (written by rank 0) holds
    all of it for a mid-epoch resume. A padding duplicate (DistributedSampler-style) is written
    twice with the same kind of value; the later write wins.

    Attributes:
        where: (epoch, step in the epoch, global step) of the step.
        fault: (index, logits, loss, gradient norm) device tensors, to name a fault's rows.
        rng: RNG states from before the step (a ``stop`` checkpoint resumes from there), or None.
        faulty_ranks, local_bad: the verdict, after :meth:`wait`.
    """

    def __init__(self, rows: Tensor, extras: Tensor, event: Any, views: int, thresholds: list[tuple[str, int]],
                 where: tuple[int, int, int], fault: tuple[Tensor, ...], rng: dict[str, Any] | None) -> None:
        self.rows, self.extras, self.event = rows, extras, event
        self.views, self.thresholds = views, thresholds
        self.where, self.fault, self.rng = where, fault, rng
        self.faulty_ranks, self.local_bad = 0, False

    @classmethod
    def start(cls, out: Any, labels: Tensor, index: Tensor, loss_bad: Tensor, local_bad: Tensor, *,
              where: tuple[int, int, int] = (0, 0, 0), fault: tuple[Tensor, ...] = (),
              rng: dict[str, Any] | None = None) -> _StepResults:
        """Queue the copy of a step's results.

        Args:
            loss_bad: float ``(2,)``: the global batch's summed loss, the number of faulty ranks.
            local_bad: bool 0-d: this rank's loss or gradient norm was not finite.
        """
        correct = (out.logits.argmax(1) == labels)[:, None]
        sel = out.selected if out.selected is not None else correct[:, :0]
        probs = out.logits.float().softmax(1)
        # float64 holds row indices and float32 probabilities exactly: one tensor, one copy
        rows = torch.cat([index[:, None].double(), correct.double(), sel.double(), probs.double()], 1)
        rows = dist_utils.all_gather_cat(rows)
        thresholds = [(name.split("/", 1)[1], value.numel()) for name, value in out.stats.items()
                      if name.startswith("threshold/")]  # already global-batch values (reduced in the policy)
        extras = torch.cat([loss_bad.detach().double().view(2), local_bad.double().view(1)] + [
            out.stats[f"threshold/{v}"].float().double().view(-1) for v, _ in thresholds])
        event = None
        if rows.device.type == "cuda":  # into pinned memory (PyTorch's caching host allocator): no sync
            rows, extras = (torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                            for t in (rows, extras))
            event = torch.cuda.Event()
            event.record()
        else:
            rows, extras = rows.cpu(), extras.cpu()
        return cls(rows, extras, event, sel.shape[1], thresholds, where, fault, rng)

    def wait(self) -> None:
        """Wait for the copy (long finished when called a step later) and read the verdict."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None  # done: a second call (add_to after settle's) waits for nothing
        self.faulty_ranks, self.local_bad = int(self.extras[1]), bool(self.extras[2])

    def add_to(self, stats: EpochStats, world_size: int) -> None:
        """Add the (finite) step's results to ``stats``."""
        self.wait()
        packed, extras = self.rows.numpy(), self.extras.numpy()
        v = self.views
        idx, correct_n, sel_n = packed[:, 0].astype(np.int64), packed[:, 1], packed[:, 2:2 + v]
        stats.loss_sum += float(extras[0]) / world_size  # the global batch's loss
        stats.correct += int(correct_n.sum())
        stats.seen += len(idx)
        stats.probs[idx] = packed[:, 2 + v:].astype(np.float32).astype(np.float16)
        if v and stats.selected is not None:
            stats.selected[idx] = sel_n.astype(np.int8)
        start = 3
        for name, size in self.thresholds:
            value = extras[start:start + size].astype(np.float32)
            start += size
            stats.threshold_sums[name] = stats.threshold_sums.get(name, 0) + value


def _stats_dict(stats: EpochStats) -> dict[str, Any]:
    """A copy of ``stats`` as plain data for the checkpoint (no pickled class, no aliasing)."""
    return {f.name: copy.deepcopy(getattr(stats, f.name)) for f in dataclasses.fields(stats)}


def _fault_message(epoch: int, step: int, global_step: int, index: torch.Tensor, logits: torch.Tensor,
                   loss: torch.Tensor, gnorm: torch.Tensor, info: dist_utils.DistInfo, local: bool) -> str:
    """Where a non-finite loss/gradient happened: epoch, step, rank and the training rows involved."""
    where = f"epoch {epoch + 1}, step {step} (global step {global_step})"
    if info.enabled:
        where += f", rank {info.rank}"
    if not local:
        return f"another rank hit a non-finite loss or gradient at {where}"
    what = "loss" if not torch.isfinite(loss) else f"gradient (norm {float(gnorm)})"
    rows = index[~torch.isfinite(logits.float()).all(1)]
    if len(rows):
        which = f"rows with non-finite outputs {rows[:16].tolist()}{'...' if len(rows) > 16 else ''}"
    else:
        which = f"batch rows {index[:16].tolist()}{'...' if len(index) > 16 else ''}"
    return f"non-finite {what} at {where}; {which} of the training split"


def _prepare_run_dir(run_dir: Path, main: bool) -> None:
    if not main:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {str(run_dir)!r} is not a writable directory ({e.strerror})") from None


def _save_dynamics(run_dir: Path, ds: FERDataset, history: np.ndarray | None, stats: EpochStats, epoch: int) -> None:
    """Per-sample training dynamics for the label audit: selection history and last posteriors."""
    arrays: dict[str, Any] = {
        "names": np.array(ds.train.names), "given_labels": ds.train.labels, "last_probs": stats.probs,
        "class_names": np.array(ds.class_names), "epochs_done": np.array(epoch + 1),
    }
    if ds.train.true_labels is not None:
        arrays["true_labels"] = ds.train.true_labels
    if history is not None:
        arrays["selection_history"] = history[: epoch + 1]
    tmp = run_dir / ".train_dynamics.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, run_dir / "train_dynamics.npz")
    skipped = ds.meta.get("skipped")
    if skipped:
        import csv

        with open(run_dir / "skipped.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for rec in skipped for k in rec)))
            w.writeheader()
            w.writerows(skipped)


def _summary(cfg: Config, ds: FERDataset, state: dict[str, Any], precision: Precision, device: torch.device,
             run_dir: Path, views: tuple[str, ...]) -> dict[str, Any]:
    rec = state.get("last_record") or {}
    v = views[0] if views else None
    best_test_at_val = state["best_test_at_val"]
    return {
        "method": cfg.method.name,
        "noise": ds.meta.get("noise"),
        "noise_realised_rate": ds.meta.get("noise_realised_rate"),
        "dataset": ds.meta.get("spec"),
        "class_names": ds.class_names,
        "image_size": ds.meta.get("image_size"),
        "model": cfg.model.name,
        "epochs": state["epoch"],
        "seed": cfg.train.seed,
        "final_test_acc": rec.get("test_acc"),
        "final_val_acc": rec.get("val_acc"),
        "best_val_epoch": state["best_epoch"] or None,
        "best_val_acc": state["best_val"] if state["best_val"] >= 0 else None,
        "best_val_test_acc": None if math.isnan(best_test_at_val) else best_test_at_val,
        "best_test_acc_test_selected": state["best_test"],
        "selection_precision": rec.get(f"selection_precision_{v}") if v else None,
        "selection_recall": rec.get(f"selection_recall_{v}") if v else None,
        "train_seconds": state["train_seconds"],
        "images_per_second": state["images_seen"] / max(state["train_seconds"], 1e-9),
        "skipped_steps": state["skipped_total"],
        "precision": precision.name,
        "device": str(device),
        "run_dir": str(run_dir),
    }


__all__ = ["fit", "NumericalError", "CheckpointError"]
