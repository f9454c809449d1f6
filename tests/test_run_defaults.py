"""Safe defaults: the head learning rate follows the backbone's origin, DNFER's warm-up must leave
epochs that select, warm-up epochs report no selection, and the first epoch prints the cost."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from tests.conftest import tiny_config

from dnfer.config import Config, comparable_config
from dnfer.engine.records import cost_line, cpu_cost_warning, human_bytes, human_duration
from dnfer.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_head_lr_is_automatic_unless_set() -> None:
    c = Config()
    c.optim.lr = 2e-3
    assert c.optim.resolved_head_lr(None) == pytest.approx(2e-3)  # from scratch: head_lr = lr
    assert c.optim.resolved_head_lr("w.pth") == pytest.approx(2e-2)  # pretrained: the paper's 10x
    c.optim.head_lr = 5e-4
    assert c.optim.resolved_head_lr(None) == c.optim.resolved_head_lr("w.pth") == 5e-4  # explicit wins


@pytest.mark.parametrize("pretrained, expected, words", [
    (None, 1e-3, "= lr: backbone from scratch"), ("w.pth", 1e-2, "10 x lr: pretrained backbone")])
def test_resolve_head_lr_fills_the_config_and_says_why(pretrained: str | None, expected: float, words: str) -> None:
    c = Config()
    c.model.pretrained = pretrained
    line = c.resolve_head_lr()
    assert c.optim.head_lr == pytest.approx(expected) and words in line and f"{expected:g}" in line
    assert "optim.head_lr" in c.resolve_head_lr()  # now set: said to come from the config


def test_shipped_configs_keep_their_head_rates() -> None:
    demo = Config.from_yaml(CONFIGS / "demo.yaml")
    assert demo.optim.resolved_head_lr(demo.model.pretrained) == pytest.approx(1e-3)
    papers = sorted(CONFIGS.glob("*_paper*.yaml"))
    runs = [p for p in papers if not p.name.startswith("bench_")]
    assert runs
    for path in runs:  # trained with --pretrained PATH: the paper's 1e-2 head rate
        cfg = Config.from_yaml(path)
        cfg.model.pretrained = "res18_naive.pth_MSceleb.tar"
        assert cfg.optim.resolved_head_lr(cfg.model.pretrained) == pytest.approx(1e-2), path.name


def test_build_optimizer_uses_the_resolved_head_rate() -> None:
    from dnfer.engine.build import build_optimizer
    from dnfer.engine.trainer import build_method
    from dnfer.models.factory import create_model

    for pretrained, head in ((None, 1e-3), ("w.pth", 1e-2)):
        cfg = Config()
        cfg.model.pretrained = pretrained
        model = create_model("tiny_cnn", 3, image_size=16)
        opt = build_optimizer(cfg, model, build_method(cfg, 3, 10))
        assert [g["lr"] for g in opt.param_groups[:2]] == pytest.approx([1e-3, head])


def test_automatic_and_explicit_equal_head_rates_compare_equal() -> None:
    """A run saved with the resolved value resumes (and a sweep cell matches) under the automatic default."""
    saved = Config()
    saved.optim.head_lr = 1e-3
    assert comparable_config(saved.to_dict()) == comparable_config(Config().to_dict())
    saved.optim.head_lr = 1e-2  # an older run's default: really a different training
    assert comparable_config(saved.to_dict()) != comparable_config(Config().to_dict())


@pytest.mark.parametrize("warmup, epochs, ok", [(5, 3, False), (3, 3, False), (2, 3, True), (0, 1, True)])
def test_warmup_must_leave_epochs_that_select(warmup: int, epochs: int, ok: bool) -> None:
    c = Config()
    c.method.params = {"warmup_epochs": warmup}
    c.train.epochs = epochs
    if ok:
        c.validate()
        return
    with pytest.raises(ConfigError) as e:
        c.validate()
    assert str(e.value) == (f"method.params.warmup_epochs ({warmup}) >= train.epochs ({epochs}): DNFER would never "
                            "select a sample; lower --warmup-epochs or raise --epochs")
    c.method.name, c.method.params = "ce", {}  # other methods have no warm-up to check
    c.validate()


def test_human_units() -> None:
    assert [human_duration(s) for s in (0.4, 12, 60, 160, 1499, 3600, 3 * 3600 + 5 * 60 + 20)] == [
        "0 s", "12 s", "1 min", "2 min 40 s", "25 min", "1 h 00 min", "3 h 05 min"]
    assert [human_bytes(n) for n in (512, 9_900_000, 1_234_567_890)] == ["512 B", "9.9 MB", "1.2 GB"]


def test_cost_line(tmp_path: Path) -> None:
    ckpt = tmp_path / "last.pt"
    ckpt.write_bytes(b"x" * 45_000)
    assert cost_line(0, 12.0, 14, ckpt) == ("epoch 1 took 12 s; about 2 min 48 s for the remaining 14 epochs; "
                                            "each checkpoint (last.pt) takes 45.0 kB")
    assert cost_line(4, 3.0, 0, tmp_path / "absent.pt") == "epoch 5 took 3 s"


def test_run_records_head_rate_nulls_warmup_selection_and_prints_cost_once(tmp_path: Path) -> None:
    cfg = tiny_config(str(tmp_path / "run"), epochs=3)
    cfg.method.params = {"warmup_epochs": 1}
    lines: list[str] = []
    from dnfer.engine.trainer import fit

    summary = fit(cfg, log=lines.append)
    run = tmp_path / "run"
    # the resolved head rate: printed, in config.yaml, in summary.json and in the optimiser's record
    assert any(ln.startswith("head lr 0.001 (automatic") for ln in lines), lines
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["head_lr"] == pytest.approx(1e-3)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["head_lr"] == summary["head_lr"] == pytest.approx(1e-3)
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["head_lr"] == r["lr"] for r in recs)  # the optimiser ran the head at the backbone's rate
    # epoch 1 is warm-up: every selection field is null; epochs 2-3 selected and are scored
    sel_keys = [k for k in recs[1] if k.startswith(("selection_", "selected_fraction_"))]
    assert {"selection_precision_weak", "selection_recall_strong", "selected_fraction_weak"} <= set(sel_keys)
    assert all(recs[0][k] is None for k in sel_keys), {k: recs[0][k] for k in sel_keys}
    for r in recs[1:]:
        assert 0.0 <= r["selection_precision_weak"] <= 1.0 and 0.0 <= r["selected_fraction_weak"] <= 1.0
    assert summary["selection_precision"] == recs[-1]["selection_precision_weak"] and summary["selection_epoch"] == 3
    assert "selection_note" not in summary
    # the estimate: once, after epoch 1, with the measured time and last.pt's size
    cost = [ln for ln in lines if " took " in ln]
    assert len(cost) == 1, lines
    m = re.fullmatch(r"epoch 1 took (\d+) s; about (.+) for the remaining 2 epochs; "
                     r"each checkpoint \(last\.pt\) takes ([\d.]+) (kB|MB)", cost[0])
    assert m, cost[0]
    size = float(m.group(3)) * (1e3 if m.group(4) == "kB" else 1e6)
    assert size == pytest.approx((run / "last.pt").stat().st_size, rel=0.06)
    assert lines.index(cost[0]) < next(i for i, ln in enumerate(lines) if ln.startswith("epoch   2"))


def test_cpu_cost_warning_only_for_large_cpu_runs() -> None:
    line = cpu_cost_warning("cpu", "resnet18", 64, 4499, 40)  # `dnfer train` on the synthetic default
    assert line is not None and "4499 images x 40 epochs" in line and "--model resnet10_slim" in line
    assert "about 50 min" in line  # 4499 x 40 / 60 samples/s
    big = cpu_cost_warning("cpu", "resnet50", 224, 12_271, 40)
    assert big is not None and " h " in big  # hours
    assert cpu_cost_warning("cuda", "resnet18", 224, 12_271, 40) is None
    assert cpu_cost_warning("cpu", "resnet10_slim", 224, 12_271, 40) is None
    assert cpu_cost_warning("cpu", "resnet18", 16, 96, 2) is None  # a smoke run


def test_make_demo_trains_demo_yaml_and_ce_on_the_same_noise_draw(tmp_path) -> None:
    """configs/demo_vs_ce.yaml (make demo) must train what configs/demo.yaml trains, plus CE."""
    from dnfer.bench.spec import build_cells, load_sweep
    from dnfer.config import comparable_config

    cells = {c.method: c.config for c in build_cells(load_sweep(CONFIGS / "demo_vs_ce.yaml"), tmp_path)}
    assert set(cells) == {"dnfer_plus", "ce"}

    def settings(cfg: Config) -> dict:
        d = comparable_config(cfg.to_dict())
        d.pop("out")
        d["train"].pop("progress")
        return d

    assert settings(cells["dnfer_plus"]) == settings(Config.from_yaml(CONFIGS / "demo.yaml"))
    plus, ce = settings(cells["dnfer_plus"]), settings(cells["ce"])
    assert plus["data"] == ce["data"] and plus["train"] == ce["train"]  # same noise draw, same budget
