"""From a config's ``data`` section to the splits the trainer uses.

Order matters and is the honest one: load (or open the prepared cache) -> select/merge classes
-> apply label noise to the training split (injected or from a community noise file) -> carve the
validation split out of the *noisy* training split. The test split always keeps clean labels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dnfer.data.base import FERDataset, carve_validation, class_counts
from dnfer.data.classes import is_expression_list, parse_class_selection
from dnfer.data.noise import (
    apply_noise,
    load_transition_matrix,
    parse_noise_spec,
    read_label_file,
    transition_noise,
)
from dnfer.data.spec import DataSpec, load_data_spec, parse_data_spec
from dnfer.errors import DataError

if TYPE_CHECKING:
    from dnfer.config import DataConfig

#: Default training side length when the config leaves it None.
DEFAULT_IMAGE_SIZE = {"synthetic": 64}
FALLBACK_IMAGE_SIZE = 224


def resolve_image_size(data: DataConfig) -> int:
    """``data.image_size``, or the dataset's default side length when it is None."""
    if data.image_size is not None:
        return data.image_size
    name = data.spec.split(":", 1)[0].strip().lower()
    return DEFAULT_IMAGE_SIZE.get(name, FALLBACK_IMAGE_SIZE)


def load_source(data: DataConfig, spec: DataSpec, image_size: int, *, seed: int) -> FERDataset:
    """Load the dataset, through the prepared cache when ``data.cache`` is set.

    ``seed`` drives what the adapter draws (synthetic images, a carved test split).
    """
    if data.cache:
        from dnfer.data.cache import load_or_build_cache

        return load_or_build_cache(spec, image_size=image_size, cache_dir=Path(data.cache),
                                   seed=seed, skip_bad=data.skip_bad)
    return load_data_spec(spec, image_size=image_size, seed=seed, skip_bad=data.skip_bad)


def apply_noise_file(
    ds: FERDataset, path: str | Path, source_classes: list[str] | None = None
) -> tuple[np.ndarray, float]:
    """Labels of ``ds.train`` replaced by a ``name label`` file; returns (labels, realised rate).

    Labels are 1-based: in RAF order for expression classes, else indices into the dataset's own
    class list ``source_classes`` (before ``--classes``; default ``ds.class_names``), as in
    RAF-DB compound's list files. Every training sample must appear in the file (a missing one
    would silently stay clean) and every name in the file must be a training sample.
    """
    source = list(ds.class_names if source_classes is None else source_classes)
    if is_expression_list(source):
        table = read_label_file(path)
    else:
        table = read_label_file(path, num_file_classes=len(source), file_classes=source)
    names = ds.train.names
    index = {n: i for i, n in enumerate(names)}
    unknown = [n for n in table if n not in index]
    if unknown:
        raise DataError(f"noise file {path}: {len(unknown)} names are not in the training split, e.g. {unknown[:3]}")
    missing = [n for n in names if n not in table]
    if missing:
        raise DataError(f"noise file {path}: {len(missing)} training samples have no line, e.g. {missing[:3]}")
    class_index = {c: i for i, c in enumerate(ds.class_names)}
    bad = sorted({c for c in table.values() if c not in class_index})
    if bad:
        raise DataError(f"noise file {path}: labels name classes not trained on: {bad}; classes: {ds.class_names}")
    noisy = np.array([class_index[table[n]] for n in names], dtype=np.int64)
    return noisy, float((noisy != ds.train.labels).mean())


def prepare_data(data: DataConfig, *, seed: int, log: Callable[[str], None] = print) -> FERDataset:
    """Load, select classes, add label noise and carve validation, as described above.

    ``seed`` (the run's ``train.seed``) drives loading, the validation carve and, unless
    ``data.noise_seed`` is set, the noise draw.

    ``meta`` gains ``noise`` (spec or file), ``noise_realised_rate``, ``class_counts`` and
    ``image_size``; ``train.true_labels`` holds the clean labels whenever they are known.
    """
    image_size = resolve_image_size(data)
    spec = parse_data_spec(data.spec, data.options)
    ds = load_source(data, spec, image_size, seed=seed)
    source_classes = list(ds.class_names)
    if data.classes:
        from dnfer.data.records import remap_classes

        classes, mapping = parse_class_selection(data.classes, ds.class_names)
        ds = remap_classes(ds, classes, mapping)
    if len(ds.train) == 0 or len(ds.test) == 0:
        raise DataError(f"dataset {spec}: empty split (train {len(ds.train)}, test {len(ds.test)})")
    clean = ds.train.labels.copy()
    noise_seed = seed if data.noise_seed is None else data.noise_seed
    if data.noise_file:
        noisy, rate = apply_noise_file(ds, data.noise_file, source_classes)
        ds.meta["noise"] = f"file:{data.noise_file}"
    elif data.noise_matrix:
        matrix = load_transition_matrix(data.noise_matrix, ds.class_names)
        result = transition_noise(clean, matrix=matrix, seed=noise_seed)
        noisy, rate = result.noisy_labels, result.realised_rate
        ds.meta["noise"] = f"matrix:{data.noise_matrix}"
    else:
        result = apply_noise(clean, parse_noise_spec(data.noise), class_names=ds.class_names, seed=noise_seed)
        noisy, rate = result.noisy_labels, result.realised_rate
        ds.meta["noise"] = str(parse_noise_spec(data.noise))
    # The dataset's own labels are the truth we compare selections against (for real datasets
    # that truth is itself noisy; the summary says "against the given clean labels").
    ds.train = ds.train.with_labels(noisy, true_labels=clean)
    ds.meta["noise_realised_rate"] = rate
    if ds.val is None and data.val_fraction > 0:
        ds.train, ds.val = carve_validation(ds.train, data.val_fraction, seed=seed)
    ds.meta["image_size"] = image_size
    ds.meta["class_counts"] = {
        name: class_counts(split.labels, ds.num_classes).tolist() for name, split in ds.splits().items()
    }
    log(
        f"data: {spec} | classes {ds.class_names} | train {len(ds.train)}"
        f" val {len(ds.val) if ds.val is not None else 0} test {len(ds.test)} | {image_size}px"
        f" | noise {ds.meta['noise']} (realised {rate:.2%})"
    )
    return ds
