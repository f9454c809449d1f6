"""docs/api.md: every ```python block runs, in order, in one namespace (so the examples cannot drift)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_api_doc_has_the_promised_examples() -> None:
    blocks = python_blocks(API_DOC.read_text(encoding="utf-8"))
    code = "\n".join(blocks)
    assert len(blocks) >= 6
    for name in ("fit(", "load_predictor(", "apply_noise(", "class_thresholds(", "select_clean(",
                 "supervised_loss(", "consistency_loss(", "audit_scores(", "METHODS", "MODELS", "create_model("):
        assert name in code, name


def test_api_doc_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from dnfer.registry import MODELS

    MODELS.names()  # load the built-ins before taking the snapshot
    registered = dict(MODELS._items)
    monkeypatch.chdir(tmp_path)  # the examples write runs/api-demo and label_issues.csv here
    namespace: dict[str, object] = {"__name__": "api_doc"}
    try:
        for i, block in enumerate(python_blocks(API_DOC.read_text(encoding="utf-8")), start=1):
            exec(compile(block, f"{API_DOC}:block{i}", "exec"), namespace)
    finally:
        MODELS._items.clear()
        MODELS._items.update(registered)  # the example's my_cnn must not leak into other tests
    assert (tmp_path / "runs" / "api-demo" / "summary.json").is_file()
    assert (tmp_path / "label_issues.csv").read_text().startswith("index,")
    assert "methods:" in capsys.readouterr().out
