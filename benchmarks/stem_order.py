"""ResNet stem: ReLU then max-pool (torchvision) vs max-pool then ReLU (dnfer), same model.

Run:  .venv/bin/python benchmarks/stem_order.py [--model resnet18] [--image-size 112]
      [--batch-size 256] [--rounds 12] [--steps 3] [--threads 2]

The two orders compute the same numbers (checked here on the first batch, bit for bit, and in
tests/test_models.py); the pooled order runs the stem's ReLU and its backward on a quarter of
the pixels. One process, one model: the backbone's children are put in either order between
rounds (neither module has parameters), rounds alternate which order goes first, and each
times ``--steps`` training steps (bf16 autocast where the CPU has it, channels_last, fused
Adam, dnfer's small-map convolutions and malloc setting, i.e. the floor of
benchmarks/throughput.py) after one warm-up step. Last line: median of per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from dnfer.engine.cpu_tuning.host_memory import retain_freed_memory
from dnfer.engine.cpu_tuning.small_map_conv import use_small_map_conv
from dnfer.engine.device import resolve_precision
from dnfer.models.factory import create_model
from dnfer.registry import load_builtins

ORDERS = {"relu-then-pool (torchvision)": ("relu", "maxpool"), "pool-then-relu (dnfer)": ("maxpool", "relu")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=256, help="views per step (dnfer's 128 images x 2 views)")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    load_builtins()
    torch.set_num_threads(args.threads)
    retain_freed_memory()
    precision = resolve_precision("auto", torch.device("cpu"))
    torch.manual_seed(0)
    model = create_model(args.model, 7, image_size=args.image_size).to(memory_format=torch.channels_last)
    use_small_map_conv(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 7, (args.batch_size,), generator=g)
    children = OrderedDict(model.backbone.named_children())
    if "maxpool" not in children or isinstance(children["maxpool"], nn.Identity):
        print(f"{args.model} at {args.image_size} px has no stem max-pool: nothing to compare")
        return 1

    def use_order(pair: tuple[str, str]) -> None:
        names = [n for n in children if n not in ("relu", "maxpool")]
        names[2:2] = pair  # after conv1, bn1
        model.backbone = nn.Sequential(OrderedDict((n, children[n]) for n in names))

    def loss_of(batch: torch.Tensor) -> torch.Tensor:
        with precision.autocast(torch.device("cpu")):
            return F.cross_entropy(model(batch).float(), y[: len(batch)])

    def step() -> None:
        loss = loss_of(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    checks = []
    for pair in ORDERS.values():
        use_order(pair)
        model.zero_grad(set_to_none=True)
        loss = loss_of(x[:32])
        loss.backward()
        checks.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    same = torch.equal(checks[0][0], checks[1][0]) and all(
        torch.equal(a, b) for a, b in zip(checks[0][1], checks[1][1], strict=True))
    print(f"{args.model}, {args.image_size} px, {args.batch_size} views, {precision.name}, {args.threads} threads;"
          f" loss and all gradients bit-identical between the orders: {same}")

    rates: dict[str, list[float]] = {k: [] for k in ORDERS}
    for r in range(args.rounds):
        for name in list(ORDERS)[:: 1 if r % 2 == 0 else -1]:
            use_order(ORDERS[name])
            step()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()) + " views/s", flush=True)
    print(f"\n{'order':<32}{'views/s median':>16}{'min':>8}{'max':>8}")
    for k, v in rates.items():
        print(f"{k:<32}{statistics.median(v):>16.1f}{min(v):>8.1f}{max(v):>8.1f}")
    a, b = rates.values()
    ratios = [q / p for p, q in zip(a, b, strict=True)]
    print(f"step speed pool-then-relu / relu-then-pool: per-round median {statistics.median(ratios):.3f}"
          f" (range {min(ratios):.3f}-{max(ratios):.3f})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
