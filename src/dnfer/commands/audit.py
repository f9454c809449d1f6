"""``dnfer audit``: rank training samples by how likely their given label is wrong."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dnfer.commands._common import (
    add_data_args,
    add_json_arg,
    add_overwrite_arg,
    add_progress_arg,
    add_trust_arg,
    check_positive,
    human,
    key_values,
    note_deprecated,
    print_json,
    progress_enabled,
    run_dir_inputs,
)
from dnfer.errors import ConfigError
from dnfer.io_safety import check_output

if TYPE_CHECKING:
    from dnfer.analysis.audit import AuditResult


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit", help="find probably-mislabelled training samples (label_issues.csv)",
        description="Ranks training samples by a label-issue score: by default 1 - the posterior of the given label "
                    "under the (DNFER-trained) model on the un-augmented image; --score combined/history add the "
                    "run's per-sample selection history. "
                    "Writes label_issues.csv (most suspicious first); prints AUROC and precision@k when the "
                    "true labels are known (synthetic noise).")
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                   help="run directory written by `dnfer train` (uses its selection history); or give --checkpoint")
    p.add_argument("--run", dest="run_flag", metavar="DIR", help="deprecated spelling of RUN_DIR")
    p.add_argument("--checkpoint", metavar="FILE", help="checkpoint to audit with (posterior only), instead of RUN_DIR")
    add_data_args(p, default_help="the checkpoint's training data, with its noise")
    p.add_argument("--which", choices=["last", "best"], default="last", help="checkpoint of the run to use (default last)")
    p.add_argument("--score", choices=["combined", "posterior", "history"], default="posterior",
                   help="ranking score: posterior (default; 1 - p(given label)), history (1 - selection rate), "
                        "combined (their mean); the measured comparison is in docs/audit.md")
    p.add_argument("--flag-threshold", type=float, default=0.5,
                   help="flag samples with score >= this whose suggested label differs (default 0.5)")
    p.add_argument("--out", metavar="FILE", help="CSV path (default RUN/label_issues.csv, or ./label_issues.csv)")
    p.add_argument("--export-pred-probs", metavar="FILE.npz",
                   help="also write pred_probs (N,K) and labels (N,) for cleanlab.filter.find_label_issues")
    p.add_argument("--top", type=int, default=10, help="print this many top suspects (default 10)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    add_overwrite_arg(p)
    add_trust_arg(p, "the checkpoint (--checkpoint, or the run's)")
    add_json_arg(p, "the summary (counts, quality against the truth, top suspects, output paths)")
    add_progress_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dnfer.analysis.audit import audit_checkpoint, audit_run, summary_lines

    if not 0.0 <= args.flag_threshold <= 1.0:
        raise ConfigError(f"--flag-threshold {args.flag_threshold}: expected a value in [0, 1]")
    check_positive("--batch-size", args.batch_size)
    check_positive("--top", args.top, 0)
    if args.run_flag is not None:
        if args.run_dir is not None:
            raise ConfigError("give the run folder once: RUN_DIR, or the deprecated --run DIR, not both")
        note_deprecated("audit", "--run DIR", "`dnfer audit RUN_DIR`")
        args.run_dir = args.run_flag
    if (args.run_dir is None) == (args.checkpoint is None):
        raise ConfigError("audit needs a run folder (RUN_DIR) or --checkpoint FILE, not both"
                          if args.run_dir is not None else "audit needs a run folder (RUN_DIR) or --checkpoint FILE")
    if args.run_dir:
        run_dir = Path(args.run_dir)
        if run_dir.is_file():
            raise ConfigError(f"RUN_DIR {args.run_dir!r} is a file; expected a run folder (use --checkpoint for a .pt file)")
        if not run_dir.is_dir():
            raise ConfigError(f"RUN_DIR {args.run_dir!r} does not exist")
        inputs = run_dir_inputs(run_dir)
        default_out = run_dir / "label_issues.csv"
    else:
        ckpt = Path(args.checkpoint)
        if ckpt.is_dir():
            raise ConfigError(f"--checkpoint {args.checkpoint!r} is a folder; expected a checkpoint file "
                              "(give a run folder as RUN_DIR)")
        inputs = [ckpt]
        default_out = Path("label_issues.csv")
    out_path = check_output(args.out or default_out, option="--out", inputs=inputs, overwrite=args.overwrite,
                            ours=args.out is None)
    probs_path = None
    if args.export_pred_probs:
        probs_path = check_output(args.export_pred_probs, option="--export-pred-probs", inputs=[*inputs, out_path],
                                  overwrite=args.overwrite)
        if probs_path.resolve() == out_path.resolve():
            raise ConfigError("--export-pred-probs and --out name the same file; choose two paths")
    say = human(args)
    if args.run_dir:
        if args.data or args.data_option:
            raise ConfigError("--data/--data-option go with --checkpoint; RUN_DIR rebuilds the run's own data")
        result = audit_run(args.run_dir, which=args.which, kind=args.score, device=args.device,
                           batch_size=args.batch_size, flag_threshold=args.flag_threshold,
                           trust_checkpoint=args.trust_checkpoint, log=say, progress=progress_enabled(args))
    else:
        if args.score != "posterior":
            raise ConfigError(f"--score {args.score} needs RUN_DIR (a checkpoint alone has no selection history)")
        result = audit_checkpoint(args.checkpoint, data=args.data,
                                  data_options=key_values(args.data_option, "--data-option"), device=args.device,
                                  batch_size=args.batch_size, flag_threshold=args.flag_threshold,
                                  trust_checkpoint=args.trust_checkpoint, log=say,
                                  progress=progress_enabled(args))
    out = result.write_csv(out_path)
    probs_written = result.export_pred_probs(probs_path) if probs_path is not None else None
    if args.json:
        print_json(summary_json(result, top=args.top, out=out, pred_probs=probs_written))
        return 0
    for line in summary_lines(result, top=args.top):
        print(line)
    print(f"wrote {out}")
    if probs_written is not None:
        print(f"wrote {probs_written} (pred_probs, labels for cleanlab)")
    return 0


def summary_json(result: AuditResult, *, top: int, out: Path, pred_probs: Path | None) -> dict[str, Any]:
    """The ``--json`` object: what :func:`~dnfer.analysis.audit.summary_lines` prints, as data."""
    sugg = result.suggested
    return {
        "out": str(out), "pred_probs": None if pred_probs is None else str(pred_probs), "source": result.source,
        "score": result.score_kind, "n": len(result.given), "flagged": int(result.flagged.sum()),
        "flag_threshold": result.flag_threshold, "quality": result.quality(),
        "top": [{"name": result.names[i], "given": result.class_names[result.given[i]],
                 "suggested": result.class_names[sugg[i]], "score": float(result.score[i])}
                for i in result.order()[:top]],
    }
