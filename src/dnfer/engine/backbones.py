"""Named pretrained backbones: ``--pretrained dnfer:NAME`` builds one on first use and caches it.

A named backbone is a fixed :class:`~dnfer.engine.pretrain.PretrainSettings` (the recipe).
The first use runs :func:`~dnfer.engine.pretrain.pretrain` into
``$DNFER_CACHE_DIR/backbones/NAME-KEY/`` (default ``~/.cache/dnfer``), where ``KEY`` hashes every
setting that changes the weights, so a changed recipe builds a new file instead of reusing a
stale one. Later uses read the cached ``backbone.safetensors``. An interrupted build resumes
where it stopped; concurrent users (``dnfer bench --jobs 2``) wait for one build instead of
racing (a blocking ``flock`` on a build lock next to the folder).

``synthetic-identity`` is the embedded benchmark's face-pretrained regime: identity
classification on the synthetic identity mode, whose people never appear in the FER splits
(``docs/pretrain.md``), standing in for the MS-Celeb-1M face-recognition ResNet-18 the paper and
its peers fine-tune.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dnfer.engine.pretrain import BACKBONE_FILE, PretrainSettings, pretrain
from dnfer.errors import ConfigError

#: name -> the settings of its recipe (fields of PretrainSettings). Device, threads and progress
#: are chosen at build time and are not part of the recipe.
NAMED_BACKBONES: dict[str, dict[str, Any]] = {
    # The measured default of docs/pretrain.md ("Does it help?"): only the face's geometry is fixed
    # per person (traits=shape), so identity cannot be told from colour or hair.
    "synthetic-identity": dict(objective="identity", data="synthetic", data_options={"traits": "shape"},
                               model="resnet10_slim", image_size=64, epochs=15, batch_size=64, identities=500,
                               images_per_identity=20, seed=0, probe_data=None),
}

#: Settings that do not change the weights (where and how visibly the build runs).
_NOT_IN_KEY = ("device", "threads", "progress")


def backbone_cache_dir() -> Path:
    """``$DNFER_CACHE_DIR/backbones`` or ``~/.cache/dnfer/backbones``."""
    root = os.environ.get("DNFER_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "dnfer") / "backbones"


def recipe(name: str) -> PretrainSettings:
    """The settings of the named backbone; a ConfigError names the valid names."""
    if name not in NAMED_BACKBONES:
        raise ConfigError(f"--pretrained dnfer:{name}: unknown named backbone; valid: "
                          f"{', '.join('dnfer:' + n for n in sorted(NAMED_BACKBONES))}")
    s = PretrainSettings(**NAMED_BACKBONES[name])
    s.image_size = s.resolved_image_size()
    return s


def recipe_key(s: PretrainSettings) -> str:
    """16 hex digits of a sha256 over the settings that change the weights."""
    d = {k: v for k, v in dataclasses.asdict(s).items() if k not in _NOT_IN_KEY}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # blocking: a second user waits for the first build
        yield
    finally:
        os.close(fd)


def named_backbone(name: str, *, model_name: str | None = None, image_size: int | None = None,
                   log: Callable[[str], None] = print, progress: bool = True) -> Path:
    """The cached ``backbone.safetensors`` of ``dnfer:NAME``, built first if absent.

    Args:
        model_name, image_size: the run's ``--model`` and image size, checked against the
            recipe's (a backbone fits only its own architecture; a different size would work
            but is not what the recipe was made for, so it is refused rather than silently used).
    """
    s = recipe(name)
    if model_name is not None and model_name != s.model:
        raise ConfigError(f"--pretrained dnfer:{name} is a {s.model} backbone; train with --model {s.model} "
                          f"(got {model_name!r})")
    if image_size is not None and image_size != s.image_size:
        raise ConfigError(f"--pretrained dnfer:{name} was pretrained at {s.image_size} px; train with "
                          f"--image-size {s.image_size} (got {image_size})")
    folder = backbone_cache_dir() / f"{name}-{recipe_key(s)}"
    path = folder / BACKBONE_FILE
    if path.is_file():
        return path
    with _build_lock(folder.parent / f".{folder.name}.build.lock"):
        if path.is_file():  # built by another process while this one waited
            return path
        resume = (folder / "last.pt").is_file()
        log(f"--pretrained dnfer:{name}: {'resuming' if resume else 'building'} the backbone (first use; "
            f"{s.objective} pretraining of {s.model} at {s.image_size} px, {s.epochs} epochs) into {folder}")
        s.progress = progress
        pretrain(s, folder, resume=resume, log=log)
    return path
