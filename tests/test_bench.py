"""``dnfer bench``: micro sweeps (tiny_cnn, 16 px, 64 images, 1 epoch), resume, failures, reports, configs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from dnfer.bench.report import markdown_report, metric_table, plot_accuracy_vs_noise, read_csv, write_csv
from dnfer.bench.runner import run_inprocess, run_sweep
from dnfer.bench.spec import SweepSpec, build_cells, load_sweep, parse_noise_setting
from dnfer.cli import main
from dnfer.config import Config
from dnfer.errors import ConfigError, DnferError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["--model", "tiny_cnn", "--image-size", "16", "--epochs", "1", "--batch-size", "16",
        "--data-option", "n_train=64", "--data-option", "n_test=32", "--precision", "fp32", "--threads", "1",
        "--set", "method.params.warmup_epochs=0"]


def tiny_spec(methods: list[str], noise: list[str], seeds: list[int]) -> SweepSpec:
    base = Config()
    base.data.options = {"n_train": "64", "n_test": "32"}
    base.data.image_size = 16
    base.model.name = "tiny_cnn"
    base.method.params = {"warmup_epochs": 0}
    base.train.epochs = 1
    base.train.batch_size = 16
    base.train.precision = "fp32"
    base.train.threads = 1
    return SweepSpec(methods=methods, noise=[parse_noise_setting(n) for n in noise], seeds=seeds, base=base)


def test_micro_sweep_writes_tables_and_plot_then_resume_skips(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    argv = ["bench", "--methods", "dnfer,ce", "--noise", "none,symmetric:0.3", "--seeds", "1",
            "--out", str(out), "--runner", "inprocess", *TINY]
    assert main(argv) == 0
    for name in ("results.csv", "results.md", "accuracy_vs_noise.png"):
        assert (out / name).is_file(), name
    assert (out / "accuracy_vs_noise.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 4
    assert {(r["method"], r["noise"]) for r in rows} == {
        ("dnfer", "none"), ("dnfer", "symmetric:0.3"), ("ce", "none"), ("ce", "symmetric:0.3")}
    assert all(r["status"] == "ok" for r in rows)
    assert "best_test_acc_test_selected" not in rows[0]  # only with --best-on-test
    for r in rows:
        assert 0.0 <= float(r["final_test_acc"]) <= 1.0 and 0.0 <= float(r["best_val_test_acc"]) <= 1.0
        assert (r["selection_precision"] != "") == (r["method"] == "dnfer")  # CE selects nothing
        assert (Path(r["run_dir"]) / "summary.json").is_file() and (Path(r["run_dir"]) / "cell.yaml").is_file()
    assert (out / "dnfer" / "symmetric-0.3" / "seed1" / "metrics.jsonl").is_file()
    md = (out / "results.md").read_text()
    assert "| dnfer |" in md and "| ce |" in md and "| method | none | symmetric:0.3 |" in md
    assert "TEST set" not in md
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*/seed1/summary.json")}
    assert len(mtimes) == 4
    capsys.readouterr()

    # second invocation: every cell finished -> nothing retrains; --best-on-test adds the labelled column/table
    assert main([*argv, "--best-on-test"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped (finished)") == 4 and " ran in " not in printed
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert all(r["best_test_acc_test_selected"] != "" for r in rows)
    assert "selected on the TEST set — for parity with papers only" in (out / "results.md").read_text()


def test_crashed_cell_is_retried_reported_and_others_finish(tmp_path: Path) -> None:
    spec = tiny_spec(["ce", "broken"], ["none"], [1])
    # a label file naming images the dataset lacks: only loading the data can tell, so the cell
    # fails inside training (not when the sweep is planned)
    bad = tmp_path / "bad_labels.txt"
    bad.write_text("no_such_image.jpg 1\n")
    spec.method_overrides = {"broken": {"method.name": "ce", "data.noise_file": str(bad)}}
    calls: list[str] = []

    def counting(cell, resume, log_path):
        calls.append(cell.key)
        return run_inprocess(cell, resume, log_path)

    rows, outcomes = run_sweep(spec, tmp_path, runner=counting, retries=1, say=lambda m: None)
    status = {r["method"]: r["status"] for r in rows}
    assert status == {"ce": "ok", "broken": "failed"}
    assert calls.count("broken/none/seed1") == 2 and calls.count("ce/none/seed1") == 1
    failed = next(o for o in outcomes if not o.ok)
    assert failed.attempts == 2 and "no_such_image" in failed.error
    md = (tmp_path / "results.md").read_text()
    assert "| broken | failed |" in md and "broken/none/seed1" in md
    # the failed cell is retried by the next sweep; the finished one is not
    calls.clear()
    run_sweep(spec, tmp_path, runner=counting, retries=0, say=lambda m: None)
    assert calls == ["broken/none/seed1"]


def test_interrupted_cell_resumes_from_checkpoint(tmp_path: Path) -> None:
    spec = tiny_spec(["ce"], ["none"], [1])
    spec.base.train.epochs = 2
    seen: list[bool] = []

    def interrupted(cell, resume, log_path):  # trains 1 of 2 epochs, then "dies" with its checkpoint
        seen.append(resume)
        one = cell.config.to_dict()
        one["train"]["epochs"] = 1
        from dnfer.engine.trainer import fit
        fit(Config.from_dict(one), log=lambda m: None)
        (cell.run_dir / "summary.json").unlink()
        return -9

    rows, _ = run_sweep(spec, tmp_path, runner=interrupted, retries=0, say=lambda m: None)
    assert rows[0]["status"] == "failed" and (tmp_path / "ce" / "none" / "seed1" / "last.pt").is_file()

    def recording(cell, resume, log_path):
        seen.append(resume)
        return run_inprocess(cell, resume, log_path)

    rows, outcomes = run_sweep(spec, tmp_path, runner=recording, retries=0, say=lambda m: None)
    assert seen == [False, True] and outcomes[0].action == "resumed"
    assert rows[0]["status"] == "ok" and rows[0]["epochs"] == 2
    lines = (tmp_path / "ce" / "none" / "seed1" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2  # epoch 1 logged once, not repeated by the resumed attempt


@pytest.mark.slow
def test_subprocess_cells_and_exit_code(tmp_path: Path) -> None:
    """The default runner: each cell is `python -m dnfer train`; a failing cell makes the exit code 1."""
    sweep = tmp_path / "sweep.yaml"
    (tmp_path / "bad_labels.txt").write_text("no_such_image.jpg 1\n")
    sweep.write_text(
        "sweep:\n  methods: [ce, broken]\n  noise: [none]\n  seeds: [3]\n"
        f"  method_overrides:\n    broken: {{method.name: ce, data.noise_file: {tmp_path / 'bad_labels.txt'}}}\n"
        "base:\n  data: {image_size: 16, options: {n_train: 48, n_test: 16}}\n  model: {name: tiny_cnn}\n"
        "  train: {epochs: 1, batch_size: 16, precision: fp32, threads: 1}\n")
    out = tmp_path / "out"
    assert main(["bench", "--config", str(sweep), "--out", str(out), "--retries", "0"]) == 1
    rows = read_csv(out / "results.csv")
    assert [(r["method"], r["seed"], r["status"]) for r in rows] == [("ce", 3, "ok"), ("broken", 3, "failed")]
    log = (out / "broken" / "none" / "seed3" / "train.log").read_text()
    assert "no_such_image" in log and "Traceback" not in log  # the CLI's one-line error


def test_changed_settings_are_refused_not_mixed(tmp_path: Path) -> None:
    spec = tiny_spec(["ce"], ["none"], [1])
    run_sweep(spec, tmp_path, runner="inprocess", say=lambda m: None)
    spec.base.optim.head_lr = spec.base.optim.lr  # the automatic head rate (= lr) made explicit: same cell
    spec.base.optim.lr = 0.05
    with pytest.raises(ConfigError, match="optim.lr=0.001, the sweep now asks 0.05"):
        run_sweep(spec, tmp_path, runner="inprocess", say=lambda m: None)


def _row(method: str, noise: str, seed: int, acc: float | None, status: str = "ok", kind: str = "symmetric",
         rate: float = 0.3) -> dict:
    return {"method": method, "noise": noise, "noise_kind": kind, "noise_rate": rate, "seed": seed, "status": status,
            "final_test_acc": acc, "best_val_test_acc": acc, "selection_precision": None, "selection_recall": None,
            "train_seconds": 1.0, "run_dir": "x"}


def test_tables_mean_std_partial_and_failed_cells(tmp_path: Path) -> None:
    rows = [_row("dnfer", "symmetric:0.3", 1, 0.80), _row("dnfer", "symmetric:0.3", 2, 0.90),
            _row("ce", "symmetric:0.3", 1, 0.70), _row("ce", "symmetric:0.3", 2, None, status="failed"),
            _row("dnfer", "asymmetric:0.3", 1, None, "failed", "asymmetric"),
            _row("dnfer", "asymmetric:0.3", 2, None, "failed", "asymmetric"),
            _row("ce", "asymmetric:0.3", 1, 0.5, kind="asymmetric"), _row("ce", "asymmetric:0.3", 2, 0.6, kind="asymmetric")]
    table = metric_table(rows, "best_val_test_acc")
    lines = table.splitlines()
    assert lines[0] == "| method | symmetric:0.3 | asymmetric:0.3 |"
    std = math.sqrt(((80 - 85) ** 2 + (90 - 85) ** 2) / 1)  # sample std of 80, 90
    assert lines[2] == f"| dnfer | 85.00 ± {std:.2f} | failed |"
    assert lines[3] == f"| ce | 70.00 (1/2) | 55.00 ± {math.sqrt(50):.2f} |"
    md = markdown_report(rows, best_on_test=False)
    assert "precision" not in md.split("## Notes")[0]  # no method selected anything: no empty P/R tables
    assert "dnfer/asymmetric:0.3/seed1" in md
    write_csv(rows, tmp_path / "r.csv")
    back = read_csv(tmp_path / "r.csv")
    assert back[0]["best_val_test_acc"] == 0.8 and back[3]["best_val_test_acc"] is None and back[1]["seed"] == 2
    plot_accuracy_vs_noise(back, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_noise_and_seed_parsing_errors() -> None:
    with pytest.raises(ConfigError, match="noise"):
        parse_noise_setting("gaussian:0.3")
    with pytest.raises(ConfigError, match="name and file"):
        parse_noise_setting({"file": "x.txt"})
    f = parse_noise_setting({"name": "eac10", "file": "{data_root}/EmoLabel/noise01.txt", "rate": 0.1})
    assert (f.kind, f.rate, f.slug) == ("symmetric", 0.1, "eac10")
    assert parse_noise_setting("symmetric:0.30").slug == "symmetric-0.3"
    with pytest.raises(ConfigError, match="unknown method"):
        build_cells(tiny_spec(["dnfer", "nope"], ["none"], [1]), "/tmp/unused")
    assert main(["bench", "--seeds", "1,1", "--dry-run"]) == 2


def test_noise_rate_is_fed_to_methods_that_need_it(tmp_path: Path, monkeypatch) -> None:
    from dnfer.methods.ce import CrossEntropy

    monkeypatch.setattr(CrossEntropy, "needs_noise_rate", True)
    spec = tiny_spec(["ce"], ["none", "symmetric:0.2"], [1])
    cells = build_cells(spec, tmp_path)
    assert [c.config.method.noise_rate for c in cells] == [0.0, 0.2]
    assert cells[1].notes and cells[1].run_dir == tmp_path / "ce" / "symmetric-0.2" / "seed1"
    file_spec = tiny_spec(["dnfer"], [], [2])
    file_spec.base.data.spec = f"rafdb:{tmp_path}"
    file_spec.noise = [parse_noise_setting({"name": "eac20", "file": "{data_root}/EmoLabel/noise02.txt", "rate": 0.2})]
    (cell,) = build_cells(file_spec, tmp_path)
    assert cell.config.data.noise_file == f"{tmp_path}/EmoLabel/noise02.txt" and cell.config.data.noise == "none"
    assert cell.config.train.seed == 2


def test_base_method_params_belong_to_the_base_method(tmp_path: Path) -> None:
    """A base's DNFER options reach DNFER(+) cells only: SCE's own ``alpha`` is another option."""
    spec = tiny_spec(["dnfer", "sce", "ce", "dnfer_a3", "dnfer_plus"], ["none"], [1])
    spec.base.method.name = "dnfer"
    spec.base.method.params = {"alpha": 0.4, "warmup_epochs": 0}
    spec.method_overrides = {"dnfer_a3": {"method.name": "dnfer", "method.params.alpha": 0.3}, "sce": {"method.params.beta": 0.5}}
    cells = {c.method: c for c in build_cells(spec, tmp_path)}
    assert cells["dnfer"].config.method.params == {"alpha": 0.4, "warmup_epochs": 0} and not cells["dnfer"].notes
    assert cells["dnfer_a3"].config.method.params == {"alpha": 0.3, "warmup_epochs": 0}
    # DNFER+ is DNFER with other defaults: the same options, so the base's reach it
    assert cells["dnfer_plus"].config.method.params == {"alpha": 0.4, "warmup_epochs": 0} and not cells["dnfer_plus"].notes
    assert cells["sce"].config.method.params == {"beta": 0.5} and cells["ce"].config.method.params == {}
    assert any("method.params.alpha is an option of dnfer, left out for sce" in n for n in cells["sce"].notes)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads(path: Path, tmp_path: Path) -> None:
    import yaml

    from dnfer.registry import METHODS

    def local(cfg: Config) -> Config:  # real-data configs: a stand-in dataset folder (validate checks it exists)
        name, sep, _ = cfg.data.spec.partition(":")
        if sep:
            cfg.data.spec = f"{name}:{tmp_path}"
            if cfg.data.noise_file:
                cfg.data.noise_file = str(tmp_path / Path(cfg.data.noise_file).name)
        return cfg

    raw = yaml.safe_load(path.read_text())
    if "sweep" in raw:
        spec = load_sweep(path)
        assert spec.methods and spec.noise and spec.seeds
        assert all(m in METHODS or "method.name" in spec.method_overrides.get(m, {}) for m in spec.methods)
        local(spec.base)
        cells = build_cells(spec, tmp_path / "out")  # every override applies and validates
        assert len(cells) == len(spec.methods) * len(spec.noise) * len(spec.seeds)
        for c in cells:
            if c.noise.file:
                assert c.config.data.noise_file.startswith(str(tmp_path))
    else:
        local(Config.from_yaml(path)).validate()


def test_jobs_run_cells_concurrently_and_report_every_cell(tmp_path: Path) -> None:
    import json
    import threading
    import time

    spec = tiny_spec(["ce", "dnfer"], ["none", "symmetric:0.3"], [1])
    lock, active, peak = threading.Lock(), [0], [0]

    def fake(cell, resume, log_path):  # stands in for a training process: a finished summary after a while
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        (cell.run_dir / "summary.json").write_text(json.dumps({"final_test_acc": 0.5, "epochs": 1}))
        with lock:
            active[0] -= 1
        return 0

    messages: list[str] = []
    rows, outcomes = run_sweep(spec, tmp_path, runner=fake, jobs=2, say=messages.append)
    assert peak[0] == 2  # two cells in flight at once, never more
    assert sorted(r["status"] for r in rows) == ["ok"] * 4 and len(outcomes) == 4
    assert sum(m.startswith("[") for m in messages) == 4 and any(m.startswith("[4/4]") for m in messages)
    assert len(read_csv(tmp_path / "results.csv")) == 4


def test_jobs_give_each_subprocess_a_share_of_the_cores(tmp_path: Path, monkeypatch) -> None:
    import os
    import subprocess

    import dnfer.bench.runner as runner

    envs: list[dict[str, str] | None] = []

    def fake_run(cmd, **kw):
        envs.append(kw.get("env"))
        cell_dir = Path(cmd[cmd.index("--out") + 1])
        (cell_dir / "summary.json").write_text("{}")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 8)
    run_sweep(tiny_spec(["ce", "dnfer"], ["none"], [1]), tmp_path, jobs=4, say=lambda m: None)
    assert [e["OMP_NUM_THREADS"] for e in envs] == ["2", "2"]
    assert all(e["PATH"] == os.environ["PATH"] for e in envs)  # the rest of the environment is kept
    envs.clear()
    run_sweep(tiny_spec(["ce"], ["symmetric:0.3"], [2]), tmp_path / "serial", say=lambda m: None)
    assert envs == [None]  # one job: the child inherits everything as before


def test_jobs_options_are_checked(tmp_path: Path) -> None:
    spec = tiny_spec(["ce"], ["none"], [1])
    with pytest.raises(ConfigError, match="--jobs must be >= 1"):
        run_sweep(spec, tmp_path, jobs=0)
    with pytest.raises(ConfigError, match="needs --runner subprocess"):
        run_sweep(spec, tmp_path, runner="inprocess", jobs=2)


def test_cells_run_seed_by_seed_so_a_partial_sweep_compares_every_method(tmp_path: Path) -> None:
    import json

    spec = tiny_spec(["ce", "dnfer"], ["none", "symmetric:0.3"], [1, 2])
    calls: list[str] = []

    def fake(cell, resume, log_path):
        calls.append(cell.key)
        (cell.run_dir / "summary.json").write_text(json.dumps({"final_test_acc": 0.5}))
        return 0

    rows, _ = run_sweep(spec, tmp_path, runner=fake, say=lambda m: None)
    assert calls[:4] == ["ce/none/seed1", "dnfer/none/seed1", "ce/symmetric-0.3/seed1", "dnfer/symmetric-0.3/seed1"]
    assert all(k.endswith("seed2") for k in calls[4:])
    assert [r["method"] for r in rows] == ["ce"] * 4 + ["dnfer"] * 4  # the tables keep the spec's order


def test_partial_report_does_not_read_a_summary_still_being_written(tmp_path: Path) -> None:
    """Regression (seen in CI): with --jobs, a cell finishing wrote the partial report, which read
    every cell's summary.json, including one that a still-running cell had opened and not yet
    written (empty file): JSONDecodeError ended the whole sweep."""
    import json
    import time

    spec = tiny_spec(["ce", "dnfer"], ["none"], [1])
    slow_key = "ce/none/seed1"

    def fake(cell, resume, log_path):
        summary = cell.run_dir / "summary.json"
        if cell.key == slow_key:
            summary.write_text("")  # mid-write, as a plain write_text looks to another reader
            time.sleep(0.6)
        else:
            time.sleep(0.1)  # finishes, and reports, while the slow cell's file is empty
        summary.write_text(json.dumps({"final_test_acc": 0.5, "epochs": 1}))
        return 0

    rows, outcomes = run_sweep(spec, tmp_path, runner=fake, jobs=2, say=lambda m: None)
    assert [r["status"] for r in rows] == ["ok", "ok"] and len(outcomes) == 2


def test_corrupt_summary_is_one_clear_error(tmp_path: Path) -> None:
    spec = tiny_spec(["ce"], ["none"], [1])
    run_dir = tmp_path / "ce" / "none" / "seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text("{truncated")
    with pytest.raises(DnferError, match=r"seed1/summary.json: not a valid summary .*delete it to rerun"):
        run_sweep(spec, tmp_path, report_only=True, say=lambda m: None)


# ---------------------------------------------------------------- degenerate cells and the plot's levels


def test_confusion_levels_on_a_hand_matrix() -> None:
    from dnfer.bench.report import confusion_levels

    cm = [[5, 1, 0], [2, 2, 0], [0, 0, 0]]  # 10 test images: true class 0 has 6, predictions 7 x class 0
    chance, majority, top = confusion_levels(cm)
    assert (chance, majority, top) == (pytest.approx(1 / 3), pytest.approx(0.6), pytest.approx(0.7))
    with pytest.raises(ValueError):
        confusion_levels([[0, 0], [0, 0]])


def test_degenerate_reason_flags_collapse_chance_and_majority() -> None:
    from dnfer.bench.report import COLLAPSE_SHARE, LEVEL_MARGIN, degenerate_reason

    chance, majority = 1 / 7, 0.3866
    assert degenerate_reason(0.80, chance, majority, 0.40) == ""  # a model that learned something
    assert "collapsed" in degenerate_reason(0.80, chance, majority, COLLAPSE_SHARE)
    assert "collapsed" not in degenerate_reason(0.80, chance, majority, COLLAPSE_SHARE - 0.01)
    assert "chance" in degenerate_reason(chance + LEVEL_MARGIN / 2, chance, majority, 0.5)
    assert "majority" in degenerate_reason(majority, chance, majority, 0.5)  # what all-happiness scores
    assert "majority" in degenerate_reason(majority + LEVEL_MARGIN - 1e-6, chance, majority, 0.5)
    assert degenerate_reason(majority + LEVEL_MARGIN + 0.01, chance, majority, 0.5) == ""
    assert degenerate_reason(0.2, None, None, None) == ""  # levels unknown (old results.csv): no claim


def test_collapsed_cell_is_flagged_in_csv_and_markdown(tmp_path: Path) -> None:
    from dnfer.bench.report import DEGENERATE_MARK, degenerate_reason

    good = _row("dnfer", "symmetric:0.3", 1, 0.80)
    collapsed = _row("ce", "symmetric:0.3", 1, 0.3866)
    for row, top in ((good, 0.35), (collapsed, 1.0)):
        row.update(chance_rate=1 / 7, majority_rate=0.3866, top_prediction_share=top)
        row["degenerate"] = degenerate_reason(row["best_val_test_acc"], 1 / 7, 0.3866, top) or None
    assert good["degenerate"] is None and "collapsed" in collapsed["degenerate"]
    write_csv([good, collapsed], tmp_path / "r.csv")
    back = read_csv(tmp_path / "r.csv")
    assert back[0]["degenerate"] is None and back[1]["degenerate"] == collapsed["degenerate"]
    md = markdown_report(back)
    accuracy_table = md.split("## Final-epoch")[0]
    assert f"| ce | 38.66{DEGENERATE_MARK} |" in accuracy_table and "| dnfer | 80.00 |" in accuracy_table
    assert "ce/symmetric:0.3/seed1 (collapsed" in md.split("## Notes")[1]


def test_result_row_reads_the_confusion_of_the_best_val_epoch(tmp_path: Path) -> None:
    import json

    from dnfer.bench.runner import result_row

    spec = tiny_spec(["ce"], ["none"], [1])
    [cell] = build_cells(spec, tmp_path)
    cell.run_dir.mkdir(parents=True)
    # epoch 1 collapsed onto class 0 (the majority, 6 of 10); epoch 2 is the best-val one and is healthy
    records = [{"epoch": 1, "test_confusion": [[6, 0], [4, 0]]}, {"epoch": 2, "test_confusion": [[5, 1], [0, 4]]}]
    (cell.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"epoch": 3, "te')
    summary = {"final_test_acc": 0.6, "best_val_test_acc": 0.9, "best_val_epoch": 2, "epochs": 2}
    (cell.run_dir / "summary.json").write_text(json.dumps(summary))
    row = result_row(cell, None)
    assert row["chance_rate"] == 0.5 and row["majority_rate"] == 0.6 and row["top_prediction_share"] == 0.5
    assert row["degenerate"] is None
    summary.update(best_val_epoch=1, best_val_test_acc=0.6)
    (cell.run_dir / "summary.json").write_text(json.dumps(summary))
    row = result_row(cell, None)
    assert row["top_prediction_share"] == 1.0 and "collapsed" in row["degenerate"] and "majority" in row["degenerate"]


def test_plot_draws_chance_and_majority_on_an_honest_axis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # every cell at the majority rate: the old autoscaled axis spanned 38.66-38.80 and hid it
    rows = []
    for seed, acc in ((1, 0.3866), (2, 0.3880)):
        for noise, rate, kind in (("none", 0.0, "none"), ("symmetric:0.3", 0.3, "symmetric"),
                                  ("asymmetric:0.3", 0.3, "asymmetric")):
            r = _row("ce", noise, seed, acc, kind=kind, rate=rate)
            r.update(chance_rate=1 / 7, majority_rate=0.3866, top_prediction_share=1.0, degenerate="collapsed")
            rows.append(r)
    seen = {}
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: seen.setdefault("fig", fig))  # keep the figure to inspect it
    plot_accuracy_vs_noise(rows, tmp_path / "p.png")
    fig = seen["fig"]
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert lo == 0.0 and hi >= 38.80  # includes chance (14.3%) and the majority rate
        levels = sorted(line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() in (":", "--"))
        assert levels == pytest.approx([100 / 7, 38.66])
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert any(lab.startswith("chance") for lab in labels) and any(lab.startswith("majority") for lab in labels)
    real_close(fig)


def test_y_limits_keep_differences_visible_for_good_models() -> None:
    from dnfer.bench.report import y_limits

    assert y_limits([85.0, 87.0, 14.3, 38.7]) == (0.0, 92.0)  # levels drawn: the axis starts at 0
    assert y_limits([85.0, 87.0]) == (75.0, 92.0)  # no levels known (old CSV): zoom on the data
    assert y_limits([97.0, 99.0]) == (87.0, 100.0)


def test_summary_rows_put_methods_side_by_side_per_noise() -> None:
    from dnfer.bench.report import summary_rows

    def row(method: str, noise: str, seed: int, acc: float | None, status: str = "ok", **kw) -> dict:
        return {"method": method, "noise": noise, "seed": seed, "status": status, "best_val_test_acc": acc,
                "final_test_acc": acc, "selection_precision": kw.get("p"), "selection_recall": kw.get("r"),
                "train_seconds": 10.0 * seed, "degenerate": kw.get("degenerate", "")}

    rows = [row("dnfer_plus", "symmetric:0.3", 1, 0.60, p=0.9, r=0.8), row("dnfer_plus", "symmetric:0.3", 2, 0.70, p=0.8, r=0.9),
            row("ce", "symmetric:0.3", 1, 0.50), row("ce", "symmetric:0.3", 2, None, status="failed"),
            row("ce", "none", 1, 0.80, degenerate="collapsed")]
    table = summary_rows(rows)
    assert [r[:2] for r in table] == [["symmetric:0.3", "dnfer_plus"], ["symmetric:0.3", "ce"], ["none", "ce ⚠"]]
    plus, ce, clean = table
    assert plus[2] == f"65.0 ± {100 * 0.0707107:.1f}" and plus[4] == "85.0 ± 7.1" and plus[6] == "15 ± 7"
    assert ce[2] == "50.0 (1/2)" and ce[4] == "–"  # CE selects nothing; one of two seeds failed
    assert clean[2] == "80.0"
