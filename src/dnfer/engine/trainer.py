"""The training loop: ``fit`` on a few lines, over a ``_Training`` object whose methods are the
set-up, the restore, one epoch's steps and the end of an epoch (with the checkpoint policy).
One training step is :class:`dnfer.engine.step.Stepper`'s; what a run writes about itself is
in :mod:`dnfer.engine.records`, the CPU tuning in :mod:`dnfer.engine.cpu_tuning`.

``fit(cfg)`` prepares the data, builds model + method + optimiser, resumes if asked, then per
epoch: trains (both views in one forward pass, mixed precision), evaluates validation and test,
logs one JSON line, checkpoints atomically and keeps the best-on-validation model. Model
selection uses the validation split carved from the noisy training labels — never the test set.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dnfer.config import Config
from dnfer.data.pipeline import prepare_data, resolve_image_size
from dnfer.engine import cpu_tuning, records
from dnfer.engine import distributed as dist_utils
from dnfer.engine.batches import AugmentSettings, TrainBatches, predict_probs
from dnfer.engine.build import (  # noqa: F401 - build_method: also imported from here
    build_method,
    build_model,
    build_optimizer,
    check_batch_fits,
    default_run_dir,
    prepare_run_dir,
    seed_everything,
    training_module,
)
from dnfer.engine.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_save,
    find_resumable,
    remove_previous,
    rng_state,
    rotate_and_save,
    to_numpy,
    to_plain,
)
from dnfer.engine.device import default_channels_last, resolve_device, resolve_precision
from dnfer.engine.records import EpochStats
from dnfer.engine.resume import restore_training
from dnfer.engine.step import Stepper, StepResults
from dnfer.errors import ConfigError, DnferError
from dnfer.io_safety import claim_run_dir, write_text_atomic
from dnfer.methods.base import StepContext, TrainBatch
from dnfer.progress import stderr_is_terminal


class NumericalError(DnferError):
    """A non-finite loss or gradient under ``nan_policy=stop``."""

    exit_code = 3


def fit(cfg: Config, *, log: Callable[[str], None] = print, resume: bool = False,
        overwrite: bool = False, trust_checkpoint: bool = False) -> dict[str, Any]:
    """Train according to ``cfg``; returns the summary (also written to ``summary.json``).

    The run folder is locked for the whole run (a second run into it fails naming the holder);
    a folder holding something other than this config's run needs ``resume`` or ``overwrite``.
    The process-wide settings a run changes (torch's thread count, the allocator, deterministic
    mode, ``cudnn.benchmark``) are restored when it returns or raises. ``trust_checkpoint`` lets
    ``--pretrained`` and ``--resume`` load files that need arbitrary unpickling
    (``--trust-checkpoint``; unsafe: such a file can run code).
    """
    cfg.validate()  # the one validation: before the run folder is claimed or any data is read
    cfg.out = str(Path(cfg.out) if cfg.out else default_run_dir(cfg))
    with contextlib.ExitStack() as restore:
        lock = claim_run_dir(cfg.out, cfg.to_yaml(), resume=resume, overwrite=overwrite,
                             main=dist_utils.env_dist_info().is_main)
        if lock is not None:
            restore.callback(lock.release)
        run = _Training(cfg, log, restore.callback, trust_checkpoint)  # data, model, method, optimiser, batches, run directory
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

    def __init__(self, cfg: Config, log: Callable[[str], None], on_exit: Callable[[Callable[[], None]], Any],
                 trust_checkpoint: bool = False) -> None:
        """Build the run (``cfg`` validated); ``on_exit`` registers what puts the process-wide settings back."""
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
        say(cfg.resolve_head_lr())  # resolved before config.yaml and checkpoints record the config
        self.precision = precision = resolve_precision(cfg.train.precision, device)
        on_exit(seed_everything(cfg.train.seed + info.rank, cfg.train.deterministic))
        self.run_dir = run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg)
        cfg.out = str(run_dir)
        prepare_run_dir(run_dir, main)

        if info.enabled and not main:  # rank 0 builds any cache first, the others then read it
            dist_utils.barrier()
        self.ds = ds = prepare_data(cfg.data, seed=cfg.train.seed, log=say)
        if ds.meta.get("skipped"):
            say(f"skipped {len(ds.meta['skipped'])} unreadable image(s) (--skip-bad; listed in {run_dir / 'skipped.csv'})")
        if info.enabled and main:
            dist_utils.barrier()
        image_size = resolve_image_size(cfg.data)
        cfg.data.image_size = image_size  # resolved, so config.yaml and checkpoints say what ran
        if main:
            (run_dir / "config.yaml").write_text(cfg.to_yaml())
        model = build_model(cfg, ds.num_classes, image_size, say, trust_checkpoint=trust_checkpoint)
        warning = records.cpu_cost_warning(device.type, cfg.model.name, image_size, len(ds.train), cfg.train.epochs)
        if warning:
            say(warning)
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
        # threads, malloc, small-map convolutions; the method may own networks too (co-teaching's peer)
        on_exit(cpu_tuning.apply(threads=cfg.train.threads, malloc=cfg.train.malloc,
                                 small_map_conv=cfg.train.small_map_conv, device=device, precision=precision,
                                 compiled=cfg.train.compile, modules=(model, method)))
        self.model = model
        self.optimizer = optimizer = build_optimizer(cfg, model, method)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.optim.lr_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)
        self.train_model = training_module(model, distributed=info.enabled, device=device, compile=cfg.train.compile)

        self.mean, self.std = mean, std = model.preprocessing.mean, model.preprocessing.std
        self.batches = TrainBatches(
            ds.train.images, ds.train.labels, views=method.views, batch_size=cfg.train.batch_size, device=device,
            mean=mean, std=std, seed=cfg.train.seed, backend=cfg.data.augment, workers=cfg.data.workers,
            rank=info.rank, world_size=info.world_size, channels_last=channels_last,
            aug=AugmentSettings(image_size, cfg.data.pad, cfg.data.cutout, cfg.data.randaug_ops,
                                cfg.data.randaug_magnitude),
        )
        check_batch_fits(cfg.train.batch_size, len(ds.train), info.world_size)
        self.views = views = method.selection_views
        self.history = (np.full((cfg.train.epochs, len(ds.train), max(len(views), 1)), -1, dtype=np.int8)
                        if views else None)
        self.state: dict[str, Any] = {
            "epoch": 0, "step": 0, "global_step": 0, "best_val": -1.0, "best_epoch": 0,
            "best_test_at_val": float("nan"), "best_test": -1.0, "train_seconds": 0.0, "images_seen": 0,
            "skipped_total": 0, "epoch_stats": None, "world_size": info.world_size, "last_selection_record": None}
        self.selection_warmup = type(method).selection_warmup_epochs(method.params)
        self.cost_reported = False  # the time/disk estimate is printed after the first epoch this process trains
        self.metrics_log = records.MetricsLog(run_dir, cfg.train.tensorboard, main)
        # bars only on a terminal: a log redirected to a file gets one line per epoch instead
        self.progress = cfg.train.progress and main and stderr_is_terminal()
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
            self.metrics_log.start_fresh()  # a fresh run never appends to an older run's metrics
        else:
            saved = restore_training(ckpt, cfg.to_dict(), world_size=info.world_size, rank=info.rank,
                                     batch_size=cfg.train.batch_size, model=self.model, method=self.method,
                                     optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler, say=say)
            # the checkpoint holds tensors (plain data); the epoch's accumulators are numpy
            state.update(saved["state"], world_size=info.world_size, epoch_stats=to_numpy(saved["state"]["epoch_stats"]))
            if self.history is not None and saved.get("selection_history") is not None:
                old = np.asarray(saved["selection_history"])
                self.history[: min(len(old), len(self.history))] = old[: len(self.history)]
            # lines written after the checkpoint are dropped; damage to earlier ones is rebuilt from it
            warning = self.metrics_log.resume(state["epoch"], saved.get("metrics_lines"), ckpt.path)
            if warning:
                say(warning)
            say(f"resumed from {ckpt.path} at epoch {state['epoch'] + 1}, step {state['step']}")

        dist_utils.broadcast_state(self.method)  # method-owned modules were initialised per rank (seed + rank)
        self.stepper = Stepper(self.method, self.train_model, self.optimizer, self.scaler, self.precision, self.device,
                               grad_clip=cfg.optim.grad_clip, judge=self.judge,
                               snapshot_rng=cfg.train.nan_policy == "stop")
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
                "metrics_lines": self.metrics_log.lines,  # every finished epoch's line: rebuilds a damaged log
            }
        return Checkpoint(model_name=cfg.model.name, model=self.model.state_dict(),
                          preprocessing=self.model.preprocessing.with_classes(self.ds.class_names),
                          config=cfg.to_dict(), resume=resume)

    def save_last(self, rngs: list[Any] | None = None) -> None:
        """Collective: every rank calls it (to gather the RNG states); rank 0 writes."""
        rngs = rngs or dist_utils.gather_objects(rng_state())
        if self.main:
            rotate_and_save(self.make_checkpoint(rngs), self.run_dir, "last.pt")

    def judge(self, p: StepResults) -> bool:
        """The verdict on a settled step: add its results to the epoch's ``stats``, or handle its
        fault (``skip``: count it; ``stop``: checkpoint right before it and raise). True if fine."""
        stats, state = self.stats, self.state
        if not p.faulty_ranks:
            p.add_to(stats, self.info.world_size)
            return True
        p_epoch, p_step, p_global = p.where
        fault = p.fault_message(self.info)
        if self.cfg.train.nan_policy == "stop":
            # Its update never happened (skipped on the device, or never queued), nor did a later one.
            stats.steps = p_step
            state.update(epoch=p_epoch, step=p_step, global_step=p_global, epoch_stats=records.stats_dict(stats))
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
        cfg, info, state, batches, stepper = self.cfg, self.info, self.state, self.batches, self.stepper
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
        for step, (xviews, labels, index) in enumerate(batches.epoch(epoch, start_step), start=start_step):
            ctx = StepContext(epoch=epoch, step=state["global_step"], num_epochs=cfg.train.epochs,
                              reduce_sum=dist_utils.all_reduce_sum, world_size=info.world_size,
                              gather=dist_utils.all_gather_cat)
            stepper.step(TrainBatch(xviews, labels, index), ctx, where=(epoch, step, state["global_step"]))
            stats.steps += 1
            state["global_step"] += 1
            bar.update(1)
            if cfg.train.save_every_steps and (step + 1) % cfg.train.save_every_steps == 0 and step + 1 < len(batches):
                stepper.settle()
                state.update(epoch=epoch, step=step + 1, epoch_stats=records.stats_dict(stats))
                self.save_last()
        stepper.settle()
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
        selection_ran = epoch >= self.selection_warmup
        rec = records.epoch_record(epoch, stats, ds, views, val_probs, test_probs,
                            [g["lr"] for g in self.optimizer.param_groups], time.perf_counter() - t0,
                            images / max(train_time, 1e-9), selection_ran=selection_ran)
        if views and selection_ran:
            state["last_selection_record"] = {k: v for k, v in rec.items()
                                              if k == "epoch" or k.startswith(("selection_", "selected_fraction_"))}
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
            records.save_dynamics(self.run_dir, ds, self.history, stats, epoch)
        self.save_last(rngs)
        if not self.cost_reported:
            self.cost_reported = True
            self.say(records.cost_line(epoch, time.perf_counter() - t0, cfg.train.epochs - epoch - 1,
                                       self.run_dir / "last.pt"))
        self.epoch_bar.update(1)
        self.epoch_bar.set_postfix(loss=f"{rec['train_loss']:.3f}",
                                   val=f"{val_acc if val_acc is not None else float('nan'):.3f}",
                                   test=f"{rec['test_acc']:.3f}")
        if not self.progress:
            self.say(records.epoch_line(rec, views))

    def finish(self) -> dict[str, Any]:
        """Write ``summary.json`` and release what the run held; returns the summary."""
        self.epoch_bar.close()
        self.metrics_log.close()
        summary = records.run_summary(self.cfg, self.ds, self.state, self.precision, self.device, self.run_dir,
                                      self.views)
        if self.main and not self.cfg.train.keep_checkpoints:
            remove_previous(self.run_dir)  # last.pt is complete: a finished run needs no fallback
        if self.main:
            # Atomic: summary.json marks a finished run (dnfer bench skips such cells and reads it
            # while other cells still train), so it must never be seen half written.
            write_text_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        dist_utils.barrier()
        if self.created_group:
            dist_utils.cleanup()
        return summary  # fit's exit then restores the process-wide settings (the heap gives its peak back)



__all__ = ["fit", "NumericalError", "CheckpointError"]
