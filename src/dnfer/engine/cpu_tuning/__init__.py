"""The trainer's CPU tuning in one place: :func:`apply` sets it up for a run and returns its undo.

Three settings, each measured on the development CPU (docs/performance.md):

- ``train.threads``: torch's intra-op thread count (process-wide).
- ``train.malloc`` (:mod:`.host_memory`): on a CPU, freed heap memory stays in the process so a
  training step stops page-faulting its activations in again (process-wide).
- ``train.small_map_conv`` (:mod:`.small_map_conv`): bf16 CPU convolutions on small output maps
  run on a mosaic of the batch (per model: the run's own modules are changed in place).

The undo puts back what :func:`apply` changed in the process (thread count, allocator), so that
``fit`` called twice, or between a library user's own code, leaves the process as it found it.
The convolution swap is not undone: it belongs to the run's model, which nothing outside the run
holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dnfer.engine.cpu_tuning.host_memory import (
    release_freed_memory,
    retain_freed_memory,
    retaining_freed_memory,
    system_malloc,
    wants_retained_memory,
)
from dnfer.engine.cpu_tuning.small_map_conv import use_small_map_conv, wants_small_map_conv
from dnfer.engine.device import Precision


def apply(*, threads: int | None, malloc: str, small_map_conv: str, device: torch.device, precision: Precision,
          compiled: bool, modules: Sequence[nn.Module] = ()) -> Callable[[], None]:
    """Apply the run's CPU settings; returns the callable that restores the process-wide ones.

    Args:
        threads: torch intra-op threads (``train.threads``); None leaves the count alone.
        malloc: ``train.malloc`` (``auto`` keeps freed memory in the process when training on a
            CPU, ``system`` leaves the C library's behaviour).
        small_map_conv: ``train.small_map_conv`` (``auto``: mosaic convolutions under bf16 on a
            CPU, not compiled; ``native``: PyTorch's).
        device, precision, compiled: where and how the run trains (the rules above depend on them).
        modules: the networks the run trains (the model, and any the method owns, such as
            co-teaching's peer), whose eligible convolutions are swapped in place.
    Returns:
        ``undo()``: sets the thread count back, and the allocator back to what it was (when it
        was glibc's own, the heap's freed memory is returned too; when it was already kept in
        the process, only the run's peak is given back). Call it once.
    """
    undos: list[Callable[[], None]] = []
    if threads:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        undos.append(lambda: torch.set_num_threads(before))
    if wants_retained_memory(malloc, device.type):
        was_retaining = retaining_freed_memory()
        if retain_freed_memory():
            # Kept already (a caller's choice): give this run's peak back but keep the setting.
            undos.append(release_freed_memory if was_retaining else system_malloc)
    if wants_small_map_conv(small_map_conv, device, precision, compiled=compiled):
        use_small_map_conv(*modules)

    def undo() -> None:
        for step in reversed(undos):
            step()

    return undo


__all__ = ["apply"]
