"""``dnfer export``: write a checkpoint as ONNX or TorchScript with its preprocessing embedded."""

from __future__ import annotations

import argparse
from pathlib import Path

from dnfer.commands._common import (
    add_json_arg,
    add_overwrite_arg,
    add_progress_arg,
    add_trust_arg,
    print_json,
    progress_enabled,
)
from dnfer.errors import ConfigError
from dnfer.io_safety import check_output

#: Exported logits must match the eager model this closely (float32 on CPU); larger is a bug.
PARITY_TOLERANCE = 1e-4


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint to ONNX or TorchScript (for `dnfer predict --onnx` and deployment)",
        description="Export a trained checkpoint. The file takes normalised float32 (B,3,S,S) with a dynamic "
                    "batch axis and returns logits; class names, input size, mean/std and colour order are embedded.",
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="dnfer training checkpoint (.pt)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p.add_argument("--out", metavar="FILE", help="output file (default: next to the checkpoint, .onnx / .torchscript.pt)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17, default 17)")
    add_json_arg(p, "the result (path, format, parity, embedded metadata)")
    add_overwrite_arg(p)
    add_trust_arg(p)
    add_progress_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dnfer.inference.export import SUFFIX, export_checkpoint

    ckpt = Path(args.checkpoint)
    if ckpt.is_dir():
        raise ConfigError(f"--checkpoint {str(ckpt)!r} is a folder; expected a checkpoint file (e.g. RUN/last.pt)")
    out = Path(args.out) if args.out else ckpt.with_name(ckpt.name.removesuffix(ckpt.suffix) + SUFFIX.get(args.format, ""))
    check_output(out, option="--out", inputs=[ckpt], overwrite=args.overwrite, ours=args.out is None)
    res = export_checkpoint(args.checkpoint, args.format, out, opset=args.opset,
                            trust_checkpoint=args.trust_checkpoint, progress=progress_enabled(args))
    if res.max_abs_diff > PARITY_TOLERANCE:
        raise ConfigError(
            f"exported {res.path} differs from the checkpoint's model by {res.max_abs_diff:.3g} (> {PARITY_TOLERANCE}); "
            "this model does not export faithfully to this format"
        )
    if args.json:
        print_json({"path": str(res.path), "format": res.format, "max_abs_diff": res.max_abs_diff,
                    **res.info.metadata()})
    else:
        s = res.info.image_size
        print(f"wrote {res.path} ({res.format}; input float32 (B,3,{s},{s}), {len(res.info.class_names)} classes; "
              f"max |logit difference| vs checkpoint {res.max_abs_diff:.2e})")
    return 0
