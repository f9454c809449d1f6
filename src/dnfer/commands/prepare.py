"""``dnfer prepare``: decode, crop and resize a dataset once into the prepared cache."""

from __future__ import annotations

import argparse
import time

from dnfer.commands._common import (
    add_data_args,
    add_json_arg,
    add_progress_arg,
    check_positive,
    check_seed_arg,
    human,
    key_values,
    print_json,
    progress_enabled,
)
from dnfer.data.cache import build_cache, cache_status, open_cache
from dnfer.data.spec import parse_data_spec
from dnfer.errors import ConfigError
from dnfer.io_safety import check_output_dir, sweep_temporaries


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare", help="decode a dataset once into a memory-mappable cache (for large datasets)",
        description="Decodes every image once (crop, resize to --image-size) into sharded uint8 files with an "
                    "index of names, labels and splits. Train on it with `dnfer train --cache DIR`; RAM use then "
                    "does not grow with the dataset. An up-to-date cache is reused; a stale one is rebuilt.")
    add_data_args(p, default_help="required")
    p.add_argument("--image-size", type=int, required=True, metavar="N", help="side of the stored square images")
    p.add_argument("--out", required=True, metavar="DIR", help="cache folder (created; an old cache is replaced)")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images (listed in the cache) instead of failing")
    p.add_argument("--rebuild", action="store_true", help="rebuild even when the cache is up to date")
    p.add_argument("--workers", type=int, default=None, metavar="N", help="decode processes (default: auto)")
    p.add_argument("--seed", type=int, default=1, help="seed of ratio splits (folder/csv layouts without splits)")
    p.add_argument("--shard-size", type=int, default=4096, metavar="N", help="images per shard file")
    add_json_arg(p, "the cache's description (status, classes, counts, skipped images, size)")
    add_progress_arg(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.data:
        raise ConfigError("prepare needs --data NAME:PATH")
    if args.image_size < 8:
        raise ConfigError(f"--image-size must be >= 8, got {args.image_size}")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    check_positive("--shard-size", args.shard_size)
    check_seed_arg("--seed", args.seed)
    spec = parse_data_spec(args.data, key_values(args.data_option, "--data-option"))
    out = check_output_dir(args.out, option="--out", inputs=[spec.path] if spec.path else [])
    sweep_temporaries(out.parent, out.name)  # half-built caches of killed runs, even when this one is valid
    status = "rebuild requested" if args.rebuild else cache_status(
        spec, image_size=args.image_size, cache_dir=out, seed=args.seed
    )
    t0 = time.perf_counter()
    say = human(args)
    if status == "valid":
        say(f"{out}: up to date for {spec} at {args.image_size}px (use --rebuild to force)")
    else:
        say(f"{out}: building ({status})")
        build_cache(spec, image_size=args.image_size, out=out, seed=args.seed, skip_bad=args.skip_bad,
                    shard_size=args.shard_size, workers=args.workers, log=say, progress=progress_enabled(args))
    ds = open_cache(out)
    counts = ds.meta.get("counts", {})
    size = ds.meta["cache"].get("bytes") or 0
    if args.json:
        print_json({"cache": str(out), "status": "up to date" if status == "valid" else "built",
                    "was": status, "data": str(spec), "image_size": args.image_size,
                    "class_names": list(ds.class_names), "counts": counts,
                    "skipped": ds.meta.get("skipped") or [], "bytes": size,
                    "seconds": round(time.perf_counter() - t0, 3)})
        return 0
    parts = ", ".join(f"{s} {c['total']}" for s, c in counts.items())
    print(f"classes ({ds.num_classes}): {', '.join(ds.class_names)}")
    print(f"images: {parts}; skipped {ds.meta.get('num_skipped', 0)}")
    for b in (ds.meta.get("skipped") or [])[:20]:
        print(f"  skipped {b['file']}: {b['reason']}")
    print(f"{size / 2**20:.1f} MiB in {out}; {time.perf_counter() - t0:.1f} s")
    return 0
