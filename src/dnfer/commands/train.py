"""``dnfer train``: train a model with a noise-robust method."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml

from dnfer.commands._common import (
    add_data_args,
    add_json_arg,
    add_offline_arg,
    add_trust_arg,
    apply_offline_arg,
    human,
    key_values,
    print_json,
)
from dnfer.config import Config
from dnfer.errors import ConfigError

# flag attribute -> dotted config key
FLAG_KEYS = {
    "data": "data.spec", "noise": "data.noise", "noise_file": "data.noise_file",
    "noise_matrix": "data.noise_matrix", "noise_seed": "data.noise_seed",
    "image_size": "data.image_size", "classes": "data.classes", "cache": "data.cache", "augment": "data.augment",
    "workers": "data.workers", "val_fraction": "data.val_fraction",
    "model": "model.name", "pretrained": "model.pretrained",
    "method": "method.name", "noise_rate": "method.noise_rate",
    "lr": "optim.lr", "head_lr": "optim.head_lr", "optimizer": "optim.name", "grad_clip": "optim.grad_clip",
    "epochs": "train.epochs", "batch_size": "train.batch_size", "seed": "train.seed", "device": "train.device",
    "precision": "train.precision", "nan_policy": "train.nan_policy", "save_every_steps": "train.save_every_steps",
    "threads": "train.threads", "small_map_conv": "train.small_map_conv", "malloc": "train.malloc",
    "out": "out",
}
#: flag attribute -> the method option (``method.params.KEY``) it is a shortcut for
METHOD_OPTION_FLAGS = {"alpha": "alpha", "warmup_epochs": "warmup_epochs", "threshold": "threshold"}
BOOL_FLAGS = {"skip_bad": "data.skip_bad", "allow_partial_pretrained": "model.allow_partial_pretrained",
              "tensorboard": "train.tensorboard", "compile": "train.compile", "sync_bn": "train.sync_bn",
              "keep_checkpoints": "train.keep_checkpoints"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (DNFER by default) on a dataset with noisy labels",
                       description="Train a model. Flags override --config; --set KEY=VALUE reaches any config key.")
    p.add_argument("--config", metavar="FILE", help="YAML config (sections data, model, method, optim, train)")
    add_data_args(p)
    p.add_argument("--method", help="training method (default dnfer_plus, the recommended one; dnfer: the paper's "
                                    "method as published; ce, sce, ...: see `dnfer train --list`)")
    p.add_argument("--noise", help="inject label noise: none, symmetric:R, asymmetric:R, pairflip:R")
    p.add_argument("--noise-file", metavar="FILE", help="community noisy-label file (name label, 1-based RAF order)")
    p.add_argument("--noise-matrix", metavar="FILE",
                   help="KxK transition matrix (.npy or text, rows = true class in the run's class order) to draw "
                        "noisy training labels from; any taxonomy")
    p.add_argument("--noise-seed", type=int, help="seed of the noise draw (default: --seed)")
    p.add_argument("--classes", help="select/merge classes, e.g. surprise,fear,... or neutral=neutral+contempt")
    p.add_argument("--val-fraction", type=float, help="held-out share of the noisy train split for model selection")
    p.add_argument("--cache", metavar="DIR", help="prepared uint8 cache directory (built once, then reused)")
    p.add_argument("--skip-bad", action="store_true", default=None, help="skip undecodable images (listed in the run dir)")
    p.add_argument("--augment", choices=["batched", "workers"], help="augmentation back-end")
    p.add_argument("--workers", type=int, help="DataLoader workers for --augment workers")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--image-size", type=int, help="training side length in px (default: 64 synthetic, 224 others)")
    p.add_argument("--model", help="backbone: resnet18 (default), resnet34, resnet50, tiny_cnn, timm:NAME")
    p.add_argument("--pretrained", metavar="PATH",
                   help="initialise the backbone: a local checkpoint, torchvision:WEIGHTS or timm[:TAG] (named "
                        "weights are downloaded into the torch hub / Hugging Face cache on first use)")
    p.add_argument("--allow-partial-pretrained", action="store_true", default=None)
    p.add_argument("--alpha", type=float,
                   help="method.params.alpha: DNFER's consistency weight (default 0.5); other methods' options: "
                        "--method-param")
    p.add_argument("--warmup-epochs", type=int, help="method.params.warmup_epochs: DNFER warm-up epochs (default 5)")
    p.add_argument("--threshold", help="method.params.threshold: DNFER threshold policy: batch_mean (paper), fixed, "
                                       "label_mean, ema, freematch")
    p.add_argument("--threshold-param", action="append", metavar="K=V",
                   help="method.params.threshold_params: threshold policy option")
    p.add_argument("--method-param", action="append", metavar="K=V", help="method-specific option (method.params.K)")
    p.add_argument("--noise-rate", type=float, help="noise-rate estimate for methods that need it (coteaching)")
    p.add_argument("--optimizer", choices=["adam", "adamw", "sgd"])
    p.add_argument("--lr", type=float, help="backbone learning rate (default 1e-3)")
    p.add_argument("--head-lr", type=float,
                   help="classifier learning rate (default: 10 x --lr with --pretrained, the paper's 1e-2; "
                        "--lr from scratch)")
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm to this value")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--small-map-conv", dest="small_map_conv", choices=["auto", "native"],
                   help="auto (default): in bf16 CPU training, convolutions with output maps <= 7x7 run on a "
                        "mosaic of the batch (faster oneDNN kernels, same results up to rounding); native: "
                        "PyTorch's convolutions throughout")
    p.add_argument("--malloc", choices=["auto", "system"],
                   help="auto (default): keep freed host memory in the process during CPU training (no page "
                        "faults on every step's activations; glibc only); system: the C library's defaults")
    p.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm under DDP")
    p.add_argument("--seed", type=int)
    p.add_argument("--nan-policy", choices=["stop", "skip"])
    p.add_argument("--save-every-steps", type=int, help="also checkpoint every N steps inside an epoch")
    p.add_argument("--tensorboard", action="store_true", default=None)
    p.add_argument("--out", metavar="DIR", help="run directory (default runs/METHOD-NOISE-sSEED)")
    add_offline_arg(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="train into an --out that holds another run or other files (the old run's files are removed)")
    p.add_argument("--keep-checkpoints", action="store_true", default=None,
                   help="keep last.prev.pt (the resume fallback) after the run finishes (train.keep_checkpoints)")
    add_trust_arg(p, "--pretrained and --resume files")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key, e.g. train.eval_batch_size=512")
    p.add_argument("--no-progress", action="store_true", help="plain epoch lines instead of progress bars")
    p.add_argument("--list", action="store_true", help="list methods, models, datasets and threshold policies")
    add_json_arg(p, "the run summary (summary.json's content)")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = Config.from_yaml(args.config) if args.config else Config()
    for attr, key in {**FLAG_KEYS, **BOOL_FLAGS}.items():
        value = getattr(args, attr, None)
        if value is not None:
            cfg.override(key, value, source=f"--{attr.replace('_', '-')}")
    if args.data_option:
        cfg.data.options.update(key_values(args.data_option, "--data-option"))
    for attr, key in METHOD_OPTION_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None:
            _check_method_option(cfg.method.name, key, f"--{attr.replace('_', '-')}")
            cfg.method.params[key] = value
    if args.threshold_param:
        _check_method_option(cfg.method.name, "threshold_params", "--threshold-param")
        options = dict(cfg.method.params.get("threshold_params") or {})
        options.update({k: _scalar(v) for k, v in key_values(args.threshold_param, "--threshold-param").items()})
        cfg.method.params["threshold_params"] = options
    if args.method_param:
        cfg.method.params.update({k: _scalar(v) for k, v in key_values(args.method_param, "--method-param").items()})
    for key, value in key_values(args.set, "--set").items():
        cfg.override(key, _scalar(value), source=f"--set {key}")
    if args.no_progress:
        cfg.train.progress = False
    return cfg


def _check_method_option(method: str, key: str, flag: str) -> None:
    """A shortcut flag for ``method.params.KEY`` is an error for a method without that option."""
    from dnfer.registry import METHODS

    if key in METHODS.get(method).shortcut_options:
        return
    having = [n for n in METHODS.names() if key in METHODS.get(n).shortcut_options]
    raise ConfigError(f"{flag}: method {method!r} has no option {key!r} for this flag; methods with it: "
                      f"{', '.join(having)} (a method's own options: --method-param KEY=VALUE)")


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def list_registered() -> str:
    from dnfer.registry import DATASETS, METHODS, MODELS, THRESHOLDS

    default = Config().method.name
    width = max(map(len, METHODS.names()))
    methods = [f"  {n:<{width}}  {METHODS.get(n).title}{' [default]' if n == default else ''}" for n in METHODS.names()]
    return "\n".join([
        "methods:", *methods,
        f"models:     {', '.join(MODELS.names())} (and timm:NAME)",
        f"datasets:   {', '.join(DATASETS.names())}",
        f"thresholds: {', '.join(THRESHOLDS.names())}",
    ])


def run(args: argparse.Namespace) -> int:
    if args.list:
        if args.json:
            from dnfer.registry import DATASETS, METHODS, MODELS, THRESHOLDS

            print_json({"methods": METHODS.names(), "models": MODELS.names(), "datasets": DATASETS.names(),
                        "thresholds": THRESHOLDS.names()})
        else:
            print(list_registered())
        return 0
    from dnfer.engine.trainer import fit

    apply_offline_arg(args)
    cfg = config_from_args(args)
    if cfg.out is None and args.resume:
        raise ConfigError("--resume needs the run directory: pass --out DIR of the run to continue")
    if args.config and cfg.out and not args.resume and Path(args.config).is_file() \
            and (Path(cfg.out) / "config.yaml").is_file() and os.path.samefile(args.config, Path(cfg.out) / "config.yaml"):
        raise ConfigError(f"--config {args.config!r} is the config.yaml that a run into --out {cfg.out!r} rewrites; "
                          "keep your config outside the run folder, or pass --resume to continue that run")
    summary = fit(cfg, log=human(args), resume=args.resume, overwrite=args.overwrite,
                  trust_checkpoint=args.trust_checkpoint)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one table (rank 0's)
        if args.json:
            print_json(summary)
        else:
            print_summary(summary)
    return 0


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    t = Table(title=f"dnfer run summary ({summary['run_dir']})", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("method", summary["method"] + (f" ({summary['method_title']})" if summary.get("method_title") else "")), ("noise (realised)", f"{summary['noise']} ({pct(summary['noise_realised_rate'])})"),
        ("dataset", str(summary["dataset"])), ("epochs", str(summary["epochs"])),
        ("final test accuracy", pct(summary["final_test_acc"])),
        ("best-val epoch", str(summary["best_val_epoch"])),
        ("test accuracy at best val", pct(summary["best_val_test_acc"])),
        ("selection precision", pct(summary["selection_precision"])),
        ("selection recall", pct(summary["selection_recall"])),
        ("train time", f"{summary['train_seconds']:.1f} s"),
        ("throughput", f"{summary['images_per_second']:.1f} img/s ({summary['precision']}, {summary['device']})"),
    ]
    for r in rows:
        t.add_row(*r)
    Console().print(t)
