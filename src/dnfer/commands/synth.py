"""``dnfer synth``: write the synthetic FER dataset to disk (RAF-DB or ImageFolder layout)."""

from __future__ import annotations

import argparse
import json

import cv2

from dnfer.commands._common import add_json_arg, check_positive, check_seed_arg, print_json
from dnfer.data.classes import BASIC7, CANONICAL_CLASSES
from dnfer.data.synthetic import (
    DEFAULTS,
    GENERATOR_VERSION,
    contact_sheet,
    generate,
    write_folder,
    write_rafdb,
)
from dnfer.errors import ConfigError
from dnfer.io_safety import check_output_dir, write_text_atomic


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth", help="write the built-in synthetic expression dataset as files (RAF-DB or ImageFolder layout)",
        description="Generates the synthetic faces that '--data synthetic' uses and writes them in the RAF-DB "
                    "layout (EmoLabel/list_patition_label.txt + Image/aligned/*_aligned.jpg, labels 1-based in "
                    "RAF order) or as an ImageFolder (DIR/train/<class>/, DIR/test/<class>/), so other tools and "
                    "dnfer's own rafdb/folder loaders can read them. Deterministic in --seed.")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created; an earlier `dnfer synth` output there is overwritten, a folder "
                        "holding other files needs --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty folder that is not a synth output")
    p.add_argument("--layout", choices=("rafdb", "folder"), default="rafdb", help="file layout (default rafdb)")
    p.add_argument("--n", type=int, default=2000, metavar="N",
                   help="TOTAL number of images over train+test (default 2000); --test-fraction of them go to test")
    p.add_argument("--test-fraction", type=float, default=0.2, metavar="F",
                   help="share of the images in the test split (default 0.2, like RAF-DB)")
    p.add_argument("--image-size", type=int, default=64, metavar="PX",
                   help="side of the square images (default 64; RAF-DB's aligned faces are 100)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0); same seed = same images")
    p.add_argument("--balanced", action="store_true", help="equal class frequencies (default: RAF-DB's)")
    p.add_argument("--contempt", action="store_true", help="add contempt as an 8th class")
    p.add_argument("--nuisance", type=float, default=DEFAULTS["nuisance"], metavar="X",
                   help=f"scale of pose/lighting/occlusion/blur/noise/JPEG variation, 0..2 (default {DEFAULTS['nuisance']})")
    p.add_argument("--min-intensity", type=float, default=DEFAULTS["min_intensity"], metavar="S",
                   help=f"weakest expression intensity, 0..1 (default {DEFAULTS['min_intensity']})")
    p.add_argument("--format", choices=("jpg", "png"), default=None,
                   help="image format for --layout folder (default png); the RAF-DB layout is always jpg")
    p.add_argument("--workers", type=int, default=1, help="generation processes (does not change the data)")
    p.add_argument("--preview", action="store_true",
                   help="also write DIR/preview.png, a contact sheet (rows = classes, columns = identities, "
                        "intensity rising to the right)")
    add_json_arg(p, "what was written (folder, counts, the synth_meta.json content)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.n < 2:
        raise ConfigError(f"--n {args.n}: need at least 2 images (one train, one test)")
    if not 0.0 < args.test_fraction < 1.0:
        raise ConfigError(f"--test-fraction {args.test_fraction}: must be between 0 and 1 (exclusive)")
    if not 8 <= args.image_size <= 1024:
        raise ConfigError(f"--image-size {args.image_size}: must be between 8 and 1024")
    if not 0.0 <= args.nuisance <= 2.0:
        raise ConfigError(f"--nuisance {args.nuisance}: must be between 0 and 2")
    if not 0.0 <= args.min_intensity <= 1.0:
        raise ConfigError(f"--min-intensity {args.min_intensity}: must be between 0 and 1")
    if args.layout == "rafdb" and args.format == "png":
        raise ConfigError("--format png: the RAF-DB layout stores *_aligned.jpg files; use --layout folder for png")
    check_seed_arg("--seed", args.seed)
    check_positive("--workers", args.workers)
    out = check_output_dir(args.out, option="--out")
    if out.is_dir() and any(out.iterdir()) and not (out / "synth_meta.json").is_file() and not args.overwrite:
        raise ConfigError(f"--out {args.out!r} holds files that `dnfer synth` did not write; choose an empty or new "
                          "folder, or pass --overwrite")
    class_names = list(CANONICAL_CLASSES if args.contempt else BASIC7)
    n_test = max(1, int(round(args.n * args.test_fraction)))
    n_train = max(1, args.n - n_test)
    gen = dict(image_size=args.image_size, class_names=class_names, balanced=args.balanced,
               nuisance=args.nuisance, min_intensity=args.min_intensity, workers=args.workers)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels, _ = generate(n, seed=args.seed, split=split, **gen)  # type: ignore[arg-type]
        splits[split] = (images, labels)
    if args.layout == "rafdb":
        write_rafdb(out, splits, class_names=class_names)
    else:
        write_folder(out, splits, class_names=class_names, ext=args.format or "png")
    meta = {
        "generator": "dnfer.data.synthetic", "generator_version": GENERATOR_VERSION, "seed": args.seed,
        "layout": args.layout, "n_train": n_train, "n_test": n_test, "image_size": args.image_size,
        "class_names": class_names, "balanced": args.balanced, "nuisance": args.nuisance,
        "min_intensity": args.min_intensity,
    }
    write_text_atomic(out / "synth_meta.json", json.dumps(meta, indent=2) + "\n")
    msg = f"wrote {n_train} train + {n_test} test images ({args.image_size} px, {args.layout} layout) to {out}"
    preview = None
    if args.preview:
        sheet = contact_sheet(seed=args.seed, class_names=class_names, nuisance=args.nuisance)
        preview = out / "preview.png"
        cv2.imwrite(str(preview), sheet[:, :, ::-1])
        msg += f"; contact sheet {preview}"
    if args.json:
        print_json({"out": str(out), "preview": None if preview is None else str(preview), **meta})
    else:
        print(msg)
    return 0
