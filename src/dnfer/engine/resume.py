"""``--resume``: the check that a checkpoint continues this run, and loading its training state.

What may change between a run and its resume is listed in :data:`RESUME_MUTABLE`; everything
else must match (named in one error line). The model, method, optimiser, scheduler, grad scaler
and per-rank RNG are loaded here; the loop's own progress (``state``, selection history, metrics
log) is restored by the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from dnfer.config import comparable_config
from dnfer.engine.checkpoint import Checkpoint, set_rng_state
from dnfer.errors import ConfigError

#: Config keys that may differ between a run and its ``--resume`` (everything else must match).
#: Besides bookkeeping, the NaN-recovery knobs (nan_policy, grad_clip) may change: "stopped on a
#: NaN, resume with --nan-policy skip / --grad-clip" is the intended workflow.
RESUME_MUTABLE = {"train.epochs", "train.progress", "train.device", "train.tensorboard", "out",
                  "train.nan_policy", "optim.grad_clip", "train.save_every_steps", "train.eval_batch_size",
                  "train.threads", "data.cache", "train.small_map_conv",
                  "train.malloc", "train.keep_checkpoints"}


def check_resume_compatible(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> None:
    """Raise ConfigError naming the first setting that differs from the checkpoint's run."""
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if name in RESUME_MUTABLE:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and name not in ("data.options", "method.params"):
            check_resume_compatible(a, b, f"{name}.")
        elif a != b:
            raise ConfigError(
                f"--resume: setting {name} is {b!r} now but {a!r} in the checkpoint; "
                "resume with the original settings or start a new --out directory"
            )


def restore_training(ckpt: Checkpoint, current_config: dict[str, Any], *, world_size: int, rank: int,
                     batch_size: int, model: nn.Module, method: nn.Module, optimizer: Any, scheduler: Any,
                     scaler: Any, say: Callable[[str], None]) -> dict[str, Any]:
    """Check that ``ckpt`` resumes this run, load its training state; returns its resume record.

    Raises:
        ConfigError: a setting outside :data:`RESUME_MUTABLE` differs, or a mid-epoch checkpoint
            was written by another number of processes (the epoch's sample order depends on it).
    """
    check_resume_compatible(comparable_config(ckpt.config), comparable_config(current_config))
    saved = ckpt.resume
    assert saved is not None  # find_resumable returns resumable checkpoints only
    saved_ws = saved["state"].get("world_size", 1)
    if saved["state"]["step"] > 0 and saved_ws != world_size:
        raise ConfigError(f"--resume: {ckpt.path} was written mid-epoch by {saved_ws} process(es) but "
                          f"{world_size} run now; resume with {saved_ws} (the epoch's sample order depends on it)")
    if saved_ws != world_size:
        say(f"note: resuming {saved_ws}-process training with {world_size}: the global batch is now "
            f"{world_size} x {batch_size}")
    model.load_state_dict(ckpt.model)
    method.load_state_dict(saved["method"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
    if rank < len(rngs):  # per-rank RNG (dropout); a new rank keeps its fresh seed
        set_rng_state(rngs[rank])
    return saved
