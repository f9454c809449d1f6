"""Convolutions with small output maps on CPU: PyTorch's oneDNN call vs a mosaic (engine.cpu_tuning.small_map_conv).

Run:  .venv/bin/python benchmarks/small_map_conv.py [--threads 2] [--batch 256] [--rounds 5]
      [--layers-only | --steps-only]
Results: docs/performance.md, "Small-map convolutions as a mosaic".

Part 1 times forward + backward (input and weight gradients) of every convolution shape of
ResNet-18 at 112 px and of resnet10_slim at 64 px (batch ``--batch`` views, bf16, channels_last):
``F.conv2d`` as PyTorch runs it against :func:`dnfer.engine.cpu_tuning.small_map_conv.mosaic_conv2d`, and
marks which shapes the trainer sends to the mosaic (output map <= MAX_OUTPUT_PIXELS).
Part 2 times whole training steps (forward, backward, Adam; bf16 autocast; random inputs) with
``train.small_map_conv`` native vs auto, interleaved native, auto, auto, native, ... over
``--rounds`` rounds, and prints the median of the per-round ratios: the machine's speed drifts,
a ratio of neighbouring runs does not drift with it.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dnfer.engine.cpu_tuning.small_map_conv import MAX_OUTPUT_PIXELS, mosaic_conv2d, use_small_map_conv
from dnfer.models.factory import create_model

CL = torch.channels_last


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def conv_shapes(model_name: str, size: int) -> list[tuple[int, int, int, int, tuple[int, int], tuple[int, int],
                                                           tuple[int, int]]]:
    """Distinct (C, O, H, W, kernel, stride, padding) of the model's convolutions at ``size`` px."""
    model = create_model(model_name, 7, image_size=size).eval()
    seen: dict[tuple, None] = {}

    def hook(m: torch.nn.Conv2d, inputs: tuple[torch.Tensor], _out: torch.Tensor) -> None:
        x = inputs[0]
        seen[(m.in_channels, m.out_channels, x.shape[2], x.shape[3], m.kernel_size, m.stride, m.padding)] = None

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return list(seen)


def layers(batch: int, repeats: int) -> list[float]:
    print(f"\nPart 1: forward + backward (input and weight gradients), batch {batch}, bf16, channels_last, "
          f"median of {repeats} (ms)")
    print(f"{'model':<14}{'conv C->O k/s at HxW':<28}{'out px':>7}{'oneDNN':>9}{'mosaic':>9}{'ratio':>7}  trainer")
    ratios_taken = []
    for model_name, size in (("resnet18", 112), ("resnet10_slim", 64)):
        for c, o, h, w, k, s, p in conv_shapes(model_name, size):
            ho, wo = (h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1
            x = torch.randn(batch, c, h, w, dtype=torch.bfloat16).contiguous(memory_format=CL).requires_grad_(c > 3)
            wt = (0.05 * torch.randn(o, c, *k)).to(torch.bfloat16).contiguous(memory_format=CL).requires_grad_()
            go = torch.randn(batch, o, ho, wo, dtype=torch.bfloat16).contiguous(memory_format=CL)

            def native(x=x, wt=wt, go=go, s=s, p=p) -> None:
                F.conv2d(x, wt, None, s, p).backward(go)

            def mosaic(x=x, wt=wt, go=go, s=s, p=p) -> None:
                mosaic_conv2d(x, wt, None, stride=s, padding=p).backward(go)

            t_native, t_mosaic = median_ms(native, repeats), median_ms(mosaic, repeats)
            taken = ho * wo <= MAX_OUTPUT_PIXELS
            if taken:
                ratios_taken.append(t_native / t_mosaic)
            name = f"{c}->{o} {k[0]}x{k[1]}/{s[0]} at {h}x{w}"
            print(f"{model_name:<14}{name:<28}{ho * wo:>7}{t_native:>9.2f}{t_mosaic:>9.2f}{t_native / t_mosaic:>7.2f}"
                  f"  {'mosaic' if taken else 'oneDNN'}", flush=True)
    return ratios_taken


def step_rate(model_name: str, size: int, batch: int, mosaic: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = create_model(model_name, 7, image_size=size).to(memory_format=CL).train()
    if mosaic:
        use_small_map_conv(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=CL)
    y = torch.randint(0, 7, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / (median_ms(step, steps) / 1e3)


def steps(batch: int, rounds: int, n_steps: int) -> list[float]:
    print(f"\nPart 2: training steps (bf16 autocast, Adam), batch {batch} views, median of {n_steps} steps"
          f" per run, {rounds} rounds (views/s)")
    print(f"{'model':<24}{'native':>9}{'auto':>9}{'per-round ratios':>40}{'median':>8}")
    medians = []
    for model_name, size in (("resnet18", 112), ("resnet10_slim", 64)):
        native, auto = [], []
        for r in range(rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for mosaic in order:
                (auto if mosaic else native).append(step_rate(model_name, size, batch, mosaic, n_steps))
        ratios = [a / n for a, n in zip(auto, native, strict=True)]
        medians.append(statistics.median(ratios))
        print(f"{f'{model_name} {size} px':<24}{statistics.median(native):>9.1f}{statistics.median(auto):>9.1f}"
              f"{' '.join(f'{r:.2f}' for r in ratios):>40}{medians[-1]:>8.2f}", flush=True)
    return medians


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256, help="views per convolution call / training step "
                    "(dnfer's 128 images x 2 views)")
    ap.add_argument("--repeats", type=int, default=9, help="timed calls per layer and variant")
    ap.add_argument("--rounds", type=int, default=5, help="native/auto pairs of training-step runs per model")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per training-step run")
    ap.add_argument("--layers-only", action="store_true")
    ap.add_argument("--steps-only", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  {platform.node()}  torch {torch.__version__}"
          f"  {args.threads} threads  {platform.processor() or platform.machine()}")
    taken = [] if args.steps_only else layers(args.batch, args.repeats)
    step_ratios = [] if args.layers_only else steps(args.batch, args.rounds, args.steps)
    if taken:
        print(f"\nforward + backward of the convolutions the trainer sends to the mosaic: oneDNN/mosaic "
              f"{min(taken):.2f}-{max(taken):.2f}x (median {statistics.median(taken):.2f}x)")
    if step_ratios:
        print(f"training step speed-up auto/native: resnet18 112 px {step_ratios[0]:.2f}x, "
              f"resnet10_slim 64 px {step_ratios[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
