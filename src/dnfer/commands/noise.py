"""``dnfer noise``: write a noisy copy of a label file (RAF-DB ``name label`` format)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np

from dnfer.commands._common import add_json_arg, add_overwrite_arg, check_seed_arg, print_json
from dnfer.data.classes import CANONICAL_CLASSES
from dnfer.data.noise import (
    apply_noise,
    parse_noise_spec,
    read_label_file,
    transition_noise,
    write_label_file,
)
from dnfer.data.rafdb import COMPOUND_CLASSES
from dnfer.errors import ConfigError, DataError
from dnfer.io_safety import check_output, not_a_file_text, write_text_atomic


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "noise", help="inject label noise into a RAF-DB-format label file",
        description="Reads 'name label' lines (labels 1-based, RAF order, or RAF-DB compound's 1..11), flips "
                    "labels with a seeded protocol and writes the same format, like EAC's EmoLabel/noiseNN.txt files. By default only train_* "
                    "rows are kept (test labels stay clean).")
    p.add_argument("--labels", required=True, metavar="FILE", help="input list, e.g. EmoLabel/list_patition_label.txt")
    p.add_argument("--out", required=True, metavar="FILE", help="output noisy label file")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--noise", help="symmetric:R, asymmetric:R or pairflip:R")
    g.add_argument("--transition", metavar="FILE", help="KxK transition matrix (.npy or whitespace text), rows = true class")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--classes", default="7", choices=["7", "8", "compound"],
                   help="label space of the file: 7 basic, 8 (+contempt) or RAF-DB's 11 compound classes")
    p.add_argument("--all-rows", action="store_true", help="keep every row (default: only names starting with train)")
    p.add_argument("--mask-out", metavar="FILE", help="also write the names whose label was flipped")
    add_overwrite_arg(p)
    add_json_arg(p, "the statistics (rows, flips, realised rate, output paths)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    check_seed_arg("--seed", args.seed)
    inputs = [args.labels, args.transition]
    out = check_output(args.out, option="--out", inputs=inputs, overwrite=args.overwrite)
    mask_out = None
    if args.mask_out:
        mask_out = check_output(args.mask_out, option="--mask-out", inputs=inputs, overwrite=args.overwrite)
        if mask_out.resolve() == out.resolve():
            raise ConfigError("--mask-out and --out name the same file; choose two paths")
    compound = args.classes == "compound"
    file_classes = COMPOUND_CLASSES if compound else CANONICAL_CLASSES
    table = read_label_file(args.labels, num_file_classes=len(file_classes) if compound else 8, file_classes=file_classes)
    names = [n for n in table if args.all_rows or n.startswith("train")]
    if not names:
        raise DataError(f"{args.labels}: no rows to corrupt (no name starts with 'train'; pass --all-rows)")
    class_names = list(COMPOUND_CLASSES if compound else CANONICAL_CLASSES[: int(args.classes)])
    index = {c: i for i, c in enumerate(class_names)}
    bad = sorted({table[n] for n in names if table[n] not in index})
    if bad:
        raise DataError(f"{args.labels}: labels {bad} are outside the {args.classes}-class space; try --classes 8")
    labels = np.array([index[table[n]] for n in names], dtype=np.int64)
    if args.transition:
        path = Path(args.transition)
        matrix = read_matrix(path)
        k = len(class_names)
        if matrix.shape != (k, k):
            raise ConfigError(f"--transition {path}: expected a {k}x{k} matrix, got {matrix.shape}")
        result = transition_noise(labels, matrix=matrix, seed=args.seed)
        desc = f"transition matrix {path}"
    else:
        spec = parse_noise_spec(args.noise)
        result = apply_noise(labels, spec, class_names=class_names, seed=args.seed)
        desc = str(spec)
    write_label_file(out, names, result.noisy_labels, class_names=class_names, file_classes=file_classes)
    if mask_out is not None:
        write_text_atomic(mask_out, "".join(f"{n}\n" for n, m in zip(names, result.is_noisy, strict=True) if m))
    if args.json:
        print_json({"noise": desc, "seed": args.seed, "rows": len(names), "flipped": int(result.is_noisy.sum()),
                    "realised_rate": float(result.realised_rate), "out": str(out),
                    "mask_out": None if mask_out is None else str(mask_out)})
        return 0
    print(f"{desc}, seed {args.seed}: {int(result.is_noisy.sum())} of {len(names)} labels flipped "
          f"(realised rate {result.realised_rate:.2%}) -> {args.out}")
    return 0


def read_matrix(path: Path) -> np.ndarray:
    """A transition matrix from ``.npy`` or whitespace text; anything else is a ConfigError naming the file."""
    where = f"--transition {str(path)!r}"
    if not path.is_file():
        raise ConfigError(f"{where} {not_a_file_text(path)}")
    try:
        if path.suffix == ".npy":
            matrix = np.load(path, allow_pickle=False)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "input contained no data": reported below as a shape
                matrix = np.loadtxt(path, ndmin=2, encoding="utf-8")
    except (ValueError, OSError, EOFError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} is not a numeric matrix (.npy, or rows of numbers as text): "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not np.issubdtype(matrix.dtype, np.number) or not np.isfinite(matrix).all():
        raise ConfigError(f"{where}: the matrix must hold finite numbers")
    return np.asarray(matrix, dtype=np.float64)
