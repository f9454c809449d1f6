"""Convolution weight gradients on CPU: PyTorch's oneDNN kernel vs one matmul (engine.conv_grad).

Run:  .venv/bin/python benchmarks/conv_weight_grad.py [--threads 2] [--batch 128] [--rounds 5]
      [--layers-only | --steps-only]

Part 1 times the weight gradient alone for every convolution shape of ResNet-18 at 112 px and
of resnet10_slim at 64 px (batch ``--batch``, bf16 and fp32, channels_last), oneDNN
(``aten.convolution_backward`` with only the weight output) against
:func:`dnfer.engine.conv_grad.im2col_weight_grad`, and marks which shapes the trainer sends to
the matmul (output map <= MAX_OUTPUT_PIXELS, bf16).
Part 2 times whole training steps (forward, backward, Adam; bf16 autocast; random inputs) with
``train.conv_weight_grad`` native vs auto, interleaved native, auto, auto, native, ... over
``--rounds`` rounds, and prints the median of the per-round ratios: the machine's speed drifts,
a ratio of neighbouring runs does not drift with it.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dnfer.engine.conv_grad import MAX_OUTPUT_PIXELS, im2col_weight_grad, use_matmul_weight_grad
from dnfer.models.factory import create_model
from dnfer.registry import load_builtins

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
    print(f"\nPart 1: weight gradient alone, batch {batch}, channels_last, median of {repeats} (ms)")
    print(f"{'model':<14}{'conv C->O k/s at HxW':<28}{'out px':>7}{'dtype':>10}{'oneDNN':>9}{'matmul':>9}"
          f"{'ratio':>7}  trainer")
    ratios_taken = []
    for model_name, size in (("resnet18", 112), ("resnet10_slim", 64)):
        for c, o, h, w, k, s, p in conv_shapes(model_name, size):
            ho, wo = (h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1
            for dtype in (torch.bfloat16, torch.float32):
                x = torch.randn(batch, c, h, w, dtype=dtype).contiguous(memory_format=CL)
                wt = torch.randn(o, c, *k, dtype=dtype).contiguous(memory_format=CL)
                go = torch.randn(batch, o, ho, wo, dtype=dtype).contiguous(memory_format=CL)
                native = median_ms(functools.partial(
                    torch.ops.aten.convolution_backward, go, x, wt, None, list(s), list(p), [1, 1], False, [0, 0],
                    1, [False, True, False]), repeats)
                matmul = median_ms(functools.partial(im2col_weight_grad, go, x, kernel_size=k, stride=s, padding=p),
                                   repeats)
                taken = dtype == torch.bfloat16 and ho * wo <= MAX_OUTPUT_PIXELS
                if taken:
                    ratios_taken.append(native / matmul)
                name = f"{c}->{o} {k[0]}x{k[1]}/{s[0]} at {h}x{w}"
                print(f"{model_name:<14}{name:<28}{ho * wo:>7}{str(dtype)[6:]:>10}{native:>9.2f}{matmul:>9.2f}"
                      f"{native / matmul:>7.2f}  {'matmul' if taken else 'oneDNN'}", flush=True)
    return ratios_taken


def step_rate(model_name: str, size: int, batch: int, matmul: bool, steps: int) -> float:
    torch.manual_seed(0)
    model = create_model(model_name, 7, image_size=size).to(memory_format=CL).train()
    if matmul:
        use_matmul_weight_grad(model)
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
          f" per run, {rounds} rounds (img/s)")
    print(f"{'model':<24}{'native':>9}{'auto':>9}{'per-round ratios':>40}{'median':>8}")
    medians = []
    for model_name, size in (("resnet18", 112), ("resnet10_slim", 64)):
        native, auto = [], []
        for r in range(rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for matmul in order:
                (auto if matmul else native).append(step_rate(model_name, size, batch, matmul, n_steps))
        ratios = [a / n for a, n in zip(auto, native, strict=True)]
        medians.append(statistics.median(ratios))
        print(f"{f'{model_name} {size} px':<24}{statistics.median(native):>9.1f}{statistics.median(auto):>9.1f}"
              f"{' '.join(f'{r:.2f}' for r in ratios):>40}{medians[-1]:>8.2f}", flush=True)
    return medians


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128, help="images per convolution call / training step")
    ap.add_argument("--repeats", type=int, default=9, help="timed calls per layer and variant")
    ap.add_argument("--rounds", type=int, default=5, help="native/auto pairs of training-step runs per model")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per training-step run")
    ap.add_argument("--layers-only", action="store_true")
    ap.add_argument("--steps-only", action="store_true")
    args = ap.parse_args(argv)
    load_builtins()
    torch.set_num_threads(args.threads)
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  {platform.node()}  torch {torch.__version__}"
          f"  {args.threads} threads  {platform.processor() or platform.machine()}")
    taken = [] if args.steps_only else layers(args.batch, args.repeats)
    step_ratios = [] if args.layers_only else steps(args.batch, args.rounds, args.steps)
    if taken:
        print(f"\nweight gradient of the convolutions the trainer sends to the matmul: oneDNN/matmul "
              f"{min(taken):.2f}-{max(taken):.2f}x (median {statistics.median(taken):.2f}x)")
    if step_ratios:
        print(f"training step speed-up auto/native: resnet18 112 px {step_ratios[0]:.2f}x, "
              f"resnet10_slim 64 px {step_ratios[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
