"""Every kind of user-typed input that can be wrong gets ONE clear line and exit code 2.

Each case runs ``dnfer train`` in-process (``dnfer.cli.main``) and checks: exit code 2, exactly
one line on stderr, naming the offending option/value, no traceback. The last test does one
case in a real subprocess to check the console behaviour end to end.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dnfer.cli import main
from dnfer.registry import METHODS

TINY = ["--model", "tiny_cnn", "--image-size", "16", "--data-option", "n_train=96", "--data-option", "n_test=32",
        "--batch-size", "16", "--epochs", "6", "--precision", "fp32", "--threads", "1", "--no-progress"]
# 6 epochs: more than DNFER's default 5 of warm-up (no case here trains)


def _yaml(text: str) -> Callable[[Path], list[str]]:
    def make(tmp: Path) -> list[str]:
        (tmp / "c.yaml").write_text(text)
        return ["--config", str(tmp / "c.yaml")]

    return make


def _unwritable_out(tmp: Path) -> list[str]:
    (tmp / "a_file").write_text("")
    return ["--out", str(tmp / "a_file" / "run")]  # a directory cannot live inside a file (works as root too)


# (id, extra arguments or a factory of them, words the one error line must contain)
CASES: list[tuple[str, list[str] | Callable[[Path], list[str]], list[str]]] = [
    ("noise-unknown-kind", ["--noise", "gaussian:0.2"], ["gaussian"]),
    ("noise-without-rate", ["--noise", "symmetric"], ["symmetric"]),
    ("noise-rate-out-of-range", ["--noise", "symmetric:1.5"], ["1.5"]),
    ("alpha-out-of-range", ["--alpha", "1.5"], ["method.params.alpha", "[0, 1]"]),
    ("alpha-for-a-method-without-it", ["--method", "gce", "--alpha", "0.2"], ["--alpha", "'gce'", "'alpha'", "dnfer"]),
    # SCE has an option named alpha (its CE weight), but --alpha is DNFER's consistency weight
    ("alpha-shortcut-for-sce", ["--method", "sce", "--alpha", "0.2"], ["--alpha", "'sce'", "dnfer", "--method-param"]),
    ("warmup-for-a-method-without-it", ["--method", "ce", "--warmup-epochs", "2"], ["--warmup-epochs", "'ce'", "dnfer"]),
    ("threshold-for-a-method-without-it", ["--method", "sce", "--threshold", "ema"], ["--threshold", "'sce'", "dnfer"]),
    ("threshold-param-for-a-method-without-it", ["--method", "eac", "--threshold-param", "value=0.5"],
     ["--threshold-param", "'eac'", "threshold_params", "dnfer"]),
    ("method-param-out-of-range", ["--method", "eac", "--set", "method.params.lam=-1"], ["method.params.lam", ">= 0", "-1"]),
    ("method-param-bad-type", ["--method", "gce", "--method-param", "q=big"], ["method.params.q", "number", "big"]),
    ("set-old-method-key", ["--set", "method.alpha=0.3"], ["method.alpha", "method.params.alpha"]),
    ("yaml-old-method-key", _yaml("method:\n  warmup_epochs: 3\n"), ["c.yaml", "method.params.warmup_epochs"]),
    ("warmup-not-below-epochs", ["--warmup-epochs", "5", "--epochs", "3"],
     ["method.params.warmup_epochs (5) >= train.epochs (3): DNFER would never select a sample; "
      "lower --warmup-epochs or raise --epochs"]),
    ("noise-rate-estimate-out-of-range", ["--method", "dnfer", "--noise-rate", "1.2"], ["noise_rate", "1.2"]),
    ("lr-not-positive", ["--lr", "0"], ["optim.lr", "> 0"]),
    ("epochs-zero", ["--epochs", "0"], ["train.epochs", ">= 1"]),
    ("grad-clip-negative", ["--grad-clip", "-1"], ["grad_clip"]),
    ("save-every-negative", ["--save-every-steps", "-2"], ["save_every_steps"]),
    ("val-fraction-one", ["--val-fraction", "1"], ["val_fraction"]),
    ("batch-larger-than-data", ["--batch-size", "4096"], ["batch_size", "4096"]),
    ("unknown-method", ["--method", "dnferr"], ["dnferr", "dnfer"]),
    ("unknown-model", ["--model", "resnet19"], ["resnet19", "resnet18"]),
    ("unknown-dataset", ["--data", "imagenet:/tmp"], ["imagenet", "rafdb"]),
    ("unknown-threshold", ["--threshold", "median"], ["method.params.threshold", "median", "batch_mean"]),
    ("threshold-option-out-of-range", ["--threshold", "ema", "--threshold-param", "momentum=1.5"], ["momentum"]),
    ("unknown-method-param", ["--method-param", "temperature=2"], ["temperature", "kl_log_base"]),
    ("missing-data-path", ["--data", "rafdb:/nonexistent/raf-basic"], ["/nonexistent/raf-basic", "does not exist"]),
    ("missing-noise-file", ["--noise-file", "/nonexistent/noise.txt"], ["/nonexistent/noise.txt"]),
    ("unwritable-out", _unwritable_out, ["--out", "is a file, not a folder"]),
    ("resume-without-out", ["--resume"], ["--resume", "--out"]),
    ("fp16-on-cpu", ["--device", "cpu", "--precision", "fp16"], ["fp16"]),
    ("set-unknown-key", ["--set", "train.epochz=3"], ["train.epochz", "epochs"]),
    ("set-bad-type", ["--set", "train.epochs=many"], ["train.epochs", "integer"]),
    ("set-not-key-value", ["--set", "train.epochs"], ["--set", "KEY=VALUE"]),
    ("data-option-not-key-value", ["--data-option", "n_train"], ["--data-option", "KEY=VALUE"]),
    ("yaml-syntax", _yaml("train:\n  epochs: [1,\n"), ["c.yaml", "not valid YAML"]),
    ("yaml-unknown-key", _yaml("train:\n  epochz: 3\n"), ["c.yaml", "train.epochz"]),
    ("yaml-not-mapping", _yaml("- 1\n- 2\n"), ["c.yaml", "mapping"]),
    ("yaml-missing-file", lambda tmp: ["--config", str(tmp / "nope.yaml")], ["nope.yaml", "does not exist"]),
]


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return code, err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(case, tmp_path: Path, capsys) -> None:
    _, extra, words = case
    extra = extra(tmp_path) if callable(extra) else extra
    out = [] if "--out" in extra or "--resume" in extra else ["--out", str(tmp_path / "run")]
    code, err = _run(["train", *TINY, *out, *extra], capsys)
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("dnfer train: error: ") and "Traceback" not in err[0]
    for w in words:
        assert w in err[0], (w, err[0])
    assert not (tmp_path / "run" / "last.pt").exists()  # nothing trained


@pytest.mark.parametrize("extra,words", [([], ["MASTER_ADDR", "torchrun"]), (["--sync-bn"], ["--sync-bn", "CUDA"])],
                         ids=["world-size-without-torchrun", "sync-bn-on-cpu"])
def test_distributed_environment_errors(extra: list[str], words: list[str], tmp_path: Path, capsys, monkeypatch) -> None:
    """WORLD_SIZE set by hand (not by torchrun), and --sync-bn on CPU processes."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    code, err = _run(["train", *TINY, "--device", "cpu", "--out", str(tmp_path / "run"), *extra], capsys)
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], (w, err[0])


def test_coteaching_without_noise_rate(tmp_path: Path, capsys) -> None:
    if "coteaching" not in METHODS:
        pytest.skip("co-teaching is not registered yet")
    code, err = _run(["train", *TINY, "--out", str(tmp_path / "run"), "--method", "coteaching"], capsys)
    assert code == 2 and len(err) == 1 and "--noise-rate" in err[0] and "coteaching" in err[0], err


def test_console_script_prints_one_line_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("optim:\n  lr: [oops\n")
    res = subprocess.run([sys.executable, "-m", "dnfer", "train", "--config", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "c.yaml:" in lines[0] and "not valid YAML" in lines[0] and "Traceback" not in res.stderr, res.stderr


#: Errors in the method's options: refused by Config.validate, before the run directory is made or
#: any image is read.
EARLY = [c for c in CASES if c[0] in ("alpha-out-of-range", "alpha-for-a-method-without-it", "alpha-shortcut-for-sce", "method-param-out-of-range",
                                      "method-param-bad-type", "unknown-threshold", "threshold-option-out-of-range",
                                      "unknown-method-param", "set-old-method-key", "warmup-not-below-epochs")]


@pytest.mark.parametrize("case", EARLY, ids=[c[0] for c in EARLY])
def test_method_option_errors_come_before_any_data(case, tmp_path: Path, capsys, monkeypatch) -> None:
    import dnfer.data.spec
    import dnfer.engine.trainer

    def no_data(*_a, **_k):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(dnfer.data.spec, "load_data_spec", no_data)
    monkeypatch.setattr(dnfer.engine.trainer, "prepare_data", no_data)
    _, extra, words = case
    code, err = _run(["train", *TINY, "--out", str(tmp_path / "run"), *extra], capsys)
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    for w in words:
        assert w in err[0], (w, err[0])
    assert not (tmp_path / "run").exists()  # refused before the run directory was made


def test_method_option_error_in_a_real_process(tmp_path: Path) -> None:
    """``dnfer train --method eac --set method.params.lam=-1``: exit 2 with one line, and no run
    directory (nothing was read or written)."""
    res = subprocess.run([sys.executable, "-m", "dnfer", "train", "--method", "eac", "--set", "method.params.lam=-1",
                          "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "method.params.lam" in lines[0] and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "run").exists()
