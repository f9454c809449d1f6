"""One CLI: --out for results, RUN_DIR for runs, --json on every command that prints a result,
exit codes linked from every --help, deprecated spellings that still work, progress bars only on a terminal."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dnfer.cli import build_parser, main
from dnfer.commands._common import EXIT_CODES_EPILOG

TINY_TRAIN = ["--model", "tiny_cnn", "--image-size", "16", "--epochs", "1", "--batch-size", "16",
              "--data-option", "n_train=64", "--data-option", "n_test=32", "--precision", "fp32", "--threads", "1",
              "--warmup-epochs", "0", "--noise", "symmetric:0.3", "--no-progress"]
#: Commands that print a result, so must offer --json (predict's records are JSON lines already).
JSON_COMMANDS = ("train", "pretrain", "eval", "noise", "synth", "prepare", "bench", "audit", "report", "export")


def _json(capsys: pytest.CaptureFixture[str]) -> dict:
    """The one JSON object a --json command printed on stdout (nothing else may be there)."""
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli") / "run"


def _subparsers() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_every_help_links_the_exit_code_table() -> None:
    for name, p in _subparsers().items():
        text = p.format_help()
        assert "docs/reliability.md" in " ".join(text.split()), name
        assert p.epilog.endswith(EXIT_CODES_EPILOG)


def test_result_commands_offer_json_and_writers_use_out() -> None:
    parsers = _subparsers()
    for name in JSON_COMMANDS:
        assert "--json" in parsers[name]._option_string_actions, name
    for name in ("train", "pretrain", "noise", "synth", "prepare", "bench", "audit", "report", "export", "predict"):
        assert "--out" in parsers[name]._option_string_actions, name
    for name in ("audit", "report"):  # the run folder is positional for both
        assert any(a.dest == "run_dir" and not a.option_strings for a in parsers[name]._actions), name
    for name in ("audit", "report", "prepare", "export", "bench", "train", "pretrain"):
        assert "--no-progress" in parsers[name]._option_string_actions, name


def test_train_json_then_audit_report_eval_export_json(run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *TINY_TRAIN, "--out", str(run), "--json"]) == 0
    summary = _json(capsys)
    assert summary == json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["best_val_test_acc"] <= 1.0

    assert main(["audit", str(run), "--out", str(tmp_path / "issues.csv"), "--top", "3", "--json",
                 "--no-progress"]) == 0
    audit = _json(capsys)
    assert audit["out"] == str(tmp_path / "issues.csv") and audit["score"] == "posterior"
    lines = (tmp_path / "issues.csv").read_text().splitlines()
    assert audit["n"] == len(lines) - 1 and len(audit["top"]) == 3
    assert audit["top"][0]["name"] == lines[1].split(",")[1]  # most suspect first, as in the CSV
    assert audit["quality"] is not None and 0.0 <= audit["quality"]["auroc"] <= 1.0  # synthetic noise: truth known

    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "--top", "4", "--json"]) == 0
    rep = _json(capsys)
    assert rep["path"] == str(tmp_path / "r.html") and rep["bytes"] == (tmp_path / "r.html").stat().st_size

    assert main(["eval", "--checkpoint", str(run / "best.pt"), "--json"]) == 0
    ev = _json(capsys)
    assert ev["n_test"] == 32 and 0.0 <= ev["test_acc"] <= 1.0

    out = tmp_path / "m.torchscript.pt"
    assert main(["export", "--checkpoint", str(run / "best.pt"), "--format", "torchscript", "--out", str(out),
                 "--json", "--no-progress"]) == 0
    ex = _json(capsys)
    assert ex["path"] == str(out) and out.is_file() and ex["max_abs_diff"] <= 1e-4


def test_audit_run_dir_spellings(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not (run / "summary.json").is_file():
        assert main(["train", *TINY_TRAIN, "--out", str(run)]) == 0
    capsys.readouterr()
    out = tmp_path / "a.csv"
    assert main(["audit", "--run", str(run), "--out", str(out), "--top", "0"]) == 0  # the old spelling still works
    err = capsys.readouterr().err.strip()
    assert err == "dnfer audit: note: --run DIR is deprecated; use `dnfer audit RUN_DIR`"
    assert out.is_file()
    assert main(["audit", str(run), "--run", str(run)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["audit"]) == 2
    err = capsys.readouterr().err.strip()
    assert "RUN_DIR" in err and "--checkpoint" in err and len(err.splitlines()) == 1
    assert main(["audit", str(run), "--checkpoint", str(run / "last.pt")]) == 2
    assert "not both" in capsys.readouterr().err


def test_predict_out_and_deprecated_output(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not (run / "summary.json").is_file():
        assert main(["train", *TINY_TRAIN, "--out", str(run)]) == 0
    img = tmp_path / "face.png"
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(img)
    capsys.readouterr()
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    assert main(["predict", "--checkpoint", str(run / "best.pt"), str(img), "--no-detect", "--out", str(new), "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["predict", "--checkpoint", str(run / "best.pt"), str(img), "--no-detect", "-o", str(old), "-q"]) == 0
    assert capsys.readouterr().err.strip() == "dnfer predict: note: -o/--output is deprecated; use --out"
    assert new.read_text() == old.read_text() and json.loads(new.read_text())["status"] == "ok"
    assert main(["predict", "--checkpoint", str(run / "best.pt"), str(img), "--out", str(new), "--output",
                 str(old)]) == 2


def test_noise_synth_prepare_bench_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"train_{i:05d}.jpg {1 + i % 7}\n" for i in range(200)) + "test_0001.jpg 3\n")
    assert main(["noise", "--labels", str(labels), "--out", str(tmp_path / "n.txt"), "--noise", "symmetric:0.2",
                 "--json"]) == 0
    st = _json(capsys)
    noisy = [ln.split()[1] for ln in (tmp_path / "n.txt").read_text().splitlines()]
    clean = [ln.split()[1] for ln in labels.read_text().splitlines()[:200]]
    assert st["rows"] == 200 and st["flipped"] == sum(a != b for a, b in zip(noisy, clean, strict=True))
    assert st["realised_rate"] == pytest.approx(st["flipped"] / 200)

    assert main(["synth", "--out", str(tmp_path / "syn"), "--n", "14", "--image-size", "16", "--layout", "folder",
                 "--json"]) == 0
    sy = _json(capsys)
    assert sy["n_train"] + sy["n_test"] == 14 and sy["out"] == str(tmp_path / "syn")
    assert len(list((tmp_path / "syn").rglob("*.png"))) == 14

    assert main(["prepare", "--data", f"folder:{tmp_path / 'syn'}", "--image-size", "8", "--out",
                 str(tmp_path / "cache"), "--json", "--no-progress"]) == 0
    pr = _json(capsys)
    assert pr["status"] == "built" and sum(c["total"] for c in pr["counts"].values()) == 14 and pr["bytes"] > 0
    assert main(["prepare", "--data", f"folder:{tmp_path / 'syn'}", "--image-size", "8", "--out",
                 str(tmp_path / "cache"), "--json"]) == 0
    assert _json(capsys)["status"] == "up to date"

    bench = ["bench", "--methods", "ce", "--noise", "none", "--seeds", "1", "--out", str(tmp_path / "b"),
             "--runner", "inprocess"]
    assert main([*bench, "--dry-run", "--json"]) == 0
    assert _json(capsys)["cells"] == [{"cell": "ce/none/seed1", "state": "to run"}]
    assert main([*bench, "--report-only", "--json"]) == 0
    be = _json(capsys)
    assert be["cells"] == 1 and be["rows"][0]["status"] == "pending" and Path(be["results_csv"]).is_file()


def test_pretrain_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["pretrain", "--objective", "identity", "--model", "tiny_cnn", "--image-size", "16", "--epochs", "1",
            "--batch-size", "8", "--identities", "3", "--images-per-identity", "4", "--precision", "fp32",
            "--threads", "1", "--probe-data", "none", "--device", "cpu", "--no-progress",
            "--out", str(tmp_path / "p"), "--json"]
    assert main(argv) == 0
    summary = _json(capsys)
    assert summary == json.loads((tmp_path / "p" / "summary.json").read_text())


def test_progress_bars_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import dnfer.progress as progress

    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: False)
    assert progress.progress_bar(3, "x", enabled=True).disable  # redirected stderr: no bar
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    bar = progress.progress_bar(3, "x", enabled=True)
    assert not bar.disable
    bar.close()
    assert progress.progress_bar(3, "x", enabled=False).disable  # --no-progress


def test_train_log_redirected_to_a_file_has_epoch_lines_not_bars(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: training's tqdm bars ignored whether stderr was a terminal, so a redirected
    log filled with carriage returns and lost the per-epoch lines."""
    argv = ["train", *[a for a in TINY_TRAIN if a != "--no-progress"], "--epochs", "2", "--out", str(tmp_path / "r")]
    assert main(argv) == 0  # pytest's captured stderr is not a terminal
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "\r" not in captured.out
    epochs = re.findall(r"^epoch +(\d+) \| loss", captured.out + captured.err, flags=re.M)
    assert epochs == ["1", "2"]
