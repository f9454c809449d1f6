"""``dnfer noise``: write a noisy copy of a label file (RAF-DB ``name label`` format)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

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
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
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
        if not path.is_file():
            raise ConfigError(f"--transition {str(path)!r} does not exist")
        matrix = np.load(path) if path.suffix == ".npy" else np.loadtxt(path)
        k = len(class_names)
        if matrix.shape != (k, k):
            raise ConfigError(f"--transition {path}: expected a {k}x{k} matrix, got {matrix.shape}")
        result = transition_noise(labels, matrix=matrix, seed=args.seed)
        desc = f"transition matrix {path}"
    else:
        spec = parse_noise_spec(args.noise)
        result = apply_noise(labels, spec, class_names=class_names, seed=args.seed)
        desc = str(spec)
    write_label_file(args.out, names, result.noisy_labels, class_names=class_names, file_classes=file_classes)
    if args.mask_out:
        Path(args.mask_out).write_text("".join(f"{n}\n" for n, m in zip(names, result.is_noisy, strict=True) if m))
    print(f"{desc}, seed {args.seed}: {int(result.is_noisy.sum())} of {len(names)} labels flipped "
          f"(realised rate {result.realised_rate:.2%}) -> {args.out}")
    return 0
