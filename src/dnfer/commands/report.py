"""``dnfer report``: one self-contained HTML report of a training run."""

from __future__ import annotations

import argparse

from dnfer.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="write a self-contained HTML report of a run (curves, thresholds, audit thumbnails)",
        description="Renders RUN_DIR/report.html: training curves, per-class threshold traces, selection "
                    "precision/recall, confusion matrix and the top suspected mislabelled training images. "
                    "Plots and thumbnails are inline; opening the file makes no network request.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by `dnfer train`")
    p.add_argument("--out", metavar="FILE", help="HTML path (default RUN_DIR/report.html)")
    p.add_argument("--top", type=int, default=48, help="thumbnails of the most suspect images (default 48)")
    p.add_argument("--which", choices=["last", "best"], default="last", help="checkpoint for the audit (default last)")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dnfer.analysis.report import render_report

    if args.top < 0:
        raise ConfigError(f"--top {args.top}: expected 0 or more")
    path = render_report(args.run_dir, out=args.out, top=args.top, which=args.which, device=args.device)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0
