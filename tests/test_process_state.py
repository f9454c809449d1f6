"""fit leaves the process as it found it: the thread count, deterministic mode and its fill flag,
cuDNN's autotuner and the allocator setting it changes for a run are restored when it returns or
raises (library users call fit twice, or between their own code)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from tests.conftest import tiny_config

from dnfer.engine import trainer
from dnfer.engine.cpu_tuning import host_memory
from dnfer.errors import ConfigError


def _settings() -> dict[str, Any]:
    return {
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "fill": torch.utils.deterministic.fill_uninitialized_memory,  # type: ignore[attr-defined]
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "retaining": host_memory.retaining_freed_memory(),
    }


@pytest.fixture
def opposite_settings(request) -> Iterator[dict[str, Any]]:
    """Set every process-wide setting to the opposite of what a run with ``deterministic``
    (the parameter) sets, so that a fit which forgot to restore one is seen; restored after."""
    deterministic: bool = request.param
    saved = _settings()
    torch.set_num_threads(3)  # the runs below use 1
    torch.use_deterministic_algorithms(not deterministic)
    torch.utils.deterministic.fill_uninitialized_memory = True  # type: ignore[attr-defined]  # a run sets False
    torch.backends.cudnn.benchmark = deterministic  # a run sets the opposite
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)  # a deterministic run sets it
    try:
        yield _settings()
    finally:
        torch.set_num_threads(saved["threads"])
        torch.use_deterministic_algorithms(saved["deterministic"], warn_only=saved["warn_only"])
        torch.utils.deterministic.fill_uninitialized_memory = saved["fill"]  # type: ignore[attr-defined]
        torch.backends.cudnn.benchmark = saved["cudnn_benchmark"]
        if saved["cublas"] is not None:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved["cublas"]


@pytest.mark.parametrize("opposite_settings", [True, False], indirect=True, ids=["deterministic", "autotuned"])
def test_fit_restores_the_process_settings(tmp_path, monkeypatch, opposite_settings: dict[str, Any]) -> None:
    deterministic = not opposite_settings["deterministic"]
    seen_inside: list[dict[str, Any]] = []
    real_epoch = trainer._Training.train_epoch

    def spying(self: trainer._Training, epoch: int) -> tuple[float, float, int]:
        seen_inside.append(_settings())
        return real_epoch(self, epoch)

    monkeypatch.setattr(trainer._Training, "train_epoch", spying)
    cfg = tiny_config(str(tmp_path / "run"), epochs=1, deterministic=deterministic)
    trainer.fit(cfg, log=lambda m: None)
    # the run did change them (else this test could not fail) ...
    inside = seen_inside[0]
    assert inside["threads"] == 1 and inside["cudnn_benchmark"] is not deterministic
    if deterministic:  # (a run without it leaves deterministic mode as it was)
        assert inside["deterministic"] and inside["fill"] is False and inside["cublas"] is not None
    if host_memory._glibc() is not None:
        assert inside["retaining"] is True  # train.malloc auto on a CPU
    # ... and put them back
    assert _settings() == opposite_settings


@pytest.mark.parametrize("opposite_settings", [True], indirect=True)
def test_fit_restores_the_process_settings_when_it_raises(tmp_path, opposite_settings: dict[str, Any]) -> None:
    cfg = tiny_config(str(tmp_path / "run"), epochs=1, batch_size=1000)  # refused after the set-up applied all
    with pytest.raises(ConfigError, match="batch_size"):
        trainer.fit(cfg, log=lambda m: None)
    assert _settings() == opposite_settings
