"""Atomic, verifiable checkpoints.

A checkpoint holds everything needed to continue exactly: model, optimiser, scheduler, grad
scaler, method state (thresholds, extra heads), every RNG state, the epoch/step position, the
resolved config, class names and preprocessing. It is written to a temporary file in the same
directory, flushed to disk, then renamed over the target, so a kill at any moment leaves either
the old or the new file, never a torn one. The previous ``last.pt`` is kept as ``last.prev.pt``
so that ``--resume`` can fall back if the newest file is unreadable (e.g. a disk error).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dnfer.errors import DnferError

FORMAT_VERSION = 1


class CheckpointError(DnferError):
    """A checkpoint file is missing, truncated or not a dnfer checkpoint."""


def _write_synced(obj: Any, path: Path) -> Path:
    """``torch.save`` to a temporary sibling of ``path``, flushed to disk; returns the temp path
    (removed again if the save fails, e.g. disk full)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _sync_dir(directory: Path) -> None:
    try:  # make the renames themselves durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` via temp file + fsync + rename."""
    path = Path(path)
    os.replace(_write_synced(obj, path), path)
    _sync_dir(path.parent)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and sanity-check a dnfer checkpoint (CPU tensors). Raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle errors, ...
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or truncated ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "dnfer-checkpoint" or "model" not in ckpt:
        raise CheckpointError(f"{str(path)!r} is not a dnfer checkpoint")
    return ckpt


def rotate_and_save(obj: Any, run_dir: Path, name: str = "last.pt") -> Path:
    """Save ``run_dir/name``, keeping the current one as ``<stem>.prev.pt``.

    The new file is complete on disk before either rename, so a kill at any moment leaves a
    readable ``name`` or (between the two renames) a readable ``<stem>.prev.pt``.
    """
    target = run_dir / name
    tmp = _write_synced(obj, target)
    if target.exists():
        os.replace(target, run_dir / f"{Path(name).stem}.prev.pt")
    os.replace(tmp, target)
    _sync_dir(run_dir)
    return target


def find_resumable(run_dir: Path, log: Any = print) -> dict[str, Any] | None:
    """The newest readable of ``last.pt`` / ``last.prev.pt`` in ``run_dir`` (None if neither exists).

    An unreadable newest file is reported through ``log`` and the previous one is used.
    """
    candidates = [run_dir / "last.pt", run_dir / "last.prev.pt"]
    errors = []
    for path in candidates:
        if not path.exists():
            if path.name == "last.pt" and candidates[1].exists():  # killed between rotate_and_save's renames
                log(f"warning: {path} is missing; trying the previous checkpoint")
            continue
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            errors.append(str(e))
            log(f"warning: {e}; trying the previous checkpoint")
            continue
        ckpt["_path"] = str(path)
        return ckpt
    if errors:
        raise CheckpointError("no readable checkpoint to resume from: " + "; ".join(errors))
    return None


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
