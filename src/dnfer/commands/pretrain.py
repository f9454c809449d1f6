"""``dnfer pretrain``: pretrain a backbone (identity classification or VICReg) for ``--pretrained``."""

from __future__ import annotations

import argparse
import os

from dnfer.commands._common import add_json_arg, human, key_values, print_json
from dnfer.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pretrain", help="pretrain a backbone (face identities or self-supervised) for `train --pretrained`",
        description="Pretrain any registered backbone and write OUT/backbone.safetensors, which "
                    "`dnfer train --pretrained OUT/backbone.safetensors --model MODEL` loads. --objective identity: "
                    "identity classification (the MS-Celeb-1M analogue) on the synthetic identity mode "
                    "(--data synthetic) or on folder:PATH with one folder per identity; --objective ssl: VICReg "
                    "self-supervision on the training images of any --data spec, labels ignored. A linear probe "
                    "on --probe-data reports how well frozen features separate expressions. docs/pretrain.md.")
    p.add_argument("--objective", required=True, choices=("identity", "ssl"))
    p.add_argument("--data", default="synthetic", metavar="SPEC",
                   help="identity: synthetic or folder:PATH (PATH/<identity>/<image>); ssl: any dataset spec "
                        "(default synthetic)")
    p.add_argument("--data-option", action="append", metavar="K=V",
                   help="dataset option (repeatable; synthetic: nuisance, min_intensity, ...)")
    p.add_argument("--model", default="resnet10_slim", help="backbone (default resnet10_slim; see `dnfer train --list`)")
    p.add_argument("--epochs", type=int, help="default: identity 15, ssl 10")
    p.add_argument("--image-size", type=int, help="side length in px (default 64 synthetic, 224 others); "
                                                  "fine-tune at the same size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (default 1e-3; cosine decay)")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-epochs", type=int, default=1, help="linear learning-rate warm-up (default 1)")
    p.add_argument("--identities", type=int, default=500, help="synthetic identity mode: people (default 500)")
    p.add_argument("--images-per-identity", type=int, default=20,
                   help="synthetic identity mode: images per person (default 20)")
    p.add_argument("--margin", type=float, default=0.0,
                   help="identity: 0 = softmax cross-entropy (default); > 0 = CosFace margin (e.g. 0.35)")
    p.add_argument("--scale", type=float, default=30.0, help="identity, CosFace: logit scale (default 30)")
    p.add_argument("--expander-dim", type=int, help="ssl: VICReg expander width (default 4x the feature width)")
    p.add_argument("--probe-data", default="synthetic", metavar="SPEC",
                   help="labelled FER dataset for the final linear probe (default synthetic; 'none' skips it)")
    p.add_argument("--probe-option", action="append", metavar="K=V", help="dataset option of --probe-data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (backbone.safetensors, last.pt, summary.json)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_json_arg(p, "the summary (summary.json's content)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from dnfer.engine.pretrain import PretrainSettings, pretrain

    probe = None if args.probe_data.strip().lower() == "none" else args.probe_data
    if args.probe_option and probe is None:
        raise ConfigError("--probe-option needs --probe-data (it is 'none')")
    settings = PretrainSettings(
        objective=args.objective, data=args.data, data_options=key_values(args.data_option, "--data-option"),
        model=args.model, image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, seed=args.seed, device=args.device,
        precision=args.precision, threads=args.threads, identities=args.identities,
        images_per_identity=args.images_per_identity, margin=args.margin, scale=args.scale,
        expander_dim=args.expander_dim, probe_data=probe,
        probe_options=key_values(args.probe_option, "--probe-option"), progress=not args.no_progress)
    summary = pretrain(settings, args.out, resume=args.resume, log=human(args))
    if int(os.environ.get("RANK", "0")) == 0 and args.json:
        print_json(summary)
    elif int(os.environ.get("RANK", "0")) == 0:
        print(f"pretraining: {summary['images_per_second']:.0f} img/s ({summary['precision']}, {summary['device']})"
              f", {summary['train_seconds']:.1f} s")
    return 0
