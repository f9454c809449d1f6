"""The one place that chooses the device and numeric precision. Nothing else calls ``.cuda()``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dnfer.errors import ConfigError


def resolve_device(name: str, *, local_rank: int | None = None) -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an unavailable explicit choice is an error."""
    base = name.split(":")[0]
    if base == "auto":
        if torch.cuda.is_available():
            base = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            base = "mps"
        else:
            base = "cpu"
    if base == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu or auto")
        if ":" in name:
            return torch.device(name)
        return torch.device("cuda", local_rank if local_rank is not None else torch.cuda.current_device())
    if base == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise ConfigError("--device mps: MPS is not available here; use --device cpu or auto")
        return torch.device("mps")
    if base == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"--device {name!r}: valid devices are auto, cpu, cuda, cuda:N, mps")


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 (AVX-512 BF16 or AMX): autocast is then 2-3x faster.

    oneDNN also "supports" bf16 on plain AVX-512 by emulation, which is slower than fp32, so we
    read the CPU flags rather than asking oneDNN.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Precision:
    """Autocast settings: ``dtype`` None means fp32 (no autocast)."""

    name: str
    dtype: torch.dtype | None
    use_grad_scaler: bool

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto``: bf16 on CUDA GPUs that support it (else fp16 + grad scaling), bf16 on CPUs with
    native bf16, fp32 otherwise (including MPS)."""
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        elif device.type == "cpu":
            name = "bf16" if cpu_supports_bf16() else "fp32"
        else:
            name = "fp32"
    if name == "fp32":
        return Precision("fp32", None, False)
    if name == "bf16":
        return Precision("bf16", torch.bfloat16, False)
    if name == "fp16":
        if device.type == "cpu":
            raise ConfigError("--precision fp16 needs a GPU; on CPU use bf16 or fp32")
        return Precision("fp16", torch.float16, device.type == "cuda")
    raise ConfigError(f"--precision {name!r}: valid are auto, bf16, fp16, fp32")


def default_channels_last(device: torch.device) -> bool:
    """Automatic memory format: channels_last on CUDA and CPU, at every input size.

    Measured on the 2-core CPU (bf16, one thread, forward+backward+Adam; docs/performance.md):
    1.07-1.18x for ResNet-18 at 32-64 px and 1.6x for resnet10_slim, mostly because max-pool in
    NCHW is about 8x slower than in channels_last. MPS keeps NCHW (not measured there).
    """
    return device.type in ("cuda", "cpu")
