"""Checkpoints: data, never code, verified on every load, written atomically.

A checkpoint is one ``torch.save`` file of plain data only — tensors, numbers, strings, lists,
tuples, dicts — so ``torch.load(path, weights_only=True)`` reads it and loading can never run
code (a pickle can call any Python function; ``weights_only`` refuses every object but those)::

    {"format": "dnfer-checkpoint", "version": 2, "model_name": str, "config": {...},
     "preprocessing": {"input_size": [3, S, S], "mean", "std", "color_order", "resize", "class_names"},
     "model": {name: Tensor},                     # the weights: all eval/predict/export/audit need
     "resume": {"method", "optimizer", "scheduler", "scaler", "rng", "state", "selection_history",
                "metrics_lines"},
     "sha256": hex digest of everything else}     # "resume" only in last.pt

``sha256`` covers a canonical walk of the payload (every tensor's dtype, shape and bytes, every
key and value), so a flipped bit anywhere is caught on load whether or not it breaks the file's
zip structure; a truncated file does not unzip. Non-finite weights and unknown versions are
refused too. ``--trust-checkpoint`` loads files that need arbitrary unpickling (third-party
files, old pickles) with ``weights_only=False``: that runs whatever code the file holds.

Version-1 checkpoints (dnfer before 2026-12) stored numpy arrays and RNG tuples; they still load
under ``weights_only`` with numpy's array reconstruction functions allowed (nothing else), but
have no checksum.

Writes go to a temporary file in the same directory, flushed to disk, then renamed over the
target, so a kill at any moment leaves either the old or the new file. The previous ``last.pt``
is kept as ``last.prev.pt`` while a run trains, so that ``--resume`` can fall back if the newest
file is damaged.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dnfer.errors import DnferError
from dnfer.preprocessing import Preprocessing, PreprocessingError

if TYPE_CHECKING:
    from dnfer.config import Config
    from dnfer.engine.device import Precision
    from dnfer.models.factory import FERNet

FORMAT = "dnfer-checkpoint"
FORMAT_VERSION = 2
#: Versions this code reads.
READABLE_VERSIONS = (1, 2)
TRUST_HINT = ("if you trust where the file comes from, pass --trust-checkpoint "
              "(unsafe: loading it runs whatever code it holds)")


class CheckpointError(DnferError):
    """A checkpoint file is missing, damaged, unsafe to load or not a dnfer checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A file that needs arbitrary unpickling (it could run code), loaded without trust."""


# ----------------------------------------------------------------------------- plain data


def to_plain(obj: Any) -> Any:
    """``obj`` with numpy arrays as tensors and numpy scalars as Python numbers (containers copied).

    What ``torch.load(weights_only=True)`` reads back without any allowlist.
    """
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "USO":  # strings/objects have no tensor dtype
            return [to_plain(v) for v in obj.tolist()]
        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_plain(v) for v in obj)
    return obj


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` (nested dicts, lists, tuples) with ``fn`` applied to every tensor in it."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(map_tensors(v, fn) for v in obj)
    return obj


def to_cpu(obj: Any) -> Any:
    """Plain data ``obj`` with every tensor on the CPU (one device-to-host copy for hashing and saving)."""
    return map_tensors(obj, lambda t: t.detach().cpu())


def to_numpy(obj: Any) -> Any:
    """The inverse of :func:`to_plain` for restoring numpy-based state: tensors -> numpy arrays."""
    return map_tensors(obj, lambda t: t.numpy().copy())


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's elements in memory order (no copy for contiguous and
    channels_last tensors, which is what training saves on CPU); other layouts are copied."""
    dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) or (
        t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))
    if dense:
        return t.as_strided((t.numel(),), (1,))
    return t.contiguous().reshape(-1)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in floating-point ``t``: min and max propagate NaN and show an infinity, and
    one ``aminmax`` pass is ~10x faster than ``isfinite(t).all()`` (no boolean tensor)."""
    if not t.is_floating_point() or not t.numel():
        return True
    flat = _memory_order(t)
    try:
        lo, hi = torch.aminmax(flat)
    except RuntimeError:  # a dtype without an aminmax kernel on this device
        return bool(torch.isfinite(flat).all())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def _feed(h: Any, obj: Any) -> None:
    """Feed a canonical, type-tagged encoding of plain data ``obj`` into hash ``h``.

    A tensor's bytes are taken in memory order, its strides are part of the encoding (save and
    load keep them), so channels_last weights are hashed without a copy."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        h.update(b"T" + f"{t.dtype}|{tuple(t.shape)}|{t.stride()}|".encode())
        if t.numel():
            h.update(memoryview(_memory_order(t).view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(b"D%d|" % len(obj))
        for k, v in obj.items():  # insertion order survives torch.save/load
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update((b"L%d|" if isinstance(obj, list) else b"U%d|") % len(obj))
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, bool):
        h.update(b"N|" if obj is None else b"B%d|" % obj)
    elif isinstance(obj, int):
        h.update(b"I%d|" % obj)
    elif isinstance(obj, float):
        h.update(b"F" + struct.pack("<d", obj))
    elif isinstance(obj, str):
        b = obj.encode()
        h.update(b"S%d|" % len(b) + b)
    elif isinstance(obj, (torch.dtype, torch.device, torch.Size)):
        h.update(b"O" + str(obj).encode() + b"|")
    else:
        raise TypeError(f"checkpoints hold plain data only, got {type(obj).__name__}")


def digest(payload: dict[str, Any]) -> str:
    """sha256 (hex) of ``payload`` without its ``sha256`` key."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in payload.items() if k != "sha256"})
    return h.hexdigest()


# ----------------------------------------------------------------------------- the typed checkpoint


@dataclass
class Checkpoint:
    """A loaded (or to-be-saved) dnfer checkpoint.

    Attributes:
        model_name: the ``--model`` name (``resnet18``, ``timm:NAME``...).
        model: the model's ``state_dict``.
        preprocessing: input size, normalisation, colour order and class names.
        config: the run's resolved config as a plain dict (``Config.to_dict()``).
        resume: what ``--resume`` needs beyond the weights (``method``, ``optimizer``,
            ``scheduler``, ``scaler``, ``rng``, ``state``, ``selection_history`` and
            ``metrics_lines``, the ``metrics.jsonl`` line of every finished epoch, absent
            from files of older dnfer versions); None in weights-only files (``best.pt``).
        path: where it was loaded from ("" if built in memory).
        version: the file's format version.
    """

    model_name: str
    model: dict[str, torch.Tensor]
    preprocessing: Preprocessing
    config: dict[str, Any]
    resume: dict[str, Any] | None = None
    path: str = ""
    version: int = FORMAT_VERSION

    @property
    def class_names(self) -> list[str]:
        return list(self.preprocessing.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.preprocessing.class_names)

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    def cfg(self) -> Config:
        """The run's :class:`~dnfer.config.Config`."""
        from dnfer.config import Config

        return Config.from_dict(self.config, source=self.path or "checkpoint", saved=True)

    def setting(self, section: str, key: str, default: Any = None) -> Any:
        """One value of the stored config (without validating all of it: inference needs a few)."""
        part = self.config.get(section)
        return part.get(key, default) if isinstance(part, dict) else default

    def inference_precision(self, device: torch.device) -> Precision:
        """The precision to run the model in: the run's on accelerators; ``auto`` on CPU (bf16
        where the CPU has it natively, else fp32 — a run trained in fp16 on a GPU cannot use it there)."""
        from dnfer.engine.device import resolve_precision

        return resolve_precision(str(self.setting("train", "precision", "auto")) if device.type != "cpu" else "auto",
                                 device)

    def to_payload(self) -> dict[str, Any]:
        """The plain dict written to disk (without the digest)."""
        payload: dict[str, Any] = {
            "format": FORMAT, "version": FORMAT_VERSION, "model_name": self.model_name,
            "config": to_plain(self.config), "preprocessing": self.preprocessing.to_dict(),
            "model": dict(self.model),
        }
        if self.resume is not None:
            payload["resume"] = to_plain(self.resume)
        return payload


def load_model(ckpt: Checkpoint, device: torch.device | str = "cpu") -> FERNet:
    """Rebuild the checkpoint's model in eval mode on ``device``.

    Raises:
        CheckpointError: the weights do not fit the model the checkpoint names.
    """
    from dnfer.models.factory import create_model
    pre = ckpt.preprocessing
    model = create_model(ckpt.model_name, ckpt.num_classes, image_size=pre.image_size,
                         small_input=ckpt.setting("model", "small_input"),
                         dropout=float(ckpt.setting("model", "dropout", 0.0)), mean=pre.mean, std=pre.std)
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint {ckpt.path!r}: its weights do not fit model {ckpt.model_name!r} "
                              f"({' '.join(first[:2])[:200]})") from None
    model.preprocessing = pre
    return model.to(device).eval()


# ----------------------------------------------------------------------------- reading


def _numpy_safe_globals() -> list[Any]:
    """numpy's array/dtype reconstruction functions and classes (version-1 checkpoints pickled
    numpy arrays): they build arrays from bytes and call nothing else."""
    core = getattr(np, "_core", None) or np.core
    names = [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        names += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n != "ObjectDType"
                  and not n.startswith("_")]
    return names


def torch_load_plain(path: Path, *, trust: bool, what: str) -> Any:
    """``torch.load`` with ``weights_only=True`` (plus numpy arrays); a file that needs more is
    refused unless ``trust``. Raises CheckpointError naming ``what``."""
    try:
        safe = getattr(torch.serialization, "safe_globals", None)
        if safe is not None:
            with safe(_numpy_safe_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch words every weights_only failure alike; a disallowed global is the unsafe case,
        # anything else is a damaged pickle.
        if not re.search(r"Unsupported global|not an allowed global|GLOBAL ", str(e)):
            detail = re.search(r"WeightsUnpickler error: ([^\n]+)", str(e))
            raise CheckpointError(f"{what} is not a readable torch checkpoint (corrupt or truncated: "
                                  f"{detail.group(1)[:200] if detail else _first_line(e)})") from None
        if not trust:
            found = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"global ([\w.]+)", str(e))
            culprit = f" ({found.group(1)})" if found else ""
            raise UnsafeCheckpointError(f"{what} holds pickled Python objects{culprit} that could run code when "
                                  f"loaded, so dnfer refuses it; {TRUST_HINT}") from None
    except Exception as e:  # truncated zip, bad magic, ... (torch raises many types)
        raise CheckpointError(f"{what} is not a readable torch checkpoint (corrupt or truncated: "
                              f"{type(e).__name__}: {_first_line(e)})") from None
    try:  # only with --trust-checkpoint: the user's explicit, documented-unsafe opt-in
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{what} is not a readable torch checkpoint (corrupt or truncated: "
                              f"{type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _from_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """A version-1 payload in version 2's layout (numpy arrays -> tensors, resume parts grouped)."""
    raw = to_plain(raw)
    pre = dict(raw.get("preprocessing") or {})
    pre.setdefault("class_names", list(raw.get("class_names") or []))
    parts = ("method", "optimizer", "scheduler", "scaler", "rng", "state", "selection_history")
    resume = {k: raw[k] for k in parts if k in raw} if "optimizer" in raw else None
    out = {"format": FORMAT, "version": 1, "model_name": raw.get("model_name"), "config": raw.get("config"),
           "preprocessing": pre, "model": raw["model"]}
    if resume is not None:
        out["resume"] = resume
    return out


def load_checkpoint(path: str | Path, *, trust: bool = False) -> Checkpoint:
    """Load, verify and type a dnfer checkpoint (CPU tensors).

    Args:
        trust: allow files that need arbitrary unpickling (``--trust-checkpoint``; unsafe).

    Raises:
        CheckpointError: missing, empty, truncated, checksum mismatch, unsafe to load, not a dnfer
            checkpoint, unknown version, non-finite weights — one sentence naming the file.
    """
    path = Path(path)
    what = f"checkpoint {str(path)!r}"
    if not path.is_file():
        raise CheckpointError(f"{what} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} is empty (0 bytes)")
    return checkpoint_from_payload(torch_load_plain(path, trust=trust, what=what), str(path))


def checkpoint_from_payload(raw: Any, source: str) -> Checkpoint:
    """Verify and type a loaded payload (see :func:`load_checkpoint`)."""
    what = f"checkpoint {source!r}"
    if not isinstance(raw, dict) or raw.get("format") != FORMAT or "model" not in raw:
        raise CheckpointError(f"{what} is not a dnfer checkpoint")
    version = raw.get("version", 1)
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{what} has format version {version!r}; this dnfer reads versions "
                              f"{', '.join(map(str, READABLE_VERSIONS))} (a newer dnfer wrote it?)")
    if version >= 2:
        stored = raw.get("sha256")
        if not isinstance(stored, str):
            raise CheckpointError(f"{what} has no checksum (damaged or not written by dnfer)")
        try:
            actual = digest(raw)
        except TypeError as e:
            raise CheckpointError(f"{what} holds data a dnfer checkpoint never holds ({e})") from None
        if actual != stored:
            raise CheckpointError(f"{what} fails its integrity check (sha256 of its contents differs from the "
                                  "one stored in it): the file is damaged")
    else:
        raw = _from_v1(raw)
    try:
        ckpt = _typed(raw, source, version)
    except (KeyError, TypeError, ValueError, PreprocessingError) as e:
        raise CheckpointError(f"{what} is incomplete ({type(e).__name__}: {e})") from None
    bad = next((k for k, v in ckpt.model.items() if not _all_finite(v)), None)
    if bad is not None:
        raise CheckpointError(f"{what} has non-finite weights (tensor {bad!r}); it cannot be used")
    return ckpt


def _typed(raw: dict[str, Any], source: str, version: int) -> Checkpoint:
    model = raw["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise TypeError("'model' is not a dict of tensors")
    config = raw["config"]
    if not isinstance(config, dict):
        raise TypeError("'config' is not a dict")
    pre = Preprocessing.from_dict(raw["preprocessing"], source)
    if not pre.class_names:
        raise ValueError("no class names")
    resume = raw.get("resume")
    return Checkpoint(model_name=str(raw["model_name"]), model=model, preprocessing=pre, config=config,
                      resume=resume if isinstance(resume, dict) else None, path=source, version=version)


# ----------------------------------------------------------------------------- writing


def _payload(obj: Checkpoint | dict[str, Any]) -> dict[str, Any]:
    payload = to_cpu(obj.to_payload() if isinstance(obj, Checkpoint) else to_plain(dict(obj)))
    payload.pop("sha256", None)
    payload["sha256"] = digest(payload)
    return payload


def _write_synced(obj: Checkpoint | dict[str, Any], path: Path) -> Path:
    """Save ``obj`` (with its digest) to a temporary sibling of ``path``, flushed to disk;
    returns the temp path (removed again if the save fails, e.g. disk full)."""
    payload = _payload(obj)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
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


def atomic_save(obj: Checkpoint | dict[str, Any], path: str | Path) -> None:
    """Save a checkpoint (or a plain payload dict) to ``path`` via temp file + fsync + rename."""
    path = Path(path)
    os.replace(_write_synced(obj, path), path)
    _sync_dir(path.parent)


def rotate_and_save(obj: Checkpoint | dict[str, Any], run_dir: Path, name: str = "last.pt") -> Path:
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


def find_resumable(run_dir: Path, log: Callable[[str], Any] = print, *, trust: bool = False) -> Checkpoint | None:
    """The newest usable of ``last.pt`` / ``last.prev.pt`` in ``run_dir`` (None if neither exists).

    A damaged newest file (unreadable, failing its checksum, without resume state) is reported
    through ``log`` and the previous one is used. A file refused as unsafe to load is not
    skipped: that is an error (someone planted it), not damage.
    """
    candidates = [run_dir / "last.pt", run_dir / "last.prev.pt"]
    errors = []
    for path in candidates:
        if not path.exists():
            if path.name == "last.pt" and candidates[1].exists():  # killed between rotate_and_save's renames
                log(f"warning: {path} is missing; trying the previous checkpoint")
            continue
        try:
            ckpt = load_checkpoint(path, trust=trust)
            if ckpt.resume is None:
                raise CheckpointError(f"checkpoint {str(path)!r} holds weights only, no training state to resume")
        except UnsafeCheckpointError:
            raise  # planted, not damaged: never skipped silently
        except CheckpointError as e:
            errors.append(str(e))
            log(f"warning: {e}; trying the previous checkpoint")
            continue
        return ckpt
    if errors:
        raise CheckpointError("no readable checkpoint to resume from: " + "; ".join(errors))
    return None


def remove_previous(run_dir: Path, name: str = "last.pt") -> None:
    """Delete ``<stem>.prev.pt`` (a finished run no longer needs its fallback)."""
    (run_dir / f"{Path(name).stem}.prev.pt").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Every RNG's state as plain data (lists, numbers, uint8 tensors)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`'s states (also version-1 checkpoints' tuples)."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    npst = state["numpy"]
    if isinstance(npst, dict):
        np.random.set_state((npst["name"], np.asarray(npst["keys"], np.uint32), npst["pos"], npst["has_gauss"],
                             npst["cached_gaussian"]))
    else:  # version 1: ("MT19937", keys, pos, has_gauss, cached_gaussian)
        name, keys, *rest = npst
        np.random.set_state((name, np.asarray(keys, np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["Checkpoint", "CheckpointError", "UnsafeCheckpointError", "FORMAT_VERSION", "load_checkpoint", "load_model", "atomic_save",
           "rotate_and_save", "find_resumable", "remove_previous", "rng_state", "set_rng_state", "to_plain",
           "to_numpy", "torch_load_plain", "digest"]
