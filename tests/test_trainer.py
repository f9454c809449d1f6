"""End-to-end training on tiny settings: files, summary contract, exact resume, CE baseline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from tests.conftest import tiny_config

from dnfer.config import Config
from dnfer.engine.checkpoint import load_checkpoint
from dnfer.engine.trainer import fit

SUMMARY_KEYS = {
    "method", "noise", "epochs", "final_test_acc", "best_val_epoch", "best_val_test_acc",
    "selection_precision", "selection_recall", "train_seconds", "images_per_second",
}


def test_fit_writes_run_directory_contract(tiny_cfg: Config, tmp_path) -> None:
    summary = fit(tiny_cfg, log=lambda m: None)
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "last.pt", "best.pt", "train_dynamics.npz"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*.tmp*"))  # atomic writes leave no temporary files behind
    assert SUMMARY_KEYS <= set(summary)
    assert json.loads((run / "summary.json").read_text())["method"] == "dnfer_plus"  # the default method
    for key in ("final_test_acc", "best_val_test_acc", "selection_precision", "selection_recall"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["epochs"] == 2 and 1 <= summary["best_val_epoch"] <= 2
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    k = 7
    assert len(lines[-1]["threshold_weak"]) == k and len(lines[-1]["threshold_strong"]) == k
    assert np.array(lines[-1]["test_confusion"]).sum() == 32
    # thresholds are class means of posteriors: each in [0, 1], and they sum to 1 per step
    assert abs(sum(lines[-1]["threshold_weak"]) - 1.0) < 1e-3
    saved = Config.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    assert saved.data.image_size == 16 and saved.method.name == "dnfer_plus"
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt.class_names[3] == "happiness" and ckpt.preprocessing.input_size == (3, 16, 16)
    dyn = np.load(run / "train_dynamics.npz")
    assert dyn["selection_history"].shape[:2] == (2, len(dyn["given_labels"]))
    assert set(np.unique(dyn["selection_history"])) <= {-1, 0, 1}


def test_realised_noise_and_selection_metrics_against_truth(tiny_cfg: Config) -> None:
    summary = fit(tiny_cfg, log=lambda m: None)
    assert 0.15 < summary["noise_realised_rate"] < 0.45  # 30% nominal on ~96 samples


def test_resume_continues_exactly(tmp_path) -> None:
    straight = tiny_config(str(tmp_path / "straight"), epochs=3)
    s1 = fit(straight, log=lambda m: None)
    part = tiny_config(str(tmp_path / "resumed"), epochs=2)
    fit(part, log=lambda m: None)
    part3 = tiny_config(str(tmp_path / "resumed"), epochs=3)
    s2 = fit(part3, log=lambda m: None, resume=True)
    for key in ("final_test_acc", "best_val_test_acc", "selection_precision", "selection_recall", "best_val_epoch"):
        assert s1[key] == s2[key], key
    w1 = load_checkpoint(tmp_path / "straight" / "last.pt").model
    w2 = load_checkpoint(tmp_path / "resumed" / "last.pt").model
    for name in w1:
        assert torch.equal(w1[name], w2[name]), name
    m1 = (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    m2 = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    strip = lambda r: {k: v for k, v in json.loads(r).items() if "second" not in k}  # noqa: E731
    assert [strip(r) for r in m1] == [strip(r) for r in m2]


def test_resume_refuses_changed_settings(tmp_path) -> None:
    from dnfer.errors import ConfigError

    fit(tiny_config(str(tmp_path / "r"), epochs=1), log=lambda m: None)
    changed = tiny_config(str(tmp_path / "r"), epochs=2)
    changed.method.params["alpha"] = 0.9
    with pytest.raises(ConfigError, match="method.params"):
        fit(changed, log=lambda m: None, resume=True)


def test_ce_baseline_runs_on_same_pipeline(tiny_cfg: Config) -> None:
    tiny_cfg.method.name, tiny_cfg.method.params = "ce", {}
    summary = fit(tiny_cfg, log=lambda m: None)
    assert summary["method"] == "ce" and summary["selection_precision"] is None
    assert 0.0 <= summary["final_test_acc"] <= 1.0


@pytest.mark.slow
def test_compile_trains_and_checkpoints_plain_weights(tmp_path) -> None:
    # `--compile` wraps the model in torch.compile (inductor, C++ on a CPU); the checkpoint must
    # still hold the plain module's weights so eval/predict/export load it without compiling.
    cfg = tiny_config(str(tmp_path / "compiled"), epochs=1, compile=True)
    summary = fit(cfg, log=lambda m: None)
    assert summary["epochs"] == 1 and 0.0 <= summary["final_test_acc"] <= 1.0
    weights = load_checkpoint(tmp_path / "compiled" / "last.pt").model
    assert weights and not any("_orig_mod" in k for k in weights)
    from dnfer.models.factory import create_model

    model = create_model("tiny_cnn", 7, image_size=16)
    model.load_state_dict(weights)  # strict: every key matches the uncompiled module
    assert all(torch.isfinite(v.float()).all() for v in weights.values())


def _step_result(seed: int, rows: list[int], k: int = 4):
    from dnfer.methods.base import StepResult

    g = torch.Generator().manual_seed(seed)
    b = len(rows)
    logits = torch.randn(b, k, generator=g) * 3
    selected = torch.rand(b, 2, generator=g) < 0.5
    stats = {"threshold/weak": torch.rand(k, generator=g), "threshold/strong": torch.rand(k, generator=g),
             "other": torch.tensor(1.5)}
    labels = torch.randint(0, k, (b,), generator=g)
    index = torch.tensor(rows)
    return StepResult(loss=torch.tensor(0.0), logits=logits, selected=selected, stats=stats), labels, index


def test_step_results_add_what_each_step_produced() -> None:
    """The per-step results the trainer reads a step late: every field lands where reading the
    step's tensors at once would put it (counts, rows, float16 posteriors, threshold sums)."""
    from dnfer.engine.records import EpochStats
    from dnfer.engine.step import StepResults

    n, k = 20, 4
    stats = EpochStats(selected=np.full((n, 2), -1, np.int8), probs=np.zeros((n, k), np.float16))
    steps = [_step_result(1, [7, 2, 11, 0, 5, 3]), _step_result(2, [12, 13, 1, 19, 4, 6]),
             _step_result(3, [2, 8])]  # the last step writes row 2 again: the later write wins
    losses = [torch.tensor(1.25), torch.tensor(0.5), torch.tensor(0.75)]
    for (out, labels, index), loss in zip(steps, losses, strict=True):
        StepResults.start(out, labels, index, torch.stack([loss, torch.tensor(0.0)]), torch.tensor(False)
                           ).add_to(stats, world_size=2)
    assert stats.loss_sum == (1.25 + 0.5 + 0.75) / 2  # the global batch's summed loss over the world size
    assert stats.seen == 14
    assert stats.correct == sum(int((o.logits.argmax(1) == lab).sum()) for o, lab, _ in steps)
    for out, _, index in steps:  # applied in order, so each row holds its last writer's values
        for j, row in enumerate(index.tolist()):
            last = max(i for i, (_, _, ix) in enumerate(steps) if row in ix.tolist())
            if steps[last][0] is out:
                np.testing.assert_array_equal(stats.probs[row], out.logits[j].softmax(0).numpy().astype(np.float16))
                np.testing.assert_array_equal(stats.selected[row], out.selected[j].numpy().astype(np.int8))
    untouched = np.setdiff1d(np.arange(n), np.concatenate([i.numpy() for _, _, i in steps]))
    assert len(untouched) == n - 13
    assert (stats.selected[untouched] == -1).all() and (stats.probs[untouched] == 0).all()
    for view in ("weak", "strong"):
        expect = sum(o.stats[f"threshold/{view}"].numpy() for o, _, _ in steps)
        np.testing.assert_array_equal(stats.threshold_sums[view], expect)
        assert stats.threshold_sums[view].dtype == np.float32
    assert set(stats.threshold_sums) == {"weak", "strong"}  # only thresholds are summed


def test_step_results_of_a_method_without_selection() -> None:
    from dnfer.engine.records import EpochStats
    from dnfer.engine.step import StepResults

    out, labels, index = _step_result(4, [9, 1, 17])
    out.selected, out.stats = None, {}
    stats = EpochStats(selected=None, probs=np.zeros((20, 4), np.float16))
    StepResults.start(out, labels, index, torch.tensor([2.0, 0.0]), torch.tensor(False)).add_to(stats, world_size=1)
    assert stats.loss_sum == 2.0 and stats.seen == 3 and stats.threshold_sums == {}
    np.testing.assert_array_equal(stats.probs[index.numpy()], out.logits.softmax(1).numpy().astype(np.float16))


def test_step_results_carry_the_steps_verdict() -> None:
    """The verdict read a step late: how many ranks were faulty, and whether this one was."""
    from dnfer.engine.step import StepResults

    out, labels, index = _step_result(5, [0, 1])
    for faulty_ranks, local in ((0, False), (1, True), (2, False)):
        p = StepResults.start(out, labels, index, torch.tensor([float("nan"), float(faulty_ranks)]),
                               torch.tensor(local), where=(1, 2, 7))
        p.wait()
        assert (p.faulty_ranks, p.local_bad, p.where) == (faulty_ranks, local, (1, 2, 7))


@pytest.mark.parametrize("method", ["dnfer", "dnfer+options", "ce", "scn", "rul", "eac", "coteaching", "gce", "sce"])
def test_step_loop_reads_no_tensor_values_per_step(tmp_path, monkeypatch, method: str) -> None:
    """CPU guard for a GPU property: inside the training step loop (engine trainer, step, records; methods) no
    tensor value is read on the host per step, except through ``StepResults`` (a step late, from
    a queued copy). On a GPU each such read (``.item()``, ``bool()``, ``float()``, ``.cpu()``...)
    makes the host wait for the GPU to drain. Per-epoch reads (evaluation, records, checkpoints)
    are allowed, so an epoch of 12 steps may read no more than one of 6. (Syncs inside PyTorch
    ops, such as boolean-mask indexing, are not seen here; the CUDA test of the same property
    sees them. None of the methods uses one.)"""
    import sys
    from pathlib import Path

    import dnfer

    package = str(Path(dnfer.__file__).parent)
    watched = tuple(f"{package}/engine/{m}.py" for m in ("trainer", "step", "records")) + (f"{package}/methods/",)
    allowed = {"start", "wait", "add_to", "fault_message"}  # StepResults' own reads, the fault report
    reads: list[str] = []

    def counting(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(watched) and caller.co_name not in allowed:
                reads.append(f"{name} in {caller.co_name}")
            return original(self, *args, **kwargs)

        return read

    def run(n_train: int, name: str) -> list[str]:
        cfg = tiny_config(str(tmp_path / name), epochs=2, precision="bf16")  # epoch 2 is past the warm-up
        cfg.method.name, cfg.method.noise_rate = method.split("+")[0], 0.3  # co-teaching needs a noise-rate estimate
        cfg.method.params = {"warmup_epochs": 1} if method == "dnfer" else {}
        if method == "dnfer+options":  # DNFER's optional variants, all on
            cfg.method.params = {"warmup_epochs": 1, "sup_loss": "gce", "selection": "agree", "relabel_threshold": 0.3}
        cfg.data.options = {"n_train": str(n_train), "n_test": "32"}
        cfg.data.val_fraction = 0.0
        reads.clear()
        with monkeypatch.context() as m:
            for reader in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__"):
                m.setattr(torch.Tensor, reader, counting(reader))
            fit(cfg, log=lambda msg: None)
        return list(reads)

    six, twelve = run(96, "six"), run(192, "twelve")
    assert len(twelve) == len(six), f"{len(six)} reads with 6 steps an epoch, {len(twelve)} with 12: {twelve[:8]}"
