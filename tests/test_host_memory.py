"""train.malloc: keeping freed host memory in the process (engine.cpu_tuning.host_memory).

The allocator setting is process-wide, so the fault counts are measured in child processes.
Page-fault counts (not timings) are the property: a block that is freed and allocated again
must not be mapped in again page by page.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any

import pytest
from tests.conftest import tiny_config

from dnfer.config import Config
from dnfer.engine.cpu_tuning import host_memory
from dnfer.errors import ConfigError

needs_glibc = pytest.mark.skipif(host_memory._glibc() is None, reason="the setting only exists with glibc")

#: A training-like pattern: the same large blocks (64 and 30 MiB, above glibc's 32 MiB mmap
#: ceiling and below it) allocated, written and freed every "step"; prints the minor page
#: faults of steps 9-16 (with the heap kept, glibc needs up to 6 steps to settle: the heap grows
#: while freed blocks are too fragmented for the aligned requests, then stops).
CHILD = """
import json, resource, sys
import torch
from dnfer.engine.cpu_tuning import host_memory as hm
for mode in sys.argv[1].split(","):  # "default": glibc as the process started
    {"default": lambda: None, "retain": hm.retain_freed_memory, "system": hm.system_malloc}[mode]()
def step():
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(64 << 18); b = torch.ones(30 << 18); del a
    c = torch.ones(64 << 18); del b, c
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
faults = [step() for _ in range(16)]
print(json.dumps(faults[8:]))
"""

PAGES_OF_64_MIB = (64 << 20) // 4096


def _faults_per_step(modes: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", CHILD, modes], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_glibc_default_maps_large_blocks_in_again_every_step() -> None:
    # the problem being solved: without the setting, each step faults in at least one 64 MiB block
    assert min(_faults_per_step("default")) >= PAGES_OF_64_MIB


@needs_glibc
def test_retained_memory_stops_page_faults_on_reused_blocks() -> None:
    assert max(_faults_per_step("retain")) < PAGES_OF_64_MIB // 16


@needs_glibc
def test_system_malloc_undoes_retain() -> None:
    assert min(_faults_per_step("retain,system")) >= PAGES_OF_64_MIB


def test_not_glibc_changes_nothing(monkeypatch) -> None:
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert host_memory.retain_freed_memory() is False
    assert host_memory.system_malloc() is False
    host_memory.release_freed_memory()  # no error either


def test_a_refused_mallopt_is_an_error(monkeypatch) -> None:
    class RefusingLibc:
        def mallopt(self, param: int, value: int) -> int:
            return 0

    monkeypatch.setattr(host_memory, "_glibc", lambda: RefusingLibc())
    with pytest.raises(OSError, match="mallopt.*refused"):
        host_memory.retain_freed_memory()


def test_trainer_rule() -> None:
    assert host_memory.wants_retained_memory("auto", "cpu")
    assert not host_memory.wants_retained_memory("auto", "cuda")  # device memory has its own cache
    assert not host_memory.wants_retained_memory("auto", "mps")
    assert not host_memory.wants_retained_memory("system", "cpu")
    with pytest.raises(ValueError, match="auto, system"):
        host_memory.wants_retained_memory("jemalloc", "cpu")


@pytest.mark.parametrize(("setting", "applied"), [("auto", True), ("system", False)])
def test_fit_applies_the_setting_and_restores_the_allocator(tmp_path, monkeypatch, setting: str,
                                                             applied: bool) -> None:
    """fit keeps freed memory while it trains, then sets the allocator back as it found it."""
    from dnfer.engine import cpu_tuning, trainer

    calls: list[str] = []
    monkeypatch.setattr(cpu_tuning, "retain_freed_memory", lambda: calls.append("retain") or True)
    monkeypatch.setattr(cpu_tuning, "release_freed_memory", lambda: calls.append("release"))
    monkeypatch.setattr(cpu_tuning, "system_malloc", lambda: calls.append("system") or True)
    summary: dict[str, Any] = trainer.fit(tiny_config(str(tmp_path / "run"), epochs=1, malloc=setting),
                                          log=lambda m: None)
    assert 0.0 <= summary["final_test_acc"] <= 1.0
    assert calls == (["retain", "system"] if applied else [])  # glibc's own before: glibc's own after


@pytest.mark.parametrize("kept_before", [False, True])
def test_apply_undo_restores_what_it_changed(monkeypatch, kept_before: bool) -> None:
    """cpu_tuning.apply's undo: the thread count as it was, the allocator as it was (glibc's, or
    kept by the caller), and the heap's freed memory given back either way."""
    import torch

    from dnfer.engine import cpu_tuning
    from dnfer.engine.device import resolve_precision

    calls: list[str] = []
    monkeypatch.setattr(host_memory, "_retaining", kept_before)  # what the caller had set
    monkeypatch.setattr(host_memory, "_glibc", lambda: _FakeLibc(calls))
    threads = torch.get_num_threads()
    new_threads = 1 if threads > 1 else 2
    cpu = torch.device("cpu")
    try:
        undo = cpu_tuning.apply(threads=new_threads, malloc="auto", small_map_conv="native", device=cpu,
                                precision=resolve_precision("fp32", cpu), compiled=False)
        assert torch.get_num_threads() == new_threads and host_memory.retaining_freed_memory()
        calls.clear()
        undo()
        assert torch.get_num_threads() == threads
        assert host_memory.retaining_freed_memory() is kept_before
        assert calls[-1] == "malloc_trim(0)"  # the run's peak goes back to the kernel
        assert any(c.startswith("mallopt") for c in calls) is not kept_before  # settings reset only if changed
    finally:
        torch.set_num_threads(threads)


class _FakeLibc:
    """Records mallopt/malloc_trim calls instead of changing this test process's heap."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(f"mallopt({param}, {value})")
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(f"malloc_trim({pad})")
        return 1


def test_bad_setting_is_one_clear_error() -> None:
    cfg = Config()
    cfg.train.malloc = "jemalloc"
    with pytest.raises(ConfigError, match="train.malloc.*auto.*system"):
        cfg.validate()


def test_cli_flag_reaches_the_config() -> None:
    from dnfer.commands import train as train_cmd

    parser = argparse.ArgumentParser()
    train_cmd.add_parser(parser.add_subparsers())
    assert train_cmd.config_from_args(parser.parse_args(["train", "--malloc", "system"])).train.malloc == "system"
    assert train_cmd.config_from_args(parser.parse_args(["train"])).train.malloc == "auto"
