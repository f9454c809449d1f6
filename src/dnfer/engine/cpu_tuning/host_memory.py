"""Keep freed host memory in the process, so a CPU training step stops page-faulting.

Why: glibc's ``malloc`` serves every block above its mmap threshold (which adapts, but never
above 32 MiB) with a fresh ``mmap`` and hands it back with ``munmap`` on ``free``. A CPU training
step allocates and frees the same large activations every step (ResNet-18 at 112 px, 256 views:
tensors of 25-100 MiB), so each step maps them in again: the kernel takes one minor page fault
per 4 KiB page and zero-fills it. Measured on the 2-core development machine: 140,000-250,000
faults per step with glibc's behaviour, a few hundred to a few thousand with the heap kept, and
1.10x faster steps (``benchmarks/host_memory.py``; docs/performance.md, "Host memory").

The fix is two ``mallopt`` settings that PyTorch's CPU tuning guide reaches with jemalloc or
tcmalloc through ``LD_PRELOAD``: serve large blocks from the heap (``M_MMAP_MAX = 0``) and do
not give freed heap memory back to the kernel (``M_TRIM_THRESHOLD`` 1 GiB). Calling glibc's own
``mallopt`` needs no extra library and no re-executed process; where the C library is not glibc
(macOS, musl, Windows) nothing changes. The cost is memory: the process keeps its peak heap
until ``release_freed_memory`` (peak RSS 5-11% higher in ``benchmarks/train_memory.py``, 27% in
a bare ResNet-18 step loop at 256 views).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

#: Freed heap memory above this stays with the process instead of going back to the kernel.
RETAINED_TRIM_THRESHOLD = 1 << 30

#: glibc's defaults, restored by ``system_malloc``: 65,536 mmapped blocks at most, and the
#: threshold values glibc's adaptive rule reaches once a 32 MiB block has been freed (setting any
#: of them turns that rule off, so "the defaults" means its steady state in a training loop).
SYSTEM_MMAP_MAX = 65536
SYSTEM_MMAP_THRESHOLD = 32 << 20
SYSTEM_TRIM_THRESHOLD = 64 << 20

MALLOC_SETTINGS = ("auto", "system")

#: Whether this process's heap was last set by :func:`retain_freed_memory` (True) or is glibc's
#: own / was set back by :func:`system_malloc` (False). glibc has no call that reads mallopt
#: settings back, so this is how :func:`dnfer.engine.cpu_tuning.apply` knows what to restore.
_retaining = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is something else."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has this symbol (musl does not)
    except (OSError, AttributeError):
        return None
    return libc


def _set(libc: ctypes.CDLL, param: int, value: int) -> None:
    if libc.mallopt(param, value) != 1:  # mallopt returns 1 on success
        raise OSError(f"mallopt({param}, {value}) was refused by glibc")


def retain_freed_memory() -> bool:
    """Make large allocations come from the heap and keep freed memory in the process.

    Process-wide and lasting, like ``torch.set_num_threads`` (``fit`` undoes it when it ends).
    Returns True where it was applied (glibc), False where the C library is not glibc (nothing
    changes there).
    """
    global _retaining
    libc = _glibc()
    if libc is None:
        return False
    _set(libc, M_MMAP_MAX, 0)
    _set(libc, M_TRIM_THRESHOLD, RETAINED_TRIM_THRESHOLD)
    _retaining = True
    return True


def system_malloc() -> bool:
    """Undo ``retain_freed_memory``: large blocks are mmapped again and freed memory returned.

    glibc's adaptive thresholds cannot be switched back on once set, so this sets the values they
    settle at in a loop that frees 32 MiB blocks (mmap above 32 MiB, trim above 64 MiB), then
    returns what the heap holds. Returns False where the C library is not glibc.
    """
    global _retaining
    libc = _glibc()
    if libc is None:
        return False
    _retaining = False
    _set(libc, M_MMAP_MAX, SYSTEM_MMAP_MAX)
    _set(libc, M_MMAP_THRESHOLD, SYSTEM_MMAP_THRESHOLD)
    _set(libc, M_TRIM_THRESHOLD, SYSTEM_TRIM_THRESHOLD)
    libc.malloc_trim(0)
    return True


def retaining_freed_memory() -> bool:
    """True while :func:`retain_freed_memory` is in effect (set by it, not undone since)."""
    return _retaining


def release_freed_memory() -> None:
    """Give the freed part of the heap back to the kernel (e.g. when training has ended)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def wants_retained_memory(setting: str, device_type: str) -> bool:
    """The trainer's rule: ``auto`` keeps freed memory when the model runs on the CPU (on an
    accelerator the large tensors live in device memory, whose allocator already caches)."""
    if setting not in MALLOC_SETTINGS:
        raise ValueError(f"malloc setting must be one of {', '.join(MALLOC_SETTINGS)}, got {setting!r}")
    return setting == "auto" and device_type == "cpu"
