"""DDP under torchrun: process-group setup and the all-reduce used by DNFER's thresholds.

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``; without them everything here is a
single-process no-op. The backend is gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """Read torchrun's environment (single process when absent)."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), ws)


def init_distributed(info: DistInfo, device: torch.device) -> bool:
    """Initialise the default process group once; True if this call created it (and should
    destroy it). No-op for one process or when the caller already made a group."""
    if not info.enabled or dist.is_initialized():
        return False
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        from dnfer.errors import ConfigError

        raise ConfigError(f"WORLD_SIZE={info.world_size} is set but {', '.join(missing)} is not: "
                          "launch with torchrun (see docs/distributed.md) rather than setting RANK/WORLD_SIZE by hand")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return True


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over processes (a new tensor; identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate equal-shaped ``t`` from all ranks along dim 0 (identity without a group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def gather_objects(obj: object) -> list[object]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` without a group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average ``.grad`` of parameters that live outside DDP (method-owned heads, peers).

    One flat all-reduce; a missing gradient counts as zeros so every rank joins the same
    collective whatever its batch did (a rank skipping it would hang the others).
    """
    if not params or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def broadcast_state(module: torch.nn.Module, *, buffers_only: bool = False, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers into every rank's ``module``.

    Used for what DDP does not keep in sync: method-owned modules (seeded per rank) and the
    model's BatchNorm running statistics (each rank updates them from its own shard).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    tensors = list(module.buffers()) + ([] if buffers_only else list(module.parameters()))
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=src)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
