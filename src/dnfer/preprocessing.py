"""What an image must go through before a model sees it, stored with the model.

:class:`Preprocessing` is timm's ``pretrained_cfg`` idea: a model carries its input size,
normalisation, colour order and class names, every checkpoint and export stores them, and
training, ``dnfer eval``, ``predict``, ``audit`` and ``export`` read them from there, so
inference always matches training. The serialised form (``to_dict``) is plain JSON-able data::

    {"input_size": [3, S, S], "mean": [r, g, b], "std": [r, g, b], "color_order": "RGB",
     "resize": "bilinear-antialias", "class_names": [...]}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dnfer.errors import DnferError

#: ImageNet channel statistics (torchvision's), the default normalisation.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
COLOR_ORDERS = ("RGB", "BGR")


class PreprocessingError(DnferError):
    """Stored preprocessing that is incomplete or unsupported."""


@dataclass(frozen=True)
class Preprocessing:
    """A model's input contract.

    Attributes:
        image_size: side S of the square ``(3, S, S)`` input.
        mean, std: per-channel normalisation of ``x / 255`` (in ``color_order``).
        color_order: ``RGB`` or ``BGR``: the channel order the model was trained with.
        resize: the resize filter (``bilinear-antialias``).
        class_names: the ``K`` output classes, in logit order (empty until a dataset is known).
    """

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    color_order: str = "RGB"
    resize: str = "bilinear-antialias"
    class_names: tuple[str, ...] = ()

    @property
    def input_size(self) -> tuple[int, int, int]:
        """``(3, S, S)``."""
        return (3, self.image_size, self.image_size)

    def with_classes(self, class_names: Sequence[str]) -> Preprocessing:
        return dataclasses.replace(self, class_names=tuple(str(c) for c in class_names))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (stored in checkpoints and export metadata)."""
        return {"input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
                "color_order": self.color_order, "resize": self.resize, "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str, class_names: Sequence[str] | None = None) -> Preprocessing:
        """Parse :meth:`to_dict`'s form; ``class_names`` fills in a dict without them.

        Raises:
            PreprocessingError: missing keys, a non-square size, an unknown colour order.
        """
        try:
            size = [int(v) for v in d["input_size"]]
            pre = cls(
                image_size=size[-1],
                mean=tuple(float(v) for v in d["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in d["std"]),  # type: ignore[arg-type]
                color_order=str(d.get("color_order", "RGB")).upper(),
                resize=str(d.get("resize", "bilinear-antialias")),
                class_names=tuple(str(c) for c in (d.get("class_names") or class_names or ())),
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise PreprocessingError(f"{source!r}: the stored preprocessing is incomplete ({type(e).__name__}: {e})") from None
        if len(size) != 3 or size[0] != 3 or size[1] != size[2] or pre.image_size < 1:
            raise PreprocessingError(f"{source!r}: input size {size} is not supported (expected [3, S, S])")
        if pre.color_order not in COLOR_ORDERS or len(pre.mean) != 3 or len(pre.std) != 3:
            raise PreprocessingError(f"{source!r}: unsupported preprocessing {dict(d)}")
        return pre
