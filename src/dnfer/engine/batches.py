"""Mini-batches for training and evaluation from a uint8 image store.

Two augmentation back-ends produce the same views:

- ``batched`` (default): gather a batch of uint8 images, move it to the device, and augment it
  there with per-sample randomness (:class:`dnfer.data.transforms.BatchAugment`). No worker
  processes compete with the model for the CPU's cores; on a GPU the input pipeline is a few
  dozen kernels, prepared one batch ahead by a helper thread on a side CUDA stream.
- ``workers``: torchvision per-sample transforms in DataLoader worker processes (the classic
  pipeline), for CPUs with cores to spare.

The sample order of every epoch is a permutation seeded by (seed, epoch), sharded across DDP
ranks like ``DistributedSampler`` (padded to equal length), and batches are deterministic
functions of (seed, epoch, step), so a run resumed at any step continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dnfer.data.base import ImageArray
from dnfer.data.transforms import BatchAugment, normalize, strong_transform, weak_transform


def epoch_order(n: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's sample order for ``epoch``: a seeded permutation, padded and strided by rank."""
    perm = np.random.default_rng([seed, epoch, 7919]).permutation(n)
    total = -(-n // world_size) * world_size  # ceil to a multiple of world_size
    if total > n:
        perm = np.concatenate([perm, perm[: total - n]])
    return perm[rank::world_size]


def step_seed(seed: int, epoch: int, step: int, rank: int = 0) -> int:
    """Seed of the augmentation RNG of one step (a pure function: resume needs no RNG state)."""
    return int(np.random.default_rng([seed, epoch, step, rank, 104729]).integers(0, 2**62))


def gather_uint8(images: ImageArray, idx: np.ndarray, *, pin: bool = False) -> Tensor:
    """uint8 ``(B, 3, H, W)`` (a channels-last view of ``(B, H, W, 3)`` rows) for rows ``idx``.

    With ``pin`` the rows are read straight into page-locked memory, ready for an asynchronous
    copy to a GPU (a prepared cache reads each row there directly: one copy in all).
    """
    out = torch.empty((len(idx), *images.shape[1:]), dtype=torch.uint8, pin_memory=pin)
    buf = out.numpy()
    read_into = getattr(images, "read_into", None)
    if read_into is not None:
        read_into(idx, buf)
    else:  # a plain or memory-mapped array: read in sorted order (memmaps read faster)
        order = np.argsort(idx, kind="stable")
        buf[order] = images[idx[order]]
    return out.permute(0, 3, 1, 2)


@dataclass
class AugmentSettings:
    image_size: int
    pad: int | None = None
    cutout: int | None = None
    num_ops: int = 2
    magnitude: int = 10


def read_ahead(fn: Callable[[Any], Any], items: Sequence[Any], *, thread: bool, name: str) -> Iterator[Any]:
    """``fn(item)`` for each of ``items``, in order. With ``thread``, a helper thread computes the
    next one while the consumer handles the current (``fn`` must release the GIL for most of its
    time to gain anything: file reads and PyTorch ops do)."""
    if not thread:
        yield from (fn(item) for item in items)
        return
    with ThreadPoolExecutor(1, thread_name_prefix=name) as pool:
        pending = pool.submit(fn, items[0]) if len(items) else None
        for i in range(len(items)):
            ready = pending.result()
            if i + 1 < len(items):
                pending = pool.submit(fn, items[i + 1])
            yield ready


class _WorkerDataset(torch.utils.data.Dataset):
    """Per-sample views for the ``workers`` back-end: ``(views uint8 (V,3,H,W), label, index)``."""

    def __init__(self, images: ImageArray, labels: np.ndarray, views: tuple[str, ...], aug: AugmentSettings) -> None:
        self.images, self.labels, self.views = images, labels, views
        self.tf = {
            "weak": weak_transform(aug.image_size, pad=aug.pad),
            "strong": strong_transform(aug.image_size, pad=aug.pad, num_ops=aug.num_ops,
                                       magnitude=aug.magnitude, cutout=aug.cutout),
        }

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: tuple[int, int]) -> tuple[Tensor, int, int]:
        """``item`` = (row, seed of this sample's augmentation)."""
        i, sample_seed = item
        img = torch.from_numpy(np.ascontiguousarray(self.images[np.array([i])][0])).permute(2, 0, 1)
        # Seeded per sample (torchvision draws from the global RNG): the views do not depend on
        # the worker count or on where in the epoch the loader started (exact mid-epoch resume),
        # and fork_rng leaves the process's RNG (dropout) untouched when workers=0.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            views = torch.stack([self.tf[v](img) for v in self.views])
        return views, int(self.labels[i]), i


class TrainBatches:
    """Yields ``(views: dict[str, Tensor float (B,3,H,W)], labels (B,), index (B,))`` on the device.

    Args:
        images: the training split's uint8 store; labels: int64 ``(N,)`` given labels.
        views: which views the method needs (``weak``, ``strong``).
        backend: ``batched`` or ``workers``.
        prefetch: prepare the next batch in a helper thread (``batched``; None = on
            accelerators only): on CUDA it reads, copies and augments it on a side stream, on
            other accelerators it reads it. The batches are the same either way.
    """

    def __init__(self, images: ImageArray, labels: np.ndarray, *, views: tuple[str, ...], batch_size: int,
                 device: torch.device, mean: tuple[float, ...], std: tuple[float, ...], aug: AugmentSettings,
                 seed: int, backend: str = "batched", workers: int = 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, prefetch: bool | None = None) -> None:
        self.images, self.labels = images, np.asarray(labels, np.int64)
        self.prefetch = device.type != "cpu" if prefetch is None else prefetch
        self.views, self.batch_size, self.device = views, batch_size, device
        self.mean, self.std, self.seed = mean, std, seed
        self.backend, self.workers = backend, workers
        self.rank, self.world_size = rank, world_size
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.aug = aug
        if backend == "batched":
            self.batch_aug = {
                "weak": BatchAugment(aug.image_size, strong=False, pad=aug.pad),
                "strong": BatchAugment(aug.image_size, strong=True, pad=aug.pad, num_ops=aug.num_ops,
                                       magnitude=aug.magnitude, cutout=aug.cutout),
            }
        per_rank = -(-len(self.labels) // world_size)
        # drop_last, as the paper: a tiny last batch would make the batch-mean threshold noisy.
        self.steps_per_epoch = max(per_rank // batch_size, 1 if per_rank else 0)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def _finish(self, views_u8: dict[str, Tensor]) -> dict[str, Tensor]:
        # Change the memory format while the pixels are uint8 (a quarter of the bytes to move);
        # normalize is elementwise, so its float output keeps the format.
        return {v: normalize(x.contiguous(memory_format=self.memory_format), self.mean, self.std)
                for v, x in views_u8.items()}

    def _device_batch(self, x: Tensor, idx: np.ndarray, epoch: int, step: int
                      ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Move host uint8 ``x`` ``(B, 3, H, W)`` to the device and make the normalised views."""
        x = x.to(self.device, non_blocking=True)
        # A CPU generator on every device: draws stay on the host (no device->host sync)
        # and a seed gives the same views on any device.
        gen = torch.Generator().manual_seed(step_seed(self.seed, epoch, step, self.rank))
        views_u8 = {v: self.batch_aug[v](x, generator=gen) for v in self.views}
        labels = torch.from_numpy(self.labels[idx]).to(self.device, non_blocking=True)
        return self._finish(views_u8), labels, torch.from_numpy(idx).to(self.device, non_blocking=True)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[dict[str, Tensor], Tensor, Tensor]]:
        order = epoch_order(len(self.labels), seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size)
        batches = [order[s * self.batch_size:(s + 1) * self.batch_size] for s in range(self.steps_per_epoch)]
        if self.backend == "workers":
            yield from self._worker_epoch(epoch, batches, start_step)
            return
        pin = self.device.type == "cuda"
        # On a GPU a helper thread prepares the next batch while this one trains: it reads the
        # rows into pinned memory, copies them over and augments them on a side CUDA stream.
        # Done in line, batch preparation (host time of ~100 small kernel launches, a 19 MB read
        # at 224 px) would hold up the main thread's launches of the model's step; in the helper
        # it overlaps them (the trainer itself never waits for the GPU within a step). Other
        # accelerators read in the helper and augment in line. On a CPU the read is ~1% of a
        # step and a thread would only compete for the cores.
        side = torch.cuda.Stream(self.device) if self.prefetch and self.device.type == "cuda" else None

        def prepare(step: int) -> tuple[Any, ...]:
            idx = batches[step]
            x = gather_uint8(self.images, idx, pin=pin)
            if side is None:
                return (x, idx)
            with torch.cuda.device(self.device), torch.cuda.stream(side):
                batch = self._device_batch(x, idx, epoch, step)
                return (*batch, side.record_event())

        steps = range(start_step, self.steps_per_epoch)
        for step, ready in zip(steps, read_ahead(prepare, steps, thread=self.prefetch, name="dnfer-batches"),
                               strict=True):
            if side is None:
                yield self._device_batch(*ready, epoch, step)
                continue
            views, labels, index, event = ready
            here = torch.cuda.current_stream(self.device)
            here.wait_event(event)  # the GPU waits for the side stream; the host does not
            for t in (*views.values(), labels, index):
                t.record_stream(here)  # made on the side stream, freed after use here
            yield views, labels, index

    def _worker_epoch(self, epoch: int, batches: list[np.ndarray], start_step: int
                      ) -> Iterator[tuple[dict[str, Tensor], Tensor, Tensor]]:
        ds = _WorkerDataset(self.images, self.labels, self.views, self.aug)
        items = [[(int(i), (step_seed(self.seed, epoch, s, self.rank) + j) % 2**63) for j, i in enumerate(batches[s])]
                 for s in range(start_step, len(batches))]
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=items, num_workers=self.workers,
            pin_memory=self.device.type == "cuda", persistent_workers=False,
        )
        for views, labels, index in loader:
            views = views.to(self.device, non_blocking=True)
            views_u8 = {v: views[:, i] for i, v in enumerate(self.views)}
            yield self._finish(views_u8), labels.to(self.device), index.to(self.device)


@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: ImageArray, *, batch_size: int, device: torch.device,
                  mean: tuple[float, ...], std: tuple[float, ...], precision, channels_last: bool = False,
                  rank: int = 0, world_size: int = 1, prefetch: bool | None = None,
                  progress: str | None = None) -> np.ndarray:
    """Softmax posteriors float32 ``(N, K)`` of ``images`` (this rank's share, gathered across ranks).

    ``prefetch`` (None = on accelerators only) reads the next batch in a helper thread while the
    current one runs, so the device does not idle during reads; the result is the same.
    ``progress``: the label of a progress bar over the images (None: no bar).
    """
    from dnfer.engine.distributed import all_gather_cat

    n = len(images)
    per_rank = -(-n // world_size)
    idx_all = np.arange(per_rank * world_size) % max(n, 1)
    mine = idx_all[rank * per_rank:(rank + 1) * per_rank]  # contiguous shard, padded by wrap-around
    was_training = model.training
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    starts = range(0, len(mine), batch_size)

    def read(s: int) -> Tensor:
        return gather_uint8(images, mine[s:s + batch_size], pin=device.type == "cuda")

    thread = device.type != "cpu" if prefetch is None else prefetch
    from dnfer.progress import progress_bar

    bar = progress_bar(len(mine), progress or "", enabled=progress is not None, unit="img")
    for host in read_ahead(read, starts, thread=thread, name="dnfer-eval"):
        x = normalize(host.to(device, non_blocking=True), mean, std).contiguous(memory_format=fmt)
        with precision.autocast(device):
            logits = model(x)
        out.append(logits.float().softmax(1))
        bar.update(len(host))
    bar.close()
    model.train(was_training)
    probs = torch.cat(out) if out else torch.zeros(0, 1, device=device)
    probs = all_gather_cat(probs)
    return probs[:n].cpu().numpy()
