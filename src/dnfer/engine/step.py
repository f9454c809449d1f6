"""One training step, shared by the trainer and ``benchmarks/throughput.py``.

:class:`Stepper` runs a method's step: the forward pass (both views in one pass, under the
precision's autocast), the backward pass, the averaging of method-owned gradients across
processes, unscaling and clipping, the fault verdict (finite loss and gradient norm on every
rank) and the optimiser step. Without fp16's GradScaler the optimiser step is *lagged*: the
verdict is read one step late (:class:`StepResults`), and the fused optimiser skips a faulty
update on the device by itself (:func:`step_unless_found_inf`), so the host never waits for the
GPU within a step. What to do with a verdict (add the step's results to the epoch's statistics,
skip the step, stop the run) is the caller's: :class:`Stepper` hands each settled step to its
``judge``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dnfer.engine import distributed as dist_utils
from dnfer.engine.checkpoint import rng_state
from dnfer.engine.device import Precision
from dnfer.engine.records import EpochStats
from dnfer.methods.base import Method, StepContext, TrainBatch


def step_unless_found_inf(optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """``optimizer.step()``, skipped on the device when ``found_inf`` is nonzero.

    Why: deciding on the host whether to step means reading a device value, which makes the host
    wait for the GPU to finish the step. PyTorch's fused optimisers (Adam, AdamW, SGD with
    ``fused=True``) take the decision as a tensor instead: their ``step()`` passes the
    optimiser's ``found_inf`` and ``grad_scale`` attributes to the fused kernel, which leaves
    parameters and state untouched when ``found_inf`` is nonzero. These attributes are PyTorch's
    protocol with ``torch.amp.GradScaler`` (which sets them, steps, and deletes them, in
    ``GradScaler._maybe_opt_step``), not public API; this is the one place that uses them, the
    same way, with ``grad_scale`` None because the gradients are already unscaled.

    Args:
        optimizer: a fused optimiser (``optimizer.defaults["fused"]``); others ignore the flag.
        found_inf: bool or float 0-d device tensor, nonzero to skip the update.
    """
    optimizer.found_inf = found_inf.float()  # type: ignore[attr-defined]
    optimizer.grad_scale = None  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf, optimizer.grad_scale  # type: ignore[attr-defined]


class StepResults:
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
        rows: float64 ``(B, 2 + V + K + S)`` on its way to the host: training-split row, correct
            (0/1), the V views' selections (0/1), the K-class weak-view posterior, then the S
            per-sample scores (``StepResult.sample_scores``), per sample of the (global) batch.
        extras: float64 ``(3 + T + E)``: the global batch's summed loss, the number of faulty
            ranks, this rank's fault flag, the T values of the method's thresholds, then the E
            values of its other statistics (this rank's: they are not all-reduced).
        thresholds, others: (name, size) of the thresholds' and the other statistics' values.
        scores: names of the per-sample score columns.
        reductions: the method's ``stat_reductions``.
        where: (epoch, step in the epoch, global step) of the step.
        fault: (index, logits, loss, gradient norm) device tensors, to name a fault's rows.
        rng: RNG states from before the step (a ``stop`` checkpoint resumes from there), or None.
        faulty_ranks, local_bad: the verdict, after :meth:`wait`.
    """

    def __init__(self, rows: Tensor, extras: Tensor, event: Any, views: int, thresholds: list[tuple[str, int]],
                 where: tuple[int, int, int], fault: tuple[Tensor, ...], rng: dict[str, Any] | None, *,
                 classes: int, others: list[tuple[str, int]], scores: list[str],
                 reductions: Mapping[str, str]) -> None:
        self.rows, self.extras, self.event = rows, extras, event
        self.views, self.thresholds, self.classes = views, thresholds, classes
        self.others, self.scores, self.reductions = others, scores, reductions
        self.where, self.fault, self.rng = where, fault, rng
        self.faulty_ranks, self.local_bad = 0, False

    @classmethod
    def start(cls, out: Any, labels: Tensor, index: Tensor, loss_bad: Tensor, local_bad: Tensor, *,
              where: tuple[int, int, int] = (0, 0, 0), fault: tuple[Tensor, ...] = (),
              rng: dict[str, Any] | None = None, reductions: Mapping[str, str] | None = None) -> StepResults:
        """Queue the copy of a step's results.

        Args:
            loss_bad: float ``(2,)``: the global batch's summed loss, the number of faulty ranks.
            local_bad: bool 0-d: this rank's loss or gradient norm was not finite.
            reductions: the method's ``stat_reductions`` (how each statistic is reduced over the epoch).
        """
        correct = (out.logits.argmax(1) == labels)[:, None]
        sel = out.selected if out.selected is not None else correct[:, :0]
        probs = out.logits.float().softmax(1)
        scores = list(out.sample_scores)
        # float64 holds row indices and float32 probabilities exactly: one tensor, one copy
        rows = torch.cat([index[:, None].double(), correct.double(), sel.double(), probs.double()]
                         + [out.sample_scores[s].float().double().view(-1, 1) for s in scores], 1)
        rows = dist_utils.all_gather_cat(rows)
        thresholds = [(name.split("/", 1)[1], value.numel()) for name, value in out.stats.items()
                      if name.startswith("threshold/")]  # already global-batch values (reduced in the policy)
        others = [(name, value.numel()) for name, value in out.stats.items() if not name.startswith("threshold/")]
        extras = torch.cat([loss_bad.detach().double().view(2), local_bad.double().view(1)] + [
            out.stats[f"threshold/{v}"].float().double().view(-1) for v, _ in thresholds] + [
            out.stats[name].detach().to(loss_bad.device).float().double().view(-1) for name, _ in others])
        event = None
        if rows.device.type == "cuda":  # into pinned memory (PyTorch's caching host allocator): no sync
            rows, extras = (torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                            for t in (rows, extras))
            event = torch.cuda.Event()
            event.record()
        else:
            rows, extras = rows.cpu(), extras.cpu()
        return cls(rows, extras, event, sel.shape[1], thresholds, where, fault, rng, classes=probs.shape[1],
                   others=others, scores=scores, reductions=reductions or {})

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
        k = self.classes
        stats.probs[idx] = packed[:, 2 + v:2 + v + k].astype(np.float32).astype(np.float16)
        if v and stats.selected is not None:
            stats.selected[idx] = sel_n.astype(np.int8)
        for j, name in enumerate(self.scores):
            if name not in stats.sample_scores:  # NaN: not seen this epoch
                stats.sample_scores[name] = np.full(len(stats.probs), np.nan, np.float32)
            stats.sample_scores[name][idx] = packed[:, 2 + v + k + j].astype(np.float32)
        start = 3
        for name, size in self.thresholds:
            value = extras[start:start + size].astype(np.float32)
            start += size
            stats.threshold_sums[name] = stats.threshold_sums.get(name, 0) + value
        for name, size in self.others:
            value = extras[start:start + size].copy()  # float64 (float32 values, exact)
            start += size
            stats.stat_reductions[name] = self.reductions.get(name, "mean")
            stats.stat_sums[name] = stats.stat_sums.get(name, 0) + value
            stats.stat_counts[name] = stats.stat_counts.get(name, 0) + 1
            stats.stat_last[name] = value

    def fault_message(self, info: dist_utils.DistInfo) -> str:
        """Where the (faulty) step's non-finite loss or gradient happened: epoch, step, rank, and
        the training rows involved (those with non-finite outputs, else the batch's)."""
        epoch, step, global_step = self.where
        index, logits, loss, gnorm = self.fault
        where = f"epoch {epoch + 1}, step {step} (global step {global_step})"
        if info.enabled:
            where += f", rank {info.rank}"
        if not self.local_bad:
            return f"another rank hit a non-finite loss or gradient at {where}"
        what = "loss" if not torch.isfinite(loss) else f"gradient (norm {float(gnorm)})"
        rows = index[~torch.isfinite(logits.float()).all(1)]
        if len(rows):
            which = f"rows with non-finite outputs {rows[:16].tolist()}{'...' if len(rows) > 16 else ''}"
        else:
            which = f"batch rows {index[:16].tolist()}{'...' if len(index) > 16 else ''}"
        return f"non-finite {what} at {where}; {which} of the training split"



def _no_mark(_phase: str) -> None:
    pass


class Stepper:
    """Runs training steps of ``method`` on ``model`` and settles each one (see the module docstring).

    Args:
        method: the training method (its ``training_step`` gives the loss and per-sample results).
        model: the network the step runs (the model, or its DDP / ``torch.compile`` wrapper).
        optimizer: over the model's and the method's parameters.
        scaler: fp16's GradScaler (disabled for bf16 / fp32, where it passes values through).
        precision, device: the autocast of the forward pass.
        grad_clip: maximum global gradient norm, or None (the norm is computed anyway: the fault
            verdict needs it).
        judge: called with each step's :class:`StepResults` once its verdict is in (``wait``
            done); returns True when the step may stand (its results are the caller's to add),
            False when it is skipped. It may raise to stop the run.
        snapshot_rng: keep the RNG states from before each lagged step in its results, so a
            fault found a step late can checkpoint right before the faulty step.

    Attributes:
        lagged: the optimiser step of step ``t`` is queued after step ``t+1``'s verdict is
            queued, and skipped on the device if faulty (no fp16 GradScaler, a fused optimiser).
        pending: the last step, its verdict and results on their way to the host, or None.
    """

    def __init__(self, method: Method, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scaler: torch.amp.GradScaler, precision: Precision, device: torch.device, *,
                 grad_clip: float | None, judge: Callable[[StepResults], bool], snapshot_rng: bool) -> None:
        self.method, self.model, self.optimizer, self.scaler = method, model, optimizer, scaler
        self.precision, self.device, self.grad_clip = precision, device, grad_clip
        self.judge, self.snapshot_rng = judge, snapshot_rng
        self.method_params = [p for p in method.parameters() if p.requires_grad]  # outside DDP
        self.clip_params = [p for g in optimizer.param_groups for p in g["params"]]
        # Without fp16's GradScaler (which decides its own skips), a step is checked one step late:
        # the fused optimiser skips a faulty update on the device by itself (found_inf), and the
        # host reads the verdict with the step's results after queuing the next step, so it never
        # waits for the GPU to drain. The GradScaler path decides at once, as it must.
        self.lagged = not precision.use_grad_scaler and bool(optimizer.defaults.get("fused"))
        self.pending: StepResults | None = None

    def step(self, batch: TrainBatch, ctx: StepContext, where: tuple[int, int, int] = (0, 0, 0), *,
             mark: Callable[[str], None] = _no_mark) -> None:
        """Run one step on ``batch``; the previous step (lagged) or this one is settled.

        Args:
            batch: the step's views ``(B, 3, H, W)``, labels ``(B,)`` and training-split rows ``(B,)``.
            ctx: what the method may know (epoch, global step, ...).
            where: (epoch, step in the epoch, global step), for a fault's message and checkpoint.
            mark: called after each phase ("forward+loss", "backward", "bookkeeping",
                "optimiser") with its name; ``benchmarks/throughput.py --phases`` times them.
        """
        optimizer, scaler, precision = self.optimizer, self.scaler, self.precision
        rng_before = rng_state() if self.lagged and self.snapshot_rng else None  # for its checkpoint
        with precision.autocast(self.device):
            out = self.method.training_step(self.model, batch, ctx)
        loss = out.loss.float()
        mark("forward+loss")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # even when non-finite: under DDP every rank must join the all-reduce
        dist_utils.average_gradients(self.method_params)  # method-owned modules are outside DDP
        mark("backward")
        scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(self.clip_params, self.grad_clip or float("inf"))
        # fp16's GradScaler skips inf-gradient steps itself; a non-finite loss is always a fault
        bad = ~torch.isfinite(loss) | (~torch.isfinite(gnorm) & (not precision.use_grad_scaler))
        loss_bad = dist_utils.all_reduce_sum(torch.stack([loss.detach(), bad.float()]))  # [sum of losses, faulty ranks]
        current = StepResults.start(out, batch.labels, batch.index, loss_bad, bad, where=where,
                                    fault=(batch.index, out.logits, loss.detach(), gnorm), rng=rng_before,
                                    reductions=self.method.stat_reductions)
        if self.lagged:
            self.settle()  # the previous step (the GPU finished it while this one was queued)
            mark("bookkeeping")
            step_unless_found_inf(optimizer, loss_bad[1] > 0)  # faulty ranks > 0: skipped on the device
            self.pending = current
        else:
            self.pending = current
            ok = self.settle()  # waits for this step's verdict
            mark("bookkeeping")
            if ok:
                scaler.step(optimizer)
                scaler.update()
        mark("optimiser")

    def settle(self) -> bool:
        """Hand the step in flight, its verdict read, to ``judge``; True if it was fine (or there
        was none)."""
        p, self.pending = self.pending, None
        if p is None:
            return True
        p.wait()
        return self.judge(p)


__all__ = ["StepResults", "Stepper", "step_unless_found_inf"]
