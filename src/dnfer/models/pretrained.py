"""Load local pretrained weights into a :class:`~dnfer.models.factory.FERNet`.

Accepted files: a dnfer checkpoint (``model`` key), a plain ``state_dict``, a dict with a
``state_dict`` key (the MS-Celeb-1M ResNet-18 file ``res18_naive.pth_MSceleb.tar`` the FER
community uses: keys prefixed ``module.``, with ``fc.*`` and ``feature.*`` to skip), or a
torchvision-layout ResNet ``state_dict``. Classifier keys are never loaded (the class count
differs); any other mismatch is an error unless ``allow_partial=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dnfer.errors import ConfigError

#: Prefixes of checkpoint keys that belong to a classifier and are skipped.
CLASSIFIER_PREFIXES = ("fc.", "feature.", "head.", "classifier.")


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did (tensor counts; names listed for error messages)."""

    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped_classifier: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"loaded {self.loaded} tensors, missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"shape-mismatched {len(self.shape_mismatch)}, skipped classifier {len(self.skipped_classifier)}"
        )


def _extract_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj  # type: ignore[return-value]
    raise ConfigError(f"--pretrained {str(path)!r}: no state_dict found (expected a dict of tensors or a 'state_dict'/'model' key)")


def _normalise_key(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        key = key.removeprefix(prefix)
    return key


def load_pretrained(model: nn.Module, path: str | Path, *, allow_partial: bool = False) -> LoadReport:
    """Load backbone weights from ``path`` into ``model`` (in place) and report the counts.

    Raises ConfigError for unreadable files, and for missing/unexpected/shape-mismatched
    backbone tensors unless ``allow_partial``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--pretrained {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for corrupt files
        raise ConfigError(f"--pretrained {str(path)!r} is not a readable torch checkpoint: {e}") from None
    source = {_normalise_key(k): v for k, v in _extract_state_dict(obj, path).items()}
    target = model.state_dict()
    report = LoadReport(loaded=0)
    to_load: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        if key.startswith(CLASSIFIER_PREFIXES):
            report.skipped_classifier.append(key)
            continue
        name = key if key in target else f"backbone.{key}"
        if name not in target:
            report.unexpected.append(key)
        elif target[name].shape != value.shape:
            report.shape_mismatch.append(f"{key} {tuple(value.shape)} vs {tuple(target[name].shape)}")
        else:
            to_load[name] = value
    report.missing = [k for k in target if k not in to_load and not k.startswith("head.")]
    report.loaded = len(to_load)
    problems = report.missing or report.unexpected or report.shape_mismatch
    if problems and not allow_partial:
        detail = (report.missing + report.unexpected + report.shape_mismatch)[:5]
        raise ConfigError(
            f"--pretrained {str(path)!r} does not match the model ({report.summary()}; e.g. {detail}); "
            "pass --allow-partial-pretrained to load what matches"
        )
    model.load_state_dict(to_load, strict=False)
    return report
