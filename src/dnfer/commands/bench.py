"""``dnfer bench``: sweep methods x label noise x seeds under one shared budget (resumable)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dnfer.commands._common import (
    add_data_args,
    add_json_arg,
    add_offline_arg,
    add_progress_arg,
    apply_offline_arg,
    check_positive,
    human,
    key_values,
    print_json,
    progress_enabled,
)
from dnfer.io_safety import check_output_dir

# flag attribute -> dotted key of the shared base config
BASE_FLAGS = {
    "data": "data.spec", "image_size": "data.image_size", "val_fraction": "data.val_fraction", "cache": "data.cache",
    "model": "model.name", "pretrained": "model.pretrained", "epochs": "train.epochs",
    "batch_size": "train.batch_size", "device": "train.device", "precision": "train.precision",
    "threads": "train.threads",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="sweep methods x noise x seeds with a shared budget (resumable); tables and plot",
        description="Run every (method, noise, seed) cell as an ordinary run directory OUT/METHOD/NOISE/seedN, "
                    "skip finished cells, resume interrupted ones, retry failed ones, then write results.csv, "
                    "results.md and accuracy_vs_noise.png in OUT.")
    p.add_argument("--config", metavar="FILE",
                   help="sweep file (sweep: methods/noise/seeds, base: run config) or a plain run config as the base")
    p.add_argument("--methods", help="comma list of method labels (default: the file's, else dnfer_plus,dnfer,ce)")
    p.add_argument("--noise", help="comma list: none, symmetric:R, asymmetric:R, pairflip:R (default: the file's, "
                                   "else none,symmetric:0.3)")
    p.add_argument("--seeds", help="comma list of seeds (default: the file's, else 1)")
    p.add_argument("--out", metavar="DIR", help="sweep directory (default bench_runs/<config name> or bench_runs/sweep)")
    p.add_argument("--best-on-test", action="store_true",
                   help="also report the best test accuracy over epochs (selected on the TEST set; papers' protocol, "
                        "for parity only)")
    p.add_argument("--retries", type=int, default=1, help="retries of a failed cell before it is reported (default 1)")
    p.add_argument("--runner", choices=["subprocess", "inprocess"], default="subprocess",
                   help="subprocess (default): each cell in its own process, a crash cannot stop the sweep; "
                        "inprocess: no start-up cost, no isolation")
    p.add_argument("--jobs", type=int, default=1,
                   help="cells trained at once, each in its own process (default 1); on a CPU use one per core "
                        "with --threads 1")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state; train nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite the tables and plot from finished cells; train nothing")
    add_json_arg(p, "the output paths and the results rows (with --dry-run: the cells and their state)")
    add_progress_arg(p)
    g = p.add_argument_group("shared budget (override the base config for every cell)")
    add_data_args(g)
    g.add_argument("--image-size", type=int)
    g.add_argument("--val-fraction", type=float)
    g.add_argument("--cache", metavar="DIR")
    g.add_argument("--model")
    g.add_argument("--pretrained", metavar="PATH", help="backbone weights: a file, torchvision:WEIGHTS or timm[:TAG]")
    add_offline_arg(g)
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--device")
    g.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    g.add_argument("--threads", type=int)
    g.add_argument("--set", action="append", metavar="KEY=VALUE", help="any base config key, e.g. train.eval_batch_size=512")
    p.set_defaults(run=run)


def spec_from_args(args: argparse.Namespace) -> Any:
    """The sweep described by --config plus the flags."""
    from dnfer.bench.spec import (
        SweepSpec,
        check_unique,
        load_sweep,
        parse_noise_setting,
        parse_seeds,
        split_list,
    )
    from dnfer.commands.train import _scalar

    if args.config:
        spec = load_sweep(args.config)
    else:
        spec = SweepSpec(methods=["dnfer_plus", "dnfer", "ce"], noise=[parse_noise_setting("none"), parse_noise_setting("symmetric:0.3")],
                         seeds=[1])
    if args.methods:
        spec.methods = split_list(args.methods)
    if args.noise:
        spec.noise = [parse_noise_setting(n, where="--noise") for n in split_list(args.noise)]
    if args.seeds:
        spec.seeds = parse_seeds(args.seeds, where="--seeds")
    for attr, key in BASE_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None:
            spec.base.override(key, value, source=f"--{attr.replace('_', '-')}")
    if args.data_option:
        spec.base.data.options.update(key_values(args.data_option, "--data-option"))
    for key, value in key_values(args.set, "--set").items():
        spec.base.override(key, _scalar(value), source=f"--set {key}")
    check_unique(spec)
    return spec


def run(args: argparse.Namespace) -> int:
    from dnfer.bench.runner import run_sweep
    from dnfer.bench.spec import build_cells

    check_positive("--jobs", args.jobs)
    check_positive("--retries", args.retries, 0)
    apply_offline_arg(args)
    spec = spec_from_args(args)
    out = Path(args.out) if args.out else Path("bench_runs") / (Path(args.config).stem if args.config else "sweep")
    check_output_dir(out, option="--out", inputs=[args.config] if args.config else [])
    if args.dry_run:
        cells = build_cells(spec, out)
        states = {c.key: ("finished" if (c.run_dir / "summary.json").is_file()
                          else "resumable" if (c.run_dir / "last.pt").is_file() else "to run") for c in cells}
        if args.json:
            print_json({"out": str(out), "cells": [{"cell": k, "state": v} for k, v in states.items()]})
            return 0
        for key, state in states.items():
            print(f"{key}: {state}")
        print(f"{len(cells)} cells in {out}")
        return 0
    rows, outcomes = run_sweep(spec, out, runner=args.runner, retries=args.retries, best_on_test=args.best_on_test,
                               report_only=args.report_only, jobs=args.jobs, say=human(args),
                               progress=progress_enabled(args))
    failed = [r for r in rows if r["status"] == "failed"]
    degenerate = [r for r in rows if r["status"] == "ok" and r.get("degenerate")]
    if args.json:
        print_json({"results_csv": out / "results.csv", "results_md": out / "results.md",
                    "plot": out / "accuracy_vs_noise.png", "cells": len(rows), "failed": len(failed),
                    "degenerate": len(degenerate), "rows": rows})
        return 1 if failed else 0
    print_results(rows)
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'accuracy_vs_noise.png'}")
    if degenerate:
        print(f"{len(degenerate)} of {len(rows)} cells are degenerate (marked in results.md): "
              + "; ".join(f"{r['method']}/{r['noise']}/seed{r['seed']}: {r['degenerate']}" for r in degenerate))
    if failed:
        print(f"{len(failed)} of {len(rows)} cells failed: "
              + ", ".join(f"{r['method']}/{r['noise']}/seed{r['seed']}" for r in failed))
        return 1
    return 0


def print_results(rows: list[dict]) -> None:
    """The sweep's methods side by side per noise setting (mean ± std over seeds)."""
    from rich.console import Console
    from rich.table import Table

    from dnfer.bench.report import SUMMARY_COLUMNS, summary_rows

    table = Table(title="dnfer bench: model chosen on the noisy validation split (mean ± std over seeds)")
    for heading in ("noise", "method"):
        table.add_column(heading, no_wrap=True)
    for _, heading, _, _ in SUMMARY_COLUMNS:
        table.add_column(heading, justify="right")
    for row in summary_rows(rows):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: rich would assume 80 columns and truncate
        console = Console(width=160)
    console.print(table)
