"""benchmarks/epoch_cost.py on a tiny CPU set: it runs through ``fit`` and its table adds up.

No timing is asserted (benchmarks measure speed; this only keeps the script working as the
trainer changes, so a GPU run is not spent on a broken script).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "epoch_cost.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("epoch_cost", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_epoch_cost_table_is_consistent_on_a_tiny_cpu_set(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    epoch_cost = _load_script()
    out = tmp_path / "cost.json"
    train_size, batch = 100, 16
    rc = epoch_cost.main(["--device", "cpu", "--image-size", "16", "--train-size", str(train_size),
                          "--test-size", "24", "--batch-size", str(batch), "--model", "tiny_cnn", "--precision",
                          "fp32", "--threads", "1", "--gen-workers", "1", "--epochs", "2", "--methods", "ce,dnfer",
                          "--workdir", str(tmp_path), "--json", str(out)])
    assert rc == 0
    table = json.loads(out.read_text())
    assert [r["method"] for r in table["rows"]] == ["ce", "dnfer"] and table["failed"] == {}
    trained = train_size - round(0.1 * train_size)  # 10% carved out for validation
    for row in table["rows"]:
        assert row["images_per_epoch"] == trained // batch * batch  # whole batches only
        assert row["epochs"] == 2 and row["device"] == "cpu" and row["precision"] == "fp32"
        assert 0 < row["train_s_per_epoch"] <= row["epoch_s"] < row["fit_s"]
        assert row["train_images_per_s"] == pytest.approx(row["images_per_epoch"] / row["train_s_per_epoch"])
        assert row["projected_40_epoch_min"] == pytest.approx((row["fit_s"] + 38 * row["epoch_s"]) / 60)
        assert row["projected_40_epoch_train_only_min"] == pytest.approx(40 * row["train_s_per_epoch"] / 60)
    assert [r["views"] for r in table["rows"]] == [1, 2]  # DNFER trains on a weak and a strong view
    total = sum(r["projected_40_epoch_min"] for r in table["rows"])
    assert table["sweep_40_epoch_min"] == pytest.approx(total)
    assert table["grid_runs"] == 6 * 3 * 2 and table["grid_hours"] == pytest.approx(18 * total / 60)
    printed = capsys.readouterr().out
    assert "sweep, 2 of 2 methods x 40 epochs" in printed and "reusing" not in printed  # data chatter kept off
    assert not any(p.name.startswith("epoch_cost-") for p in tmp_path.iterdir())  # its temporary folder is gone
