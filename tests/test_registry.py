"""Registries fill themselves: no caller has to load the built-ins first."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dnfer.errors import ConfigError
from dnfer.registry import Registry


def _fresh(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_importing_the_registry_imports_no_subpackage() -> None:
    out = _fresh("import sys, dnfer.registry; "
                 "print(sorted(m for m in sys.modules if m.startswith(('dnfer.methods', 'dnfer.models', 'dnfer.data'))))")
    assert out == "[]"


def test_lookups_in_a_fresh_interpreter_load_the_builtins() -> None:
    out = _fresh("from dnfer.registry import DATASETS, METHODS, MODELS, THRESHOLDS; "
                 "print(METHODS.get('dnfer').__name__, 'tiny_cnn' in MODELS, 'rafdb' in DATASETS, "
                 "'ema' in THRESHOLDS.names())")
    assert out == "DNFER True True True"


def test_class_registration_takes_the_name_from_the_class() -> None:
    reg: Registry = Registry("widget", ("dnfer.errors",))

    @reg.register
    class Knob:
        name = "knob"

    reg.register("dial")(int)
    assert reg.get("knob") is Knob and reg.get("dial") is int and reg.names() == ["dial", "knob"]
    with pytest.raises(ConfigError, match="unknown widget 'lever'; valid widgets: dial, knob"):
        reg.get("lever")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(Knob)
    with pytest.raises(ValueError, match="no ``name``"):
        reg.register(type("Nameless", (), {}))
