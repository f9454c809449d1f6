"""Image sets for ``dnfer pretrain``: identity-labelled images and unlabelled images.

- :func:`load_identity_set`: ``synthetic`` (the generator's identity mode,
  :func:`dnfer.data.synthetic.generate_identities`) or ``folder:PATH`` with one folder per
  identity, ``PATH/<identity>/<image>`` (the ImageFolder convention: any folder names, sorted;
  class ``k`` is the ``k``-th name in sorted order).
- :func:`load_unlabelled_set`: the training split of any ``--data`` spec, labels dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dnfer.data.base import ImageArray
from dnfer.data.decode import DecodeError, decode_image
from dnfer.data.records import is_image_file
from dnfer.errors import ConfigError, DataError


@dataclass
class ImageSet:
    """Images for pretraining.

    Attributes:
        images: uint8 ``(N, S, S, 3)`` RGB.
        labels: int64 ``(N,)`` identity index (``identity``) or zeros (unlabelled).
        class_names: identity names (``identity``) or empty (unlabelled).
        meta: where the images came from (recorded in the backbone file's metadata).
    """

    images: ImageArray
    labels: np.ndarray
    class_names: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)


#: ``--data-option`` keys the synthetic identity mode reads.
IDENTITY_OPTIONS = ("max_intensity", "min_intensity", "nuisance", "supersample", "traits", "workers")


def _identity_folders(root: Path) -> list[tuple[str, list[Path]]]:
    """``(identity folder name, sorted image files)`` for every sub-folder of ``root`` (sorted)."""
    if not root.is_dir():
        raise DataError(f"--data folder:{root}: not a folder (expected {root}/<identity>/<image>)")
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in d.rglob("*") if f.is_file() and is_image_file(f))
        if not files:
            raise DataError(f"--data folder:{root}: identity folder {d.name!r} holds no images")
        out.append((d.name, files))
    if len(out) < 2:
        raise DataError(f"--data folder:{root}: found {len(out)} identity folder(s); identity pretraining "
                        f"needs at least 2 ({root}/<identity>/<image>)")
    return out


def load_identity_folders(root: Path, *, image_size: int) -> ImageSet:
    """Decode ``root/<identity>/**/<image>`` to uint8 ``(N, S, S, 3)``; an undecodable file is an error."""
    folders = _identity_folders(root)
    n = sum(len(files) for _, files in folders)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    labels = np.empty(n, np.int64)
    row = 0
    for k, (_, files) in enumerate(folders):
        for f in files:
            try:
                images[row] = decode_image(f, size=image_size)
            except DecodeError as e:
                raise DataError(f"--data folder:{root}: {f}: {e.reason}") from None
            labels[row] = k
            row += 1
    return ImageSet(images, labels, [name for name, _ in folders],
                    {"source": f"folder:{root}", "identities": len(folders), "images": n})


def load_identity_set(spec: str, *, image_size: int, seed: int, identities: int, images_per_identity: int,
                      options: dict[str, str] | None = None, workers: int = 1) -> ImageSet:
    """Identity-labelled images for ``--objective identity`` (``synthetic`` or ``folder:PATH``)."""
    from dnfer.data.synthetic import (
        DEFAULTS,
        GENERATOR_VERSION,
        IDENTITY_TRAITS,
        generate_identities,
        parse_options,
    )

    name, sep, path = spec.strip().partition(":")
    name = name.strip().lower()
    if name == "synthetic" and not sep:
        unused = sorted(k for k in (options or {}) if k.strip().lower().replace("-", "_") not in IDENTITY_OPTIONS)
        if unused:
            raise ConfigError(f"--data-option {', '.join(unused)}: not an option of the synthetic identity mode "
                              f"(its size is --identities x --images-per-identity); valid keys: "
                              f"{', '.join(IDENTITY_OPTIONS)}")
        options = {k.strip().lower().replace("-", "_"): v for k, v in (options or {}).items()}
        traits = str(options.pop("traits", "shape")).strip().lower()
        if traits not in IDENTITY_TRAITS:
            raise ConfigError(f"--data-option traits={traits}: valid are {', '.join(IDENTITY_TRAITS)} (what stays "
                              "fixed per person: every trait, or only the face's geometry)")
        opts = parse_options(options)
        gen = {k: opts[k] for k in ("min_intensity", "max_intensity", "nuisance", "supersample")}
        images, ids, _, _ = generate_identities(identities, images_per_identity, seed=seed, image_size=image_size,
                                                traits=traits, workers=max(workers, int(opts["workers"])), **gen)
        meta = {"source": "synthetic-identities", "generator_version": GENERATOR_VERSION, "seed": seed,
                "identities": identities, "images_per_identity": images_per_identity, "traits": traits,
                **{k: v for k, v in gen.items() if v != DEFAULTS[k]}}
        return ImageSet(images, ids, [f"id{k:05d}" for k in range(identities)], meta)
    if name == "folder" and sep and path.strip():
        if options:
            raise ConfigError(f"--data-option {sorted(options)}: identity folders take no options")
        root = Path(path.strip()).expanduser()
        if not root.exists():
            raise DataError(f"--data {spec!r}: path {str(root)!r} does not exist")
        return load_identity_folders(root, image_size=image_size)
    raise ConfigError(f"--data {spec!r}: identity pretraining reads 'synthetic' (the generator's identity mode) "
                      "or 'folder:PATH' (one folder of images per identity)")


def load_unlabelled_set(spec: str, *, image_size: int, seed: int, options: dict[str, str] | None = None) -> ImageSet:
    """The training split of any ``--data`` spec, labels dropped (``--objective ssl``)."""
    from dnfer.data.spec import load_data_spec, parse_data_spec

    ds = load_data_spec(parse_data_spec(spec, options), image_size=image_size, seed=seed)
    if len(ds.train) == 0:
        raise DataError(f"--data {spec!r}: the training split is empty")
    return ImageSet(ds.train.images, np.zeros(len(ds.train), np.int64), [],
                    {"source": str(ds.meta.get("spec", spec)), "images": len(ds.train)})
