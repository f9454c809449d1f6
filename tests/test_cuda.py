"""The CUDA paths: batched augmentation, input pipeline, training, resume, fp16, compile, prediction.

Skipped on a machine without a CUDA GPU (CI, the 2-core development machine); run on a CUDA GPU
by ``benchmarks/gpu_check.sh`` (``python -m pytest -m cuda``). Each test compares the GPU with the
CPU implementation or with itself, so it checks properties, not numbers from one card.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tests.conftest import tiny_config

from dnfer.data.transforms import OPS, BatchAugment
from dnfer.engine.batches import AugmentSettings, TrainBatches, predict_probs
from dnfer.engine.checkpoint import load_checkpoint
from dnfer.engine.device import resolve_precision
from dnfer.engine.trainer import fit
from dnfer.models.factory import create_model

# Deterministic cuBLAS must be chosen before the first cuBLAS call of the process (`dnfer train`
# sets it in seed_everything; here earlier tests reach cuBLAS first).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by benchmarks/gpu_check.sh)"),
]
CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def _smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """uint8 ``(n, 3, size, size)`` with texture at several scales (geometric ops move real edges)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (n, 3, size // 4, size // 4), generator=g).float()
    up = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    fine = torch.randint(-20, 21, (n, 3, size, size), generator=g).float()
    return (up + fine).clamp(0, 255).to(torch.uint8)


def _all_ops_params(aug: BatchAugment, n: int, seed: int):
    """Draws where slot 0 cycles through every op (so each runs on a sub-batch) and both slots apply."""
    p = aug.sample_params(n, torch.Generator().manual_seed(seed))
    p.ops[:, 0] = torch.arange(n) % len(OPS)
    p.apply[:] = True
    return p


@pytest.mark.parametrize("strong", [False, True])
def test_batch_augment_same_draws_give_the_same_views_on_gpu_and_cpu(strong: bool) -> None:
    size, n = 32, 4 * len(OPS)
    aug = BatchAugment(size, strong=strong)
    x = _smooth_images(n, size)
    p = _all_ops_params(aug, n, seed=1) if strong else aug.sample_params(n, torch.Generator().manual_seed(1))
    on_cpu = aug.apply(x.clone(), p)
    on_gpu = aug.apply(x.to(CUDA), p)
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8 and on_gpu.shape == x.shape
    diff = (on_gpu.cpu().int() - on_cpu.int()).abs()
    if not strong:  # crop + flip are pure copies: bit-identical
        assert torch.equal(on_gpu.cpu(), on_cpu)
    else:
        # float ops (grid_sample, blends, the sharpness kernel) may round a pixel the other way
        assert diff.max() <= 2, [OPS[int(o)] for o in p.ops[diff.flatten(1).amax(1) > 2, 0]]
        assert diff.float().mean() < 0.05
    assert not torch.equal(on_cpu, x)  # the views really changed the images


def test_batch_augment_same_seed_same_views_and_per_image_randomness_on_gpu() -> None:
    aug = BatchAugment(32, strong=True)
    x = _smooth_images(64, 32).to(CUDA)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # each image draws its own ops: identical inputs give different outputs across the batch
    same = aug(x[:1].expand(64, -1, -1, -1).contiguous(), torch.Generator().manual_seed(7))
    assert len({bytes(img.cpu().numpy().tobytes()) for img in same}) > 32


@pytest.mark.parametrize("channels_last", [False, True])
def test_train_batches_on_gpu_match_the_cpu_batches(channels_last: bool) -> None:
    rng = np.random.default_rng(0)
    images = _smooth_images(70, 24).permute(0, 2, 3, 1).contiguous().numpy()  # the cache's (N, H, W, 3)
    labels = rng.integers(0, 7, 70)
    kw = dict(views=("weak", "strong"), batch_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
              aug=AugmentSettings(24), seed=3, channels_last=channels_last)
    gpu = TrainBatches(images, labels, device=CUDA, **kw)
    cpu = TrainBatches(images, labels, device=CPU, **kw)
    assert gpu.prefetch and not cpu.prefetch  # the GPU reads the next batch in a helper thread
    n_steps = 0
    for (gv, gl, gi), (cv, cl, ci) in zip(gpu.epoch(1), cpu.epoch(1), strict=True):
        n_steps += 1
        assert torch.equal(gl.cpu(), cl) and torch.equal(gi.cpu(), ci)
        assert torch.equal(gl.cpu(), torch.from_numpy(labels[ci.numpy()]))
        for view in ("weak", "strong"):
            g = gv[view]
            assert g.device.type == "cuda" and g.dtype == torch.float32 and g.shape == (16, 3, 24, 24)
            assert g.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            # the same uint8 pixels up to a rounding step of the float ops, then normalised
            err = (g.cpu() - cv[view]).abs()
            assert err.max() <= 2.01 / (255 * 0.25) and err.mean() < 0.05 / (255 * 0.25)
        assert torch.equal(gv["weak"].cpu(), cv["weak"])  # crop + flip + normalise: exact
    assert n_steps == 70 // 16


def test_side_stream_prefetch_gives_the_same_batches_as_preparing_in_line() -> None:
    images = _smooth_images(90, 32).permute(0, 2, 3, 1).contiguous().numpy()
    labels = np.random.default_rng(2).integers(0, 7, 90)
    kw = dict(views=("weak", "strong"), batch_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
              aug=AugmentSettings(32), seed=4, channels_last=True, device=CUDA)
    ahead = TrainBatches(images, labels, prefetch=True, **kw)  # helper thread + side CUDA stream
    inline = TrainBatches(images, labels, prefetch=False, **kw)
    # clone on the consumer's stream the moment a batch arrives: without the stream wait the
    # clone could read views the side stream has not finished writing
    got = [({v: t.clone() for v, t in views.items()}, y.clone(), i.clone())
           for views, y, i in ahead.epoch(2, start_step=1)]
    want = list(inline.epoch(2, start_step=1))
    assert len(got) == len(want) == 90 // 16 - 1
    for (gv, gl, gi), (wv, wl, wi) in zip(got, want, strict=True):
        assert torch.equal(gl, wl) and torch.equal(gi, wi)
        for view in ("weak", "strong"):
            assert torch.equal(gv[view], wv[view])


def _weights(run) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "last.pt").model


def test_fit_on_gpu_bf16_is_reproducible_and_resumes_exactly(tmp_path) -> None:
    def cfg(name: str, epochs: int):
        c = tiny_config(str(tmp_path / name), epochs=epochs, device="cuda", precision="bf16")
        c.model.name = "resnet10_slim"  # real convolution/BN/pool layers at 32 px
        c.data.image_size = 32
        return c

    s1 = fit(cfg("a", 3), log=lambda m: None)
    assert s1["device"].startswith("cuda") and s1["precision"] == "bf16" and s1["skipped_steps"] == 0
    assert all(np.isfinite(json.loads(ln)["train_loss"]) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
    s2 = fit(cfg("b", 3), log=lambda m: None)
    fit(cfg("c", 2), log=lambda m: None)
    s3 = fit(cfg("c", 3), log=lambda m: None, resume=True)
    wa, wb, wc = _weights(tmp_path / "a"), _weights(tmp_path / "b"), _weights(tmp_path / "c")
    # train.deterministic (the default): the same seed gives the same weights, and a resumed run
    # continues exactly (RNG, optimizer, scheduler and BN statistics all restored)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"two runs differ in {name}"
        assert torch.equal(wa[name], wc[name]), f"resumed run differs in {name}"
    for key in ("final_test_acc", "best_val_test_acc", "selection_precision", "selection_recall"):
        assert s1[key] == s2[key] == s3[key], key


def test_fit_on_gpu_fp16_uses_the_grad_scaler(tmp_path) -> None:
    c = tiny_config(str(tmp_path / "fp16"), epochs=2, device="cuda", precision="fp16")
    s = fit(c, log=lambda m: None)
    assert s["precision"] == "fp16" and 0.0 <= s["final_test_acc"] <= 1.0
    ckpt = load_checkpoint(tmp_path / "fp16" / "last.pt")
    scale = ckpt.resume["scaler"].get("scale")
    assert scale is not None and float(scale) > 0  # the scaler was enabled and is checkpointed
    assert all(torch.isfinite(v.float()).all() for v in ckpt.model.values())


def test_predict_probs_on_gpu_matches_cpu() -> None:
    torch.manual_seed(0)
    model = create_model("resnet10_slim", 7, image_size=32).eval()
    images = _smooth_images(40, 32).permute(0, 2, 3, 1).contiguous().numpy()
    kw = dict(batch_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    on_cpu = predict_probs(model, images, device=CPU, precision=resolve_precision("fp32", CPU), **kw)
    model.to(CUDA)
    fp32 = predict_probs(model, images, device=CUDA, precision=resolve_precision("fp32", CUDA), **kw)
    bf16 = predict_probs(model, images, device=CUDA, precision=resolve_precision("bf16", CUDA),
                         channels_last=True, **kw)
    assert fp32.shape == bf16.shape == (40, 7)
    np.testing.assert_allclose(fp32.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(fp32, on_cpu, atol=5e-3)  # cuDNN may use TF32 for fp32 convolutions
    np.testing.assert_allclose(bf16, on_cpu, atol=5e-2)


def test_compile_on_gpu_trains_and_checkpoints_the_plain_model(tmp_path) -> None:
    c = tiny_config(str(tmp_path / "compiled"), epochs=1, device="cuda", precision="bf16", compile=True)
    s = fit(c, log=lambda m: None)
    assert s["epochs"] == 1 and np.isfinite(s["final_test_acc"])
    weights = _weights(tmp_path / "compiled")
    assert not any(k.startswith("_orig_mod") for k in weights)  # loadable without torch.compile
    model = create_model("tiny_cnn", 7, image_size=16)
    model.load_state_dict(weights)


def test_cli_train_eval_on_gpu(tmp_path) -> None:
    out = tmp_path / "cli"
    train = [sys.executable, "-m", "dnfer", "train", "--model", "resnet10_slim", "--image-size", "32",
             "--data-option", "n_train=96", "--data-option", "n_test=32", "--batch-size", "16", "--epochs", "2",
             "--warmup-epochs", "1", "--device", "cuda", "--no-progress", "--out", str(out)]
    res = subprocess.run(train, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["precision"] == "bf16"  # auto on a bf16 GPU
    ev = subprocess.run([sys.executable, "-m", "dnfer", "eval", "--checkpoint", str(out / "best.pt"), "--device",
                         "cuda", "--json"], capture_output=True, text=True, timeout=240)
    assert ev.returncode == 0, ev.stderr[-3000:]
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    # the same checkpoint on the same test split: the accuracy the trainer logged for that epoch
    assert result["n_test"] == 32 and abs(result["test_acc"] - summary["best_val_test_acc"]) <= 1 / 32


def test_step_results_queue_their_copy_without_a_sync_and_match_the_cpu() -> None:
    """The trainer's per-step bookkeeping on the GPU only queues work (no host<->device sync,
    checked by PyTorch's sync-debug mode), and what it adds to the stats equals the CPU's."""
    from dnfer.engine.records import EpochStats
    from dnfer.engine.step import StepResults
    from dnfer.methods.base import StepResult

    g = torch.Generator().manual_seed(0)
    logits, selected = torch.randn(64, 7, generator=g) * 3, torch.rand(64, 2, generator=g) < 0.5
    thresholds, labels = torch.rand(7, generator=g), torch.randint(0, 7, (64,), generator=g)
    index = torch.randperm(100, generator=g)[:64]

    def run(device: torch.device) -> EpochStats:
        out = StepResult(loss=torch.zeros((), device=device), logits=logits.to(device),
                         selected=selected.to(device), stats={"threshold/weak": thresholds.to(device)})
        lab, idx, loss = labels.to(device), index.to(device), torch.tensor(3.0, device=device)
        stats = EpochStats(selected=np.full((100, 2), -1, np.int8), probs=np.zeros((100, 7), np.float16))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if device.type == "cuda" else 0)
        try:
            pending = StepResults.start(out, lab, idx, torch.stack([loss, torch.zeros_like(loss)]),
                                         torch.zeros((), dtype=torch.bool, device=device))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        pending.add_to(stats, world_size=1)
        return stats

    on_cpu, on_gpu = run(CPU), run(CUDA)
    assert (on_gpu.loss_sum, on_gpu.seen, on_gpu.correct) == (on_cpu.loss_sum, on_cpu.seen, on_cpu.correct)
    np.testing.assert_array_equal(on_gpu.selected, on_cpu.selected)
    np.testing.assert_array_equal(on_gpu.threshold_sums["weak"], on_cpu.threshold_sums["weak"])
    np.testing.assert_allclose(on_gpu.probs.astype(np.float32), on_cpu.probs.astype(np.float32), atol=1e-3)


def test_training_steps_make_no_host_device_sync_on_the_main_thread(tmp_path, monkeypatch) -> None:
    """The trainer's step loop never makes the host wait for the GPU (bf16): the syncs PyTorch's
    sync-debug mode reports on the main thread are per-epoch work only (evaluation, checkpoints),
    so an epoch of 12 steps makes no more than one of 6. The batch helper thread is left out
    (``benchmarks/batch_pipeline.py`` counts its syncs per batch)."""
    import threading
    import warnings

    def main_thread_syncs(n_train: int, name: str) -> int:
        cfg = tiny_config(str(tmp_path / name), epochs=1, device="cuda", precision="bf16")
        cfg.data.options = {"n_train": str(n_train), "n_test": "32"}
        cfg.data.val_fraction = 0.0
        threads: list[str] = []

        def record(*args, **kwargs) -> None:  # runs in the thread that synchronised
            threads.append(threading.current_thread().name)

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            monkeypatch.setattr(warnings, "showwarning", record)
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fit(cfg, log=lambda m: None)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return sum(1 for t in threads if not t.startswith("dnfer-batches"))

    main_thread_syncs(96, "warm-up")  # one-off initialisation is not per step
    six, twelve = main_thread_syncs(96, "six-steps"), main_thread_syncs(192, "twelve-steps")
    assert twelve - six <= 2, f"{six} syncs in an epoch of 6 steps, {twelve} in one of 12: some are per step"
