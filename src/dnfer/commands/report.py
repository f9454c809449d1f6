"""``dnfer report``: one self-contained HTML report of a training run."""

from __future__ import annotations

import argparse
from pathlib import Path

from dnfer.commands._common import (
    add_json_arg,
    add_overwrite_arg,
    add_progress_arg,
    human,
    print_json,
    progress_enabled,
    run_dir_inputs,
)
from dnfer.errors import ConfigError
from dnfer.io_safety import check_output


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
    add_overwrite_arg(p)
    add_json_arg(p, "the report's path and size")
    add_progress_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dnfer.analysis.report import render_report

    if args.top < 0:
        raise ConfigError(f"--top {args.top}: expected 0 or more")
    run_dir = Path(args.run_dir)
    if run_dir.is_file():
        raise ConfigError(f"RUN_DIR {args.run_dir!r} is a file; expected the run folder written by `dnfer train`")
    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR {args.run_dir!r} does not exist")
    out = check_output(args.out or run_dir / "report.html", option="--out", inputs=run_dir_inputs(run_dir),
                       overwrite=args.overwrite, ours=args.out is None)
    path = render_report(args.run_dir, out=out, top=args.top, which=args.which, device=args.device, log=human(args),
                         progress=progress_enabled(args))
    size = path.stat().st_size
    if args.json:
        print_json({"path": str(path), "bytes": size})
    else:
        print(f"wrote {path} ({size / 1024:.0f} KiB)")
    return 0
