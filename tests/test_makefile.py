"""The Makefile's set-up steps, run on a copy so nothing here is installed or removed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_venv_creation_refuses_a_full_disk_with_one_clear_line(tmp_path: Path) -> None:
    """Regression: CI's fresh clone died mid-install with pip's bare '[Errno 28] No space left
    on device' after torch's 6 GiB had half landed. The check must stop first and say why."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    impossible = 10**9  # GiB: no disk has this much free
    result = subprocess.run(
        ["make", ".venv/bin/python", f"MIN_FREE_GIB={impossible}", f"PYTHON={sys.executable}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "GiB free on the disk holding" in result.stderr
    assert f"needs about {impossible}" in result.stderr
    assert "MIN_FREE_GIB" in result.stderr
    assert not (tmp_path / ".venv").exists(), "the venv must not be started on a disk that cannot hold it"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")
def test_venv_creation_goes_on_when_space_suffices(tmp_path: Path) -> None:
    """With a need of 0 GiB the check passes and make runs the venv and pip steps. A stand-in
    python records those calls instead of creating a real venv."""
    shutil.copy(REPO / "Makefile", tmp_path / "Makefile")
    calls = tmp_path / "calls.txt"
    fake_python = tmp_path / "fake_python"
    fake_python.write_text(
        "#!/bin/sh\n"
        # The check runs for real; `-m venv DIR` makes a DIR/bin/python that only records.
        f'if [ "$1" = "-c" ]; then echo check >> {calls}; exec {sys.executable} "$@"; fi\n'
        f'echo "$1 $2 $3" >> {calls}\n'
        'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; fi\n'
    )
    fake_python.chmod(0o755)
    result = subprocess.run(
        ["make", ".venv/bin/python", "MIN_FREE_GIB=0", f"PYTHON={fake_python}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "GiB free" not in result.stderr
    recorded = calls.read_text().splitlines()
    assert recorded[0] == "check"
    assert recorded[1] == "-m venv .venv"
    assert recorded[2] == "-m pip install"
