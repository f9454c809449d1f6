"""Training throughput: the authors' style of input pipeline vs dnfer's defaults vs the model alone.

Run:  .venv/bin/python benchmarks/throughput.py [--image-size 112] [--batch-size 128] [--steps 8]
      [--rounds 3] [--device cpu|cuda] [--precision auto] [--workers 2] [--phases]

Three ways to run the same DNFER training step (ResNet-18, same image size and batch, Adam with
the paper's two learning rates), each timed over ``--steps`` steps after ``--warmup`` untimed
ones, interleaved a, b, c, c, b, a, a, b, c, ... over ``--rounds`` rounds (median images/s reported, so
drift from other load hits all three alike):

(a) reference, built the way the authors' code works: every epoch each sample's JPEG file is
    decoded with cv2 (BGR->RGB, resized to the training size), its weak and strong views are
    made per sample by torchvision transforms and normalised to float32 inside DataLoader worker
    processes (``--workers``, shuffled, drop_last), then the model runs in fp32, NCHW, with two
    separate forward passes (weak, then strong). On a CPU the workers share the cores with the
    model's threads, as they do for the authors' users.
(b) dnfer's defaults: uint8 batches read from the prepared cache (``dnfer prepare`` format, built
    here from the same JPEGs), moved to the device (pinned, non-blocking on CUDA), augmented there
    by ``BatchAugment``, both views in one forward pass, ``--precision`` (auto = bf16 autocast
    where supported), channels_last where dnfer enables it, and the trainer's own training step
    (``dnfer.engine.step.Stepper``: gradient norm, finite flags, the per-sample statistics queued
    and the last step's read, the fault verdict handed to the fused optimiser), the trainer's
    ``train.small_map_conv`` rule (``--small-map-conv``) and its ``train.malloc`` rule
    (``--malloc``: on a CPU, freed memory stays in the process).
(c) the floor: the model's forward + backward + optimiser step on fixed random tensors already
    on the device, at dnfer's precision, memory format and malloc setting, with nothing else.

The malloc setting is process-wide, so it is switched before each variant runs: (a) gets the C
library's behaviour (``--reference-malloc system``, as the authors' scripts have it; glibc's
adaptive thresholds at their steady state, which if anything favours (a)), (b) and (c) dnfer's.

On a CPU each round's line and the start and end also print a host probe (bf16 and fp32
matmul TFLOPS, copy GB/s): on a shared host the bf16 throughput can swing 3x within minutes
while fp32 barely moves, and the speedup moves with it.

The last lines print ``speedup (b)/(a)`` and ``efficiency (b)/(c)``. ``--phases`` also prints
where a step of (b) spends its time (batch preparation, forward+loss, backward, bookkeeping,
optimiser, as marked by the Stepper; synchronised on CUDA, so pessimistic there: the trainer
itself never waits for the GPU within a step).

Results: docs/performance.md, "Training throughput" and "GPU".
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

import dnfer.data.folder  # noqa: F401 - registers the folder adapter
from dnfer.config import Config
from dnfer.data.cache import build_cache, open_cache
from dnfer.data.classes import BASIC7
from dnfer.data.spec import DataSpec
from dnfer.data.transforms import normalize, strong_transform, weak_transform
from dnfer.engine.batches import AugmentSettings, TrainBatches
from dnfer.engine.build import build_optimizer, seed_everything
from dnfer.engine.cpu_tuning.host_memory import retain_freed_memory, system_malloc, wants_retained_memory
from dnfer.engine.cpu_tuning.small_map_conv import use_small_map_conv, wants_small_map_conv
from dnfer.engine.device import Precision, default_channels_last, resolve_device, resolve_precision
from dnfer.engine.records import EpochStats
from dnfer.engine.step import Stepper, StepResults
from dnfer.engine.trainer import build_method
from dnfer.methods.base import Method, StepContext, TrainBatch
from dnfer.models.factory import FERNet, create_model

#: The DNFER loss after warm-up (selection + consistency) is the one timed.
EPOCH = 5
CTX = StepContext(epoch=EPOCH, step=0, num_epochs=EPOCH + 1)


# --- data -----------------------------------------------------------------------------------------


def make_jpegs(root: Path, n: int, side: int = 100, seed: int = 0) -> tuple[list[Path], np.ndarray]:
    """``n`` RAF-like aligned-face-sized JPEGs (``side`` px, quality 90, smooth random texture)
    under ``root/train/<class>/`` plus a few under ``root/test/`` (the cache needs a test split).
    Returns the training files and their labels."""
    rng = np.random.default_rng(seed)
    files, labels = [], []
    for i in range(n + len(BASIC7)):
        small = rng.integers(0, 256, (side // 8 + 1, side // 8 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
        label = i % len(BASIC7)
        split = "train" if i < n else "test"
        p = root / split / BASIC7[label] / f"{i:06d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        img.save(p, quality=90)
        if split == "train":
            files.append(p)
            labels.append(label)
    return files, np.array(labels, np.int64)


class ReferenceDataset(torch.utils.data.Dataset):
    """The authors' kind of dataset: decode the file on every access, then per-sample views.

    Returns ``(weak float32 (3,S,S), strong float32 (3,S,S), label, index)``, normalised.
    """

    def __init__(self, files: list[Path], labels: np.ndarray, size: int, mean: tuple[float, ...],
                 std: tuple[float, ...]) -> None:
        self.files, self.labels, self.size = [str(f) for f in files], labels, size
        self.mean, self.std = mean, std
        self.weak, self.strong = weak_transform(size), strong_transform(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        img = cv2.imread(self.files[i], cv2.IMREAD_COLOR)
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        x = torch.from_numpy(img).permute(2, 0, 1).contiguous()
        return (normalize(self.weak(x), self.mean, self.std), normalize(self.strong(x), self.mean, self.std),
                int(self.labels[i]), i)


# --- the three variants ---------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One way of running training steps; ``run(n)`` does ``n`` steps and returns seconds."""

    name = ""

    def run(self, warmup: int, steps: int) -> float:
        raise NotImplementedError


def _build(cfg: Config, image_size: int, n_train: int, device: torch.device, channels_last: bool,
           precision: Precision | None = None, compiled: bool = False) -> tuple[FERNet, Method, torch.optim.Optimizer]:
    """The trainer's model set-up; ``precision`` None is the reference (no dnfer speed settings)."""
    model = create_model(cfg.model.name, len(BASIC7), image_size=image_size)
    method = build_method(cfg, len(BASIC7), n_train)
    method.setup(model)
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    method.to(device)
    if precision is not None and wants_small_map_conv(cfg.train.small_map_conv, device, precision,
                                                      compiled=compiled):
        use_small_map_conv(model, method)
    model.train()
    return model, method, build_optimizer(cfg, model, method)


class Reference(Variant):
    name = "(a) reference"

    def __init__(self, cfg: Config, files: list[Path], labels: np.ndarray, image_size: int, batch: int,
                 device: torch.device, workers: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.device = device
        self.model, self.method, self.opt = _build(cfg, image_size, len(files), device, channels_last=False)
        # Two separate forward passes, as the authors' loop does (model(weak), model(strong)).
        self.method.forward_views = lambda model, b: {v: model(b.views[v]).float() for v in ("weak", "strong")}
        self.loader = torch.utils.data.DataLoader(
            ReferenceDataset(files, labels, image_size, mean, std), batch_size=batch, shuffle=True,
            num_workers=workers, drop_last=True, pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(0))

    def step(self, batch: Any) -> None:
        w, s, y, idx = batch
        dev = self.device
        views = {"weak": w.to(dev, non_blocking=True), "strong": s.to(dev, non_blocking=True)}
        out = self.method.training_step(self.model, TrainBatch(views, y.to(dev), idx.to(dev)), CTX)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        out.loss.item()  # the authors log the loss every step

    def run(self, warmup: int, steps: int) -> float:
        it = iter(self.loader)  # a new epoch: worker processes start, files are decoded again
        for _ in range(warmup):
            self.step(next(it))
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step(next(it))
        _sync(self.device)
        dt = time.perf_counter() - t0
        del it  # shuts the workers down so they cannot steal cores from the other variants
        return dt


class Dnfer(Variant):
    name = "(b) dnfer"

    def __init__(self, cfg: Config, cache_dir: Path, image_size: int, batch: int, device: torch.device,
                 precision: Precision, channels_last: bool, compile_model: bool) -> None:
        ds = open_cache(cache_dir)
        self.device, self.precision = device, precision
        self.model, self.method, self.opt = _build(cfg, image_size, len(ds.train), device, channels_last,
                                                   precision, compile_model)
        self.train_model: torch.nn.Module = torch.compile(self.model) if compile_model else self.model
        pre = self.model.preprocessing
        self.batches = TrainBatches(
            ds.train.images, ds.train.labels, views=self.method.views, batch_size=batch, device=device,
            mean=pre.mean, std=pre.std, seed=1, channels_last=channels_last,
            aug=AugmentSettings(image_size))
        scaler = torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)
        n, k = len(ds.train), len(BASIC7)
        self.stats = EpochStats(selected=np.full((n, 2), -1, np.int8), probs=np.zeros((n, k), np.float16))
        # The trainer's step, with its default nan_policy (stop: an RNG snapshot per lagged step)
        self.stepper = Stepper(self.method, self.train_model, self.opt, scaler, precision, device,
                               grad_clip=cfg.optim.grad_clip, judge=self._judge, snapshot_rng=True)
        self.epoch = 0
        self.phases: dict[str, list[float]] = {}
        self.cpu_phases: dict[str, list[float]] = {}

    def step(self, xviews: dict[str, torch.Tensor], labels: torch.Tensor, index: torch.Tensor,
             mark: Callable[[str], None]) -> None:
        """One step of ``dnfer.engine.trainer.fit``'s loop (single process): the same Stepper."""
        self.stepper.step(TrainBatch(xviews, labels, index), CTX, mark=mark)
        self.stats.steps += 1

    def _judge(self, p: StepResults) -> bool:
        """The trainer's verdict on a settled step: add its results, or skip it (no faults here)."""
        if p.faulty_ranks:
            self.stats.skipped_steps += 1
            return False
        p.add_to(self.stats, 1)
        return True

    def run(self, warmup: int, steps: int, phases: bool = False) -> float:
        it: Iterator = self.batches.epoch(self.epoch)
        self.epoch += 1
        last = [0.0, 0.0]

        def mark(phase: str) -> None:
            # wall and process CPU seconds (all threads); CPU time is the better guide when
            # other jobs share the cores, since waiting for a core is not counted
            if phases:
                _sync(self.device)
                now, cpu = time.perf_counter(), time.process_time()
                self.phases.setdefault(phase, []).append(now - last[0])
                self.cpu_phases.setdefault(phase, []).append(cpu - last[1])
                last[0], last[1] = now, cpu

        for _ in range(warmup):
            self.step(*next(it), mark=lambda _p: None)
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            last[0], last[1] = time.perf_counter(), time.process_time()
            batch = next(it)
            mark("batch (read+augment+normalise)")
            self.step(*batch, mark=mark)
        _sync(self.device)
        dt = time.perf_counter() - t0
        it.close()
        return dt


class Floor(Variant):
    name = "(c) floor"

    def __init__(self, cfg: Config, image_size: int, batch: int, device: torch.device, precision: Precision,
                 channels_last: bool, compile_model: bool) -> None:
        self.device, self.precision = device, precision
        self.model, self.method, self.opt = _build(cfg, image_size, batch, device, channels_last, precision,
                                                   compile_model)
        self.train_model: torch.nn.Module = torch.compile(self.model) if compile_model else self.model
        g = torch.Generator().manual_seed(0)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.views = {v: torch.randn(batch, 3, image_size, image_size, generator=g).to(device).contiguous(
            memory_format=fmt) for v in self.method.views}
        self.labels = torch.randint(0, len(BASIC7), (batch,), generator=g).to(device)
        self.index = torch.arange(batch, device=device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)

    def step(self) -> None:
        with self.precision.autocast(self.device):
            out = self.method.training_step(self.train_model, TrainBatch(self.views, self.labels, self.index), CTX)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss.float()).backward()
        self.scaler.step(self.opt)
        self.scaler.update()

    def run(self, warmup: int, steps: int) -> float:
        for _ in range(warmup):
            self.step()
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        _sync(self.device)
        return time.perf_counter() - t0


def profile_dnfer(var: Dnfer, warmup: int, steps: int, trace: Path | None) -> None:
    """torch.profiler over ``steps`` steps of (b): the ops with the most self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if var.device.type == "cuda" else [])
    var.run(warmup, 1)
    with profile(activities=acts, record_shapes=False) as prof:
        var.run(0, steps)
    sort = "self_cuda_time_total" if var.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=48))
    if trace is not None:
        prof.export_chrome_trace(str(trace))
        print(f"chrome trace: {trace}")


# --- main -----------------------------------------------------------------------------------------


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def host_probe(threads: int) -> str:
    """The CPU's state right now: bf16 and fp32 matmul throughput (2048^3, ``threads`` threads)
    and memory copy bandwidth. On a shared host these move by 2x within minutes and the
    speedup moves with them (bf16 loses more than fp32 when the host is contended), so every
    run prints them at its start and end to say which state it measured."""
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(2048, 2048).to(dtype)
        a @ a
        t0 = time.perf_counter()
        for _ in range(4):
            a @ a
        out.append(f"{str(dtype).split('.')[-1]} mm {4 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e12:.2f} TFLOPS")
    x = torch.ones(64 * 2**20 // 4)
    y = torch.empty_like(x)
    y.copy_(x)
    t0 = time.perf_counter()
    for _ in range(8):
        y.copy_(x)
    out.append(f"copy {8 * 2 * x.numel() * 4 / (time.perf_counter() - t0) / 1e9:.1f} GB/s")
    return ", ".join(out) + f" ({threads} threads)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=128, help="samples per step (x2 views); 128 is the"
                    " authors' and dnfer's default")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per variant per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto", help="dnfer's precision for (b) and (c); (a) is always fp32")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the main process (CPU)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference pipeline")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model in (b) and (c)")
    ap.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                    help="memory format of (b) and (c); auto = dnfer's rule (default_channels_last)")
    ap.add_argument("--small-map-conv", choices=["auto", "native"], default="auto",
                    help="train.small_map_conv of (b) and (c): auto = dnfer's default (convolutions with "
                         "output maps <= 7x7 on a mosaic under bf16 on CPU), native = PyTorch's convolutions")
    ap.add_argument("--malloc", choices=["auto", "system"], default="auto",
                    help="train.malloc of (b) and (c): auto = dnfer's default (keep freed memory in the "
                         "process on a CPU), system = the C library's defaults")
    ap.add_argument("--reference-malloc", choices=["system", "auto"], default="system",
                    help="the same for (a): system (default) is how the authors' scripts run")
    ap.add_argument("--no-deterministic", action="store_true",
                    help="allow non-deterministic kernels (dnfer trains deterministically by default)")
    ap.add_argument("--phases", action="store_true", help="also print where a step of (b) spends its time")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing, run torch.profiler over --steps steps of (b) and print the top ops")
    ap.add_argument("--trace", help="with --profile: also write a chrome trace to this file")
    ap.add_argument("--variants", default="abc", help="which variants to run (subset of abc)")
    ap.add_argument("--workdir", help="where to write the JPEGs and the cache (default: a temporary folder)")
    args = ap.parse_args(argv)

    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, device)
    # The trainer's settings (train.deterministic=True by default); process-wide, so the same for all three.
    seed_everything(0, not args.no_deterministic)
    s, b = args.image_size, args.batch_size
    channels_last = {"on": True, "off": False}.get(args.channels_last, default_channels_last(device))
    cfg = Config()
    cfg.model.name = args.model
    cfg.train.small_map_conv = args.small_map_conv
    n_train = (args.warmup + args.steps) * b + b  # enough for one round without wrapping

    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  {platform.node()}  python {platform.python_version()}"
          f"  torch {torch.__version__}  device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f", {args.threads} threads"))
    print(f"model {args.model}, {s} px, batch {b} (x2 views), {args.steps} timed steps after {args.warmup} warm-up, "
          f"{args.rounds} rounds interleaved (abc, cba, ...); dnfer precision {precision.name}, channels_last {channels_last}, "
          f"compile {args.compile}, small-map conv {args.small_map_conv}, malloc {args.malloc}, deterministic {not args.no_deterministic}; reference: fp32, {args.workers} "
          f"DataLoader workers, malloc {args.reference_malloc}; {n_train} training JPEGs")
    print(f"load average at start: {load_average()}")
    if device.type == "cpu":
        print(f"host at start: {host_probe(args.threads)}")

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        files, labels = make_jpegs(root / "jpegs", n_train)
        t0 = time.perf_counter()
        build_cache(DataSpec("folder", root / "jpegs", {}), image_size=s, out=root / "cache", seed=1,
                    skip_bad=False, workers=1)
        print(f"prepared cache of {n_train} images in {time.perf_counter() - t0:.1f} s (one-off, not timed below)")
        pre = create_model(args.model, 7, image_size=s).preprocessing
        mean, std = pre.mean, pre.std
        variants: dict[str, Any] = {}
        if args.profile:
            var = Dnfer(cfg, root / "cache", s, b, device, precision, channels_last, args.compile)
            profile_dnfer(var, args.warmup, args.steps, Path(args.trace) if args.trace else None)
            return 0
        if "a" in args.variants:
            variants["a"] = Reference(cfg, files, labels, s, b, device, args.workers, mean, std)
        if "b" in args.variants:
            variants["b"] = Dnfer(cfg, root / "cache", s, b, device, precision, channels_last, args.compile)
        if "c" in args.variants:
            variants["c"] = Floor(cfg, s, b, device, precision, channels_last, args.compile)
        rates: dict[str, list[float]] = {k: [] for k in variants}
        retain = {k: wants_retained_memory(args.reference_malloc if k == "a" else args.malloc, device.type)
                  for k in variants}
        for r in range(args.rounds):
            # a, b, c then c, b, a: a load that rises or falls during a round hits all alike
            for key, var in list(variants.items())[:: 1 if r % 2 == 0 else -1]:
                if device.type == "cpu":
                    (retain_freed_memory if retain[key] else system_malloc)()
                dt = var.run(args.warmup, args.steps, phases=args.phases) if key == "b" else var.run(
                    args.warmup, args.steps)
                rates[key].append(args.steps * b / dt)
            print(f"round {r + 1}: " + ", ".join(f"{variants[k].name} {rates[k][-1]:.1f}" for k in variants)
                  + f" img/s; load average {load_average()}"
                  + (f"; host {host_probe(args.threads)}" if device.type == "cpu" else ""))
            sys.stdout.flush()

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n{'variant':<16}{'img/s median':>14}{'min':>9}{'max':>9}")
    for k, var in variants.items():
        print(f"{var.name:<16}{med[k]:>14.1f}{min(rates[k]):>9.1f}{max(rates[k]):>9.1f}")
    if args.phases and "b" in variants:
        ph, cph = variants["b"].phases, variants["b"].cpu_phases
        total = sum(statistics.median(v) for v in ph.values())
        ctotal = sum(statistics.median(v) for v in cph.values())
        print("\nwhere a step of (b) goes (median per step; wall synchronised, CPU = process CPU time, all threads):")
        print(f"  {'phase':<32}{'wall ms':>9}{'share':>7}{'CPU ms':>9}{'share':>7}")
        for name, v in ph.items():
            m, c = statistics.median(v), statistics.median(cph[name])
            print(f"  {name:<32}{m * 1e3:>9.1f}{100 * m / total:>6.1f}%{c * 1e3:>9.1f}{100 * c / ctotal:>6.1f}%")
    print(f"load average at end: {load_average()}")
    if device.type == "cpu":
        print(f"host at end: {host_probe(args.threads)}")
    # Ratios round by round (the variants of one round ran back to back), then their median: on a
    # machine whose speed drifts this is steadier than the ratio of the medians, printed after it.
    def ratio(top: str, bottom: str) -> str:
        r = [x / y for x, y in zip(rates[top], rates[bottom], strict=True)]
        return (f"{statistics.median(r):.2f} (per-round ratios {min(r):.2f}-{max(r):.2f};"
                f" ratio of medians {med[top] / med[bottom]:.2f})")

    if "a" in med and "b" in med:
        print(f"speedup (b)/(a): {ratio('b', 'a')}")
    if "b" in med and "c" in med:
        print(f"efficiency (b)/(c): {ratio('b', 'c')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
