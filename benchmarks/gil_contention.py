"""How much the batch helper thread slows the training thread's op issue through the GIL.

Run:  .venv/bin/python benchmarks/gil_contention.py [--rounds 5] [--batch-size 128] [--image-size 16]

Why: on a GPU, ``TrainBatches`` prepares the next batch in a helper thread (``BatchAugment`` on
a side stream) while the main thread issues the model's kernels. Both threads are mostly
Python plus PyTorch dispatch; PyTorch drops the GIL inside each op, but the Python between ops
holds it, so every op the main thread issues may first wait for the helper to let go. That
waiting is host time the GPU can spend idle, and it cannot be seen in a profile of the GPU.

This reproduces the two threads on the CPU, where every op's compute is tiny (small tensors, one
intra-op thread each), so the ops behave like asynchronous kernel launches: host-bound dispatch.

  main:   a ResNet-18 forward + backward at 2 channels wide on a (2, 3, 16, 16) batch (the real
          model's modules and ops, about none of its arithmetic; the backward runs in
          autograd's C++ thread), as fast as it goes.
  helper: ``TrainBatches``' work on the CPU: gather a uint8 batch and make its weak and strong
          views with ``BatchAugment`` (``--batch-size`` images at ``--image-size`` px), in a loop.

Variants, interleaved over ``--rounds`` rounds (median reported):

  alone       the main thread with the helper idle (the floor of host time per step)
  + helper    the same with the helper thread working, at the interpreter's switch interval
  + helper, switch interval X ms   the same with ``sys.setswitchinterval(X / 1000)``

For each it prints the main thread's ms per step and the helper's batches/s over the same
window. The last line gives the main thread's slowdown with the helper at the default interval.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import numpy as np
import torch

from dnfer.data.transforms import BatchAugment


def narrow_resnet18(width: int) -> torch.nn.Module:
    """ResNet-18's modules and op sequence at ``width`` channels in the first stage: the same
    Python work per forward as the real model, almost none of its arithmetic."""
    from torchvision.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=7)
    net.inplanes = width
    net.conv1 = torch.nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = torch.nn.BatchNorm2d(width)
    for i, mult in enumerate((1, 2, 4, 8), start=1):
        setattr(net, f"layer{i}", net._make_layer(BasicBlock, mult * width, 2, stride=1 if i == 1 else 2))
    net.fc = torch.nn.Linear(8 * width, 7)
    return net


def main_step_fn(model: torch.nn.Module, x: torch.Tensor):
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).float().logsumexp(1).mean().backward()
    return step


class Helper(threading.Thread):
    """Makes weak + strong views of ``images`` rows in a loop while ``running`` is set."""

    def __init__(self, images: np.ndarray, batch_size: int, image_size: int) -> None:
        super().__init__(daemon=True)
        self.images, self.batch_size = images, batch_size
        self.weak = BatchAugment(image_size, strong=False)
        self.strong = BatchAugment(image_size, strong=True)
        self.running, self.stop = threading.Event(), False
        self.batches = 0
        self.gen = torch.Generator().manual_seed(0)
        self.rng = np.random.default_rng(0)

    def run(self) -> None:
        while not self.stop:
            if not self.running.wait(0.05):
                continue
            idx = self.rng.choice(len(self.images), self.batch_size, replace=False)
            x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2)
            self.weak(x, generator=self.gen)
            self.strong(x, generator=self.gen)
            self.batches += 1


def measure(step, helper: Helper | None, steps: int, interval: float | None) -> tuple[float, float]:
    """(main ms per step, helper batches/s) with the helper working or not."""
    default = sys.getswitchinterval()
    if interval is not None:
        sys.setswitchinterval(interval)
    try:
        if helper is not None:
            helper.running.set()
            time.sleep(0.02)  # let it get going
        start_batches = helper.batches if helper else 0
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        elapsed = time.perf_counter() - t0
        made = (helper.batches - start_batches) if helper else 0
    finally:
        if helper is not None:
            helper.running.clear()
        sys.setswitchinterval(default)
    time.sleep(0.05)  # the helper finishes its batch
    return 1000 * elapsed / steps, made / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30, help="main-thread steps per measurement")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--intervals-ms", default="1,0.1", help="extra switch intervals to try, comma-separated ms")
    args = ap.parse_args()

    torch.set_num_threads(1)  # one core per thread: the ops stand in for asynchronous launches
    torch.manual_seed(0)
    model = narrow_resnet18(2)
    x = torch.randn(2, 3, 16, 16)
    step = main_step_fn(model, x)
    for _ in range(3):
        step()
    images = np.random.default_rng(1).integers(0, 256, (1024, args.image_size, args.image_size, 3), dtype=np.uint8)
    helper = Helper(images, args.batch_size, args.image_size)
    helper.start()

    default_ms = sys.getswitchinterval() * 1000
    variants: list[tuple[str, bool, float | None]] = [("alone", False, None), ("+ helper", True, None)]
    for ms in (float(v) for v in args.intervals_ms.split(",") if v.strip()):
        variants.append((f"+ helper, switch interval {ms:g} ms", True, ms / 1000))
    results: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in variants}
    print(f"python {sys.version.split()[0]}  torch {torch.__version__}  switch interval {default_ms:g} ms; "
          f"main: resnet18 at width 2, fwd+bwd on (2, 3, 16, 16); helper: weak+strong BatchAugment of "
          f"{args.batch_size} x {args.image_size} px; {args.steps} steps x {args.rounds} rounds, interleaved")
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for name, with_helper, interval in order:
            results[name].append(measure(step, helper if with_helper else None, args.steps, interval))
    helper.stop = True

    print(f"\n{'variant':<36} {'main ms/step':>13} {'range':>15} {'helper batches/s':>17}")
    med = {}
    for name, _, _ in variants:
        ms = [m for m, _ in results[name]]
        bps = [b for _, b in results[name]]
        med[name] = statistics.median(ms)
        print(f"{name:<36} {med[name]:>13.2f} {min(ms):>7.2f}-{max(ms):<7.2f} "
              f"{statistics.median(bps) if any(bps) else float('nan'):>17.1f}")
    print(f"\nmain thread slowed by the helper (default {default_ms:g} ms interval): "
          f"{med['+ helper'] / med['alone']:.2f}x")


if __name__ == "__main__":
    main()
