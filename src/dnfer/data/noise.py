"""Synthetic label noise (the literature's protocols) and RAF-DB-style label files.

Pure functions over numpy arrays with keyword-only options (cleanlab style). Every generator is
seeded, returns the noisy labels *and* the is-noisy mask, and the realised rate, which is what a
paper should report (the nominal rate is only the flip probability).

Protocols (docs/datasets.md, "Noise files"):

- ``symmetric:p``  each label, independently with probability p, becomes a uniformly random
  *different* class (SCN/EAC's RAF-DB protocol).
- ``asymmetric:p`` each label of a class in :data:`CONFUSABLE` flips with probability p to that
  class's confusable partner (fear<->surprise, disgust<->anger, sadness<->neutral,
  happiness->neutral, contempt->disgust). The pairs follow the action units the classes share
  (docs/synthetic.md); other taxonomies have no such pairs and need a transition matrix.
- ``pairflip:p``   label c flips with probability p to c+1 mod K.
- a transition matrix ``T`` (``T[i, j] = P(noisy = j | true = i)``, rows sum to 1).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dnfer.data.classes import CANONICAL_CLASSES, canonical_name, class_key, is_expression_list
from dnfer.errors import ConfigError, DataError
from dnfer.io_safety import not_a_file_text, read_utf8_lines, write_text_atomic

#: Asymmetric noise: class -> the class it is confused with.
CONFUSABLE: dict[str, str] = {
    "fear": "surprise",
    "surprise": "fear",
    "disgust": "anger",
    "anger": "disgust",
    "sadness": "neutral",
    "neutral": "sadness",
    "happiness": "neutral",
    "contempt": "disgust",
}

NOISE_KINDS = ("none", "symmetric", "asymmetric", "pairflip")


@dataclass(frozen=True)
class NoiseResult:
    """Outcome of noise injection.

    Attributes:
        noisy_labels: int64 ``(N,)``.
        is_noisy: bool ``(N,)``, ``noisy_labels != labels``.
    """

    noisy_labels: np.ndarray
    is_noisy: np.ndarray

    @property
    def realised_rate(self) -> float:
        return float(self.is_noisy.mean()) if len(self.is_noisy) else 0.0


@dataclass(frozen=True)
class NoiseSpec:
    kind: str
    rate: float

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.rate:g}"


def parse_noise_spec(text: str) -> NoiseSpec:
    """Parse ``none``, ``symmetric:0.3``, ``asymmetric:0.3`` or ``pairflip:0.3``."""
    t = text.strip().lower()
    if t in ("none", "", "clean", "0"):
        return NoiseSpec("none", 0.0)
    m = re.fullmatch(r"([a-z]+):([0-9.eE+-]+)", t)
    if not m:
        raise ConfigError(
            f"malformed noise spec {text!r}; expected none or KIND:RATE with KIND one of "
            f"symmetric, asymmetric, pairflip (e.g. symmetric:0.3)"
        )
    kind, rate_text = m.groups()
    if kind not in NOISE_KINDS[1:]:
        raise ConfigError(f"unknown noise kind {kind!r} in {text!r}; valid: symmetric, asymmetric, pairflip")
    try:
        rate = float(rate_text)
    except ValueError:
        raise ConfigError(f"noise rate {rate_text!r} in {text!r} is not a number") from None
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"noise rate must be in [0, 1), got {rate:g} in {text!r}")
    return NoiseSpec(kind, rate)


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    return labels


def _check_rate(rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"noise rate must be in [0, 1), got {rate}")


def symmetric_noise(labels: np.ndarray, *, rate: float, num_classes: int, seed: int) -> NoiseResult:
    """Flip each label with probability ``rate`` to a uniformly random different class."""
    _check_rate(rate)
    labels = _check_labels(labels, num_classes)
    if num_classes < 2:
        raise ValueError("symmetric noise needs at least two classes")
    rng = np.random.default_rng(seed)
    flip = rng.random(len(labels)) < rate
    # Drawing an offset in 1..K-1 and adding it mod K gives a uniform *different* class.
    offset = rng.integers(1, num_classes, size=len(labels))
    noisy = np.where(flip, (labels + offset) % num_classes, labels)
    return NoiseResult(noisy, noisy != labels)


def transition_noise(labels: np.ndarray, *, matrix: np.ndarray, seed: int) -> NoiseResult:
    """Draw each noisy label from row ``labels[i]`` of the transition matrix ``(K, K)``."""
    t = np.asarray(matrix, dtype=np.float64)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ConfigError(f"transition matrix must be square, got shape {t.shape}")
    if (t < 0).any() or not np.allclose(t.sum(1), 1.0, atol=1e-6):
        raise ConfigError("transition matrix entries must be >= 0 and each row must sum to 1")
    k = t.shape[0]
    labels = _check_labels(labels, k)
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(t, axis=1)
    cdf[:, -1] = 1.0
    u = rng.random(len(labels))
    noisy = (u[:, None] >= cdf[labels]).sum(1).astype(np.int64)
    return NoiseResult(noisy, noisy != labels)


def pairflip_matrix(num_classes: int, rate: float) -> np.ndarray:
    """``(K, K)`` matrix moving mass ``rate`` from c to c+1 mod K."""
    _check_rate(rate)
    t = np.eye(num_classes) * (1 - rate)
    for c in range(num_classes):
        t[c, (c + 1) % num_classes] += rate
    return t


def asymmetric_matrix(class_names: Sequence[str], rate: float, confusable: dict[str, str] | None = None) -> np.ndarray:
    """``(K, K)`` matrix flipping each class to its confusable partner with probability ``rate``.

    Classes whose partner is not in ``class_names`` keep their labels. The default pairs are
    between expressions: a class list with any other name raises ConfigError (give a matrix).
    """
    _check_rate(rate)
    if confusable is None and not is_expression_list(class_names):
        raise ConfigError(
            f"asymmetric noise flips expression classes to their confusable partners (fear<->surprise, "
            f"disgust<->anger, ...), but the classes {', '.join(map(str, class_names))} are not all expression "
            "names; pass a KxK transition matrix (train: --noise-matrix FILE / data.noise_matrix; dnfer noise: "
            "--transition FILE) or use symmetric:R or pairflip:R"
        )
    confusable = CONFUSABLE if confusable is None else confusable
    expressions = is_expression_list(class_names)
    names = [class_key(c, expressions) for c in class_names]
    t = np.eye(len(names))
    for i, name in enumerate(names):
        partner = confusable.get(name)
        if partner in names:
            t[i, i] = 1 - rate
            t[i, names.index(partner)] = rate
    return t


def pairflip_noise(labels: np.ndarray, *, rate: float, num_classes: int, seed: int) -> NoiseResult:
    return transition_noise(labels, matrix=pairflip_matrix(num_classes, rate), seed=seed)


def asymmetric_noise(labels: np.ndarray, *, rate: float, class_names: Sequence[str], seed: int) -> NoiseResult:
    return transition_noise(labels, matrix=asymmetric_matrix(class_names, rate), seed=seed)


def apply_noise(labels: np.ndarray, spec: NoiseSpec | str, *, class_names: Sequence[str], seed: int) -> NoiseResult:
    """Apply a parsed (or text) noise spec to ``labels``."""
    if isinstance(spec, str):
        spec = parse_noise_spec(spec)
    k = len(class_names)
    labels = _check_labels(labels, k)
    if spec.kind == "none" or spec.rate == 0.0:
        return NoiseResult(labels.copy(), np.zeros(len(labels), bool))
    if spec.kind == "symmetric":
        return symmetric_noise(labels, rate=spec.rate, num_classes=k, seed=seed)
    if spec.kind == "pairflip":
        return pairflip_noise(labels, rate=spec.rate, num_classes=k, seed=seed)
    if spec.kind == "asymmetric":
        return asymmetric_noise(labels, rate=spec.rate, class_names=class_names, seed=seed)
    raise ConfigError(f"unknown noise kind {spec.kind!r}")


def load_transition_matrix(path: str | Path, class_names: Sequence[str], *, option: str = "--noise-matrix") -> np.ndarray:
    """Read a ``(K, K)`` transition matrix (``.npy`` or whitespace-separated text, rows = true
    class in ``class_names`` order) and check its shape, entries and row sums (ConfigError)."""
    path = Path(path)
    k = len(class_names)
    if not path.is_file():
        raise ConfigError(f"{option} {str(path)!r} does not exist")
    try:
        matrix = np.load(path) if path.suffix == ".npy" else np.loadtxt(path, ndmin=2)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{option} {path}: not a numeric matrix ({e})") from None
    if matrix.shape != (k, k):
        raise ConfigError(
            f"{option} {path}: expected a {k}x{k} matrix (rows and columns in class order "
            f"{', '.join(map(str, class_names))}), got shape {matrix.shape}"
        )
    if (matrix < 0).any() or not np.allclose(matrix.sum(1), 1.0, atol=1e-6):
        raise ConfigError(f"{option} {path}: entries must be >= 0 and each row must sum to 1")
    return matrix.astype(np.float64)


# --- RAF-DB EmoLabel line format: "name label", label 1-based in canonical (RAF) order. -----------


def write_label_file(
    path: str | Path, names: Sequence[str], labels: np.ndarray, *, class_names: Sequence[str],
    file_classes: Sequence[str] = CANONICAL_CLASSES,
) -> None:
    """Write ``name label`` lines; label k names ``file_classes[k - 1]`` (default: RAF order, contempt = 8)."""
    if file_classes is CANONICAL_CLASSES:
        order = list(CANONICAL_CLASSES)
        to_file = [order.index(canonical_name(c)) + 1 for c in class_names]
    else:
        to_file = [list(file_classes).index(c) + 1 for c in class_names]
    lines = [f"{n} {to_file[int(y)]}\n" for n, y in zip(names, labels, strict=True)]
    write_text_atomic(path, "".join(lines))


def read_label_file(
    path: str | Path, *, num_file_classes: int = 8, file_classes: Sequence[str] = CANONICAL_CLASSES
) -> dict[str, str]:
    """Read ``name label`` lines into ``name -> class name``: label k names ``file_classes[k - 1]``
    (by default the canonical = RAF order, contempt = 8; an open taxonomy passes its own list and
    ``num_file_classes = len(file_classes)``).

    Blank lines are ignored. Malformed lines, labels out of range and duplicate names raise a
    DataError naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label file {str(path)!r} {not_a_file_text(path)}")
    out: dict[str, str] = {}
    for lineno, line in read_utf8_lines(path):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{lineno}: expected 'name label' (label 1..{num_file_classes}), got {line.strip()!r}")
        name, lab = parts[0], int(parts[1])
        if not 1 <= lab <= num_file_classes:
            raise DataError(f"{path}:{lineno}: label {lab} out of range 1..{num_file_classes}")
        if name in out:
            raise DataError(f"{path}:{lineno}: duplicate name {name!r}")
        out[name] = file_classes[lab - 1]
    return out
