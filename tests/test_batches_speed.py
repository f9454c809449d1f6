"""Speed options of TrainBatches change nothing but speed: prefetching and the memory format."""

from __future__ import annotations

import numpy as np
import torch

from dnfer.engine.batches import AugmentSettings, TrainBatches

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _batches(images: np.ndarray, **kw) -> TrainBatches:
    labels = np.arange(len(images)) % 3
    return TrainBatches(images, labels, views=("weak", "strong"), batch_size=4, device=torch.device("cpu"),
                        mean=MEAN, std=STD, aug=AugmentSettings(16), seed=3, **kw)


def _epoch(tb: TrainBatches, epoch: int, start: int = 0) -> list:
    return list(tb.epoch(epoch, start))


def test_prefetch_thread_gives_the_same_batches() -> None:
    images = np.random.default_rng(0).integers(0, 256, (18, 16, 16, 3), dtype=np.uint8)
    a, b = _batches(images, prefetch=False), _batches(images, prefetch=True)
    assert a.prefetch is False and b.prefetch is True and len(a) == 4
    for start in (0, 2):
        ea, eb = _epoch(a, 1, start), _epoch(b, 1, start)
        assert len(ea) == len(eb) == 4 - start
        for (va, ya, ia), (vb, yb, ib) in zip(ea, eb, strict=True):
            assert torch.equal(ya, yb) and torch.equal(ia, ib)
            for v in ("weak", "strong"):
                assert torch.equal(va[v], vb[v])
    # a generator closed early (a stopped run) shuts its helper thread down without error
    it = b.epoch(0)
    next(it)
    it.close()


def test_channels_last_changes_layout_not_values() -> None:
    images = np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    plain, cl = _batches(images), _batches(images, channels_last=True)
    for (va, _, _), (vb, _, _) in zip(_epoch(plain, 0), _epoch(cl, 0), strict=True):
        for v in ("weak", "strong"):
            assert vb[v].dtype == torch.float32 and vb[v].is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(va[v], vb[v])
            # hand-computed bounds of (x / 255 - mean) / std per channel
            for c in range(3):
                assert float(va[v][:, c].min()) >= -MEAN[c] / STD[c] - 1e-5
                assert float(va[v][:, c].max()) <= (1 - MEAN[c]) / STD[c] + 1e-5


def test_read_ahead_keeps_order_and_runs_one_item_ahead_in_its_thread() -> None:
    import threading

    from dnfer.engine.batches import read_ahead

    seen: list[tuple[int, str]] = []

    def work(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * i

    assert list(read_ahead(work, range(5), thread=False, name="x")) == [0, 1, 4, 9, 16]
    assert {name for _, name in seen} == {threading.current_thread().name}
    seen.clear()
    it = read_ahead(work, range(5), thread=True, name="dnfer-test")
    assert next(it) == 0
    assert [i for i, _ in seen] == [0, 1] or [i for i, _ in seen] == [0]  # item 1 is under way
    assert list(it) == [1, 4, 9, 16] and [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert all(name.startswith("dnfer-test") for _, name in seen)
    assert list(read_ahead(work, range(0), thread=True, name="x")) == []


def test_predict_probs_reading_ahead_gives_the_same_posteriors() -> None:
    from dnfer.engine.batches import predict_probs
    from dnfer.engine.device import resolve_precision
    from dnfer.models.factory import create_model

    torch.manual_seed(0)
    model = create_model("tiny_cnn", 3, image_size=16).eval()
    images = np.random.default_rng(2).integers(0, 256, (23, 16, 16, 3), dtype=np.uint8)
    cpu = torch.device("cpu")
    kw = dict(batch_size=5, device=cpu, mean=MEAN, std=STD, precision=resolve_precision("fp32", cpu))
    in_line, ahead = predict_probs(model, images, prefetch=False, **kw), predict_probs(model, images, prefetch=True, **kw)
    assert in_line.shape == (23, 3)
    np.testing.assert_array_equal(in_line, ahead)
    np.testing.assert_allclose(in_line.sum(1), 1.0, atol=1e-6)
