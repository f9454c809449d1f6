"""Clean-sample selection quality of DNFER's threshold policies on simulated posteriors.

A controlled stand-in for a training run (which the 2-core CPU cannot afford at a size where the
model learns): a stream of mini-batches with 30 % symmetric label noise and posteriors from a
simulated network of given quality, then DNFER's rule ``p_i(y_i) >= tau[y_i]`` with each policy.

Posterior model, per sample with true class t and given (noisy) label y:
``z = quality * onehot(t) + memorisation * onehot(y) + log(prior) + N(0, 1)``, ``p = softmax(z)``,
with true classes drawn from ``prior`` (RAF-DB's training frequencies by default, ``--prior
uniform`` for balanced classes; a network trained on imbalanced data carries the log-prior bias).
``quality`` is how well the network knows the true class; ``memorisation`` how much it has fitted
the given label (which is what makes noisy samples look clean late in training).

Usage: ``python benchmarks/threshold_selection.py [--prior raf|uniform] [--batches 300] [--seed 0]``.
Results: docs/methods.md, "Selection quality on simulated posteriors".
"""

from __future__ import annotations

import argparse

import torch

from dnfer.methods.dnfer import select_clean
from dnfer.methods.thresholds import create_threshold

POLICIES = [
    ("batch_mean", {}), ("fixed", {"value": 0.5}), ("label_mean", {}),
    ("ema", {"momentum": 0.999}), ("ema", {"momentum": 0.9}),
    ("freematch", {"momentum": 0.999}), ("freematch", {"momentum": 0.9}),
]


#: RAF-DB training-split counts in RAF order (surprise, fear, disgust, happiness, sadness, anger, neutral).
RAF_COUNTS = [1290, 281, 717, 4772, 1982, 705, 2524]


def simulate(policy: str, params: dict, *, quality: float, memorisation: float, batches: int, batch_size: int,
             k: int, noise: float, seed: int, prior: torch.Tensor) -> dict[str, float]:
    g = torch.Generator().manual_seed(seed)
    pol = create_threshold(policy, k, params)
    tp = sel = clean_total = 0
    # the first half of the stream lets stateful policies settle; only the second half is scored
    for step in range(batches):
        t = torch.multinomial(prior, batch_size, replacement=True, generator=g)
        flip = torch.rand(batch_size, generator=g) < noise
        other = (t + torch.randint(1, k, (batch_size,), generator=g)) % k  # a uniformly random DIFFERENT class
        y = torch.where(flip, other, t)
        z = quality * torch.nn.functional.one_hot(t, k) + memorisation * torch.nn.functional.one_hot(y, k)
        z = z.float() + prior.log() + torch.randn(batch_size, k, generator=g)
        p = z.softmax(1)
        mask = select_clean(p, y, pol(p, y))
        if step >= batches // 2:
            clean = ~flip
            tp += int((mask & clean).sum())
            sel += int(mask.sum())
            clean_total += int(clean.sum())
    n = (batches - batches // 2) * batch_size
    prec = tp / max(sel, 1)
    rec = tp / max(clean_total, 1)
    return {"fraction": sel / n, "precision": prec, "recall": rec, "f1": 2 * prec * rec / max(prec + rec, 1e-12)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prior", choices=("raf", "uniform"), default="raf")
    a = ap.parse_args()
    if a.prior == "raf":
        if a.classes != 7:
            ap.error("--prior raf needs --classes 7")
        prior = torch.tensor(RAF_COUNTS, dtype=torch.float32)
    else:
        prior = torch.ones(a.classes)
    prior = prior / prior.sum()
    settings = [(1.0, 0.0), (2.5, 0.0), (4.0, 0.0), (2.5, 1.5)]
    print("| policy | " + " | ".join(f"q={q:g} m={m:g}: sel / P / R / F1" for q, m in settings) + " |")
    print("|---|" + "---|" * len(settings))
    for name, params in POLICIES:
        label = name + "".join(f" {k}={v}" for k, v in params.items())
        cells = []
        for q, m in settings:
            r = simulate(name, params, quality=q, memorisation=m, batches=a.batches, batch_size=a.batch_size,
                         k=a.classes, noise=a.noise, seed=a.seed, prior=prior)
            cells.append(" / ".join(f"{100 * r[x]:.0f}" for x in ("fraction", "precision", "recall", "f1")))
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
