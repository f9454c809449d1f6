"""``dnfer eval``: a checkpoint's accuracy on a dataset's test split, and the class matching it
shares with ``dnfer audit``."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dnfer.data.base import FERDataset
from dnfer.engine.batches import predict_probs
from dnfer.engine.checkpoint import load_checkpoint, load_model
from dnfer.engine.device import resolve_device
from dnfer.engine.metrics import accuracy, confusion_matrix, per_class_accuracy
from dnfer.errors import DataError, DnferError


def match_classes(ds: FERDataset, class_names: list[str], data: str | None) -> FERDataset:
    """``ds`` with its classes selected/merged/reordered to the checkpoint's ``class_names``.

    Raises:
        DataError: ``ds``'s classes cannot cover the checkpoint's.
    """
    if ds.class_names == class_names:
        return ds
    from dnfer.data.classes import select_classes
    from dnfer.data.records import remap_classes

    try:
        classes, mapping = select_classes(class_names, ds.class_names)
    except DnferError as e:
        raise DataError(f"--data {data}: its classes {ds.class_names} do not cover the checkpoint's {class_names} ({e})") from None
    return remap_classes(ds, classes, mapping)


def evaluate_checkpoint(path: str | Path, *, data: str | None = None, data_options: dict[str, str] | None = None,
                        device: str = "auto", batch_size: int = 256, log: Callable[[str], None] = print,
                        trust_checkpoint: bool = False) -> dict[str, Any]:
    """Test accuracy, per-class accuracy and confusion of a checkpoint on a dataset's test split.

    Args:
        data: dataset spec (default: the checkpoint's training data); its classes are matched
            to the checkpoint's by name.
        trust_checkpoint: allow a file that needs arbitrary unpickling (unsafe).
    """
    from dnfer.data.pipeline import load_source
    from dnfer.data.spec import parse_data_spec
    ckpt = load_checkpoint(path, trust=trust_checkpoint)
    cfg = ckpt.cfg()
    if data:
        cfg.data.spec = data
        cfg.data.options = dict(data_options or {})
    dev = resolve_device(device)
    spec = parse_data_spec(cfg.data.spec, cfg.data.options)
    ds = match_classes(load_source(cfg.data, spec, ckpt.image_size, seed=cfg.train.seed), ckpt.class_names, data)
    model = load_model(ckpt, dev)
    pre = ckpt.preprocessing
    probs = predict_probs(model, ds.test.images, batch_size=batch_size, device=dev, mean=pre.mean, std=pre.std,
                          precision=ckpt.inference_precision(dev))
    pred = probs.argmax(1)
    cm = confusion_matrix(ds.test.labels, pred, ckpt.num_classes)
    return {"checkpoint": str(path), "dataset": str(spec), "n_test": len(pred),
            "test_acc": accuracy(ds.test.labels, pred), "class_names": ckpt.class_names,
            "per_class_acc": [None if math.isnan(a) else float(a) for a in per_class_accuracy(cm)],
            "confusion": cm.tolist()}
