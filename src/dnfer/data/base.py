"""In-memory (or memory-mapped) labelled image splits: the one shape every dataset takes.

Every dataset adapter ends in a :class:`FERDataset`: images already decoded and resized to the
training size as uint8 ``(N, H, W, 3)`` RGB arrays (a numpy array, a ``np.memmap`` or the
prepared cache's sharded reader), labels as indices into ``class_names``. Decoding happens
once, not every epoch, which is most of why training here is fast (see docs/performance.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ImageArray(Protocol):
    """What the trainer needs from an image store: ``len``, ``shape`` and fancy indexing.

    ``store[indices]`` with a 1-D int array returns uint8 ``(k, H, W, 3)``. A store may also
    offer ``read_into(indices, out)``, filling a given C-contiguous uint8 ``(k, H, W, 3)`` array
    (the prepared cache reads rows straight into a pinned buffer that way); the trainer uses it
    when present and indexing otherwise.
    """

    shape: tuple[int, ...]

    def __len__(self) -> int: ...

    def __getitem__(self, index: Any) -> np.ndarray: ...


class IndexedImages:
    """A lazy row view ``store[index]`` of an image store (e.g. the prepared cache's reader).

    ``Split.subset`` returns this instead of gathering when the images are not a plain
    in-memory array, so carving validation out of a disk-backed split costs no image RAM.
    """

    def __init__(self, store: ImageArray, index: np.ndarray) -> None:
        index = np.asarray(index, dtype=np.int64)
        if isinstance(store, IndexedImages):  # compose views instead of stacking them
            index, store = store.index[index], store.store
        self.store = store
        self.index = index
        self.shape = (len(index), *store.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: Any) -> np.ndarray:
        """uint8 ``(k, H, W, 3)`` for an int array / slice, ``(H, W, 3)`` for an int."""
        if isinstance(idx, (int, np.integer)):
            return self.store[np.array([self.index[idx]])][0]
        return self.store[self.index[idx]]

    def read_into(self, idx: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` with rows ``idx`` of this view (the store's own ``read_into`` if it has one)."""
        read = getattr(self.store, "read_into", None)
        if read is not None:
            return read(self.index[np.asarray(idx, dtype=np.int64)], out)
        out[...] = self[np.asarray(idx, dtype=np.int64)]
        return out


@dataclass
class Split:
    """One split of a dataset.

    Attributes:
        images: uint8 ``(N, H, W, 3)`` RGB.
        labels: int64 ``(N,)`` given labels (possibly noisy) as indices into the class list.
        names: ``N`` sample names (file names as the dataset spells them), unique per split.
        true_labels: int64 ``(N,)`` the clean labels when known (synthetic noise), else None.
            Used only for diagnostics; no method may read them.
        soft_labels: float32 ``(N, K)`` per-image label distribution (e.g. FERPlus votes), or None.
    """

    images: ImageArray
    labels: np.ndarray
    names: list[str]
    true_labels: np.ndarray | None = None
    soft_labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.labels)
        if len(self.images) != n or len(self.names) != n:
            raise ValueError(
                f"split arrays disagree: {len(self.images)} images, {n} labels, {len(self.names)} names"
            )
        if self.true_labels is not None:
            self.true_labels = np.asarray(self.true_labels, dtype=np.int64)
            if len(self.true_labels) != n:
                raise ValueError("true_labels length differs from labels")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_noisy(self) -> np.ndarray | None:
        """bool ``(N,)``: given label differs from the truth, or None when the truth is unknown."""
        if self.true_labels is None:
            return None
        return self.labels != self.true_labels

    def subset(self, idx: np.ndarray) -> Split:
        """A new split holding rows ``idx`` (in-memory images are gathered, others viewed)."""
        idx = np.asarray(idx, dtype=np.int64)
        if type(self.images) is np.ndarray:
            images: ImageArray = (
                np.ascontiguousarray(self.images[idx]) if len(idx) else np.zeros((0, *self.images.shape[1:]), np.uint8)
            )
        else:  # memmap / cache reader: a lazy view keeps RAM independent of the dataset size
            images = IndexedImages(self.images, idx)
        return Split(
            images=images,
            labels=self.labels[idx],
            names=[self.names[i] for i in idx],
            true_labels=None if self.true_labels is None else self.true_labels[idx],
            soft_labels=None if self.soft_labels is None else self.soft_labels[idx],
        )

    def with_labels(self, labels: np.ndarray, true_labels: np.ndarray | None) -> Split:
        return replace(self, labels=np.asarray(labels, dtype=np.int64), true_labels=true_labels)


@dataclass
class FERDataset:
    """A dataset ready for training: class names and train / optional val / test splits.

    ``meta`` records provenance (source spec, protocol, counts, realised noise rate, skipped
    files) and goes into the run summary.
    """

    class_names: list[str]
    train: Split
    test: Split
    val: Split | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def splits(self) -> dict[str, Split]:
        out = {"train": self.train}
        if self.val is not None:
            out["val"] = self.val
        out["test"] = self.test
        return out


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 ``(K,)`` count of each label."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def carve_validation(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Split off a stratified (by given label) validation part of ``split``.

    The validation part keeps the *given* labels: when those are noisy, so is validation, as in
    real use, where no clean subset exists. Returns ``(train, val)``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val_idx: list[np.ndarray] = []
    for c in np.unique(split.labels):
        members = np.flatnonzero(split.labels == c)
        rng.shuffle(members)
        k = int(round(len(members) * fraction))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        else:
            k = 0
        val_idx.append(members[:k])
    val = np.sort(np.concatenate(val_idx)) if val_idx else np.zeros(0, np.int64)
    mask = np.ones(len(split), bool)
    mask[val] = False
    return split.subset(np.flatnonzero(mask)), split.subset(val)
