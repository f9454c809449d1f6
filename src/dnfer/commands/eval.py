"""``dnfer eval``: test accuracy of a checkpoint on a dataset's (clean) test split."""

from __future__ import annotations

import argparse
from pathlib import Path

from dnfer.commands._common import (
    add_data_args,
    add_json_arg,
    add_trust_arg,
    check_positive,
    key_values,
    print_json,
)
from dnfer.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a dataset's test split")
    p.add_argument("--checkpoint", required=True, metavar="FILE")
    add_data_args(p, default_help="the checkpoint's training data")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    add_json_arg(p, "the result (accuracy, per-class accuracy, counts)")
    add_trust_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dnfer.engine.evaluate import evaluate_checkpoint

    check_positive("--batch-size", args.batch_size)
    if Path(args.checkpoint).is_dir():
        raise ConfigError(f"--checkpoint {args.checkpoint!r} is a folder; expected a checkpoint file (e.g. RUN/last.pt)")
    res = evaluate_checkpoint(args.checkpoint, data=args.data, data_options=key_values(args.data_option, "--data-option"),
                              device=args.device, batch_size=args.batch_size,
                              trust_checkpoint=args.trust_checkpoint)
    if args.json:
        print_json(res)
        return 0
    print(f"{res['checkpoint']} on {res['dataset']} ({res['n_test']} test images): accuracy {100 * res['test_acc']:.2f}%")
    width = max(len(c) for c in res["class_names"])
    for name, acc in zip(res["class_names"], res["per_class_acc"], strict=True):
        print(f"  {name:<{width}}  {'-' if acc is None else f'{100 * acc:6.2f}%'}")
    return 0
