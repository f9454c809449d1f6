"""Config: YAML load, flag overrides, unknown keys and bad values named."""

from __future__ import annotations

import pytest

from dnfer.config import Config
from dnfer.errors import ConfigError


def test_yaml_round_trip_and_overrides(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  noise: symmetric:0.2\ntrain:\n  epochs: 3\nmethod:\n  threshold_params: {momentum: 0.9}\n")
    cfg = Config.from_yaml(path)
    assert cfg.data.noise == "symmetric:0.2" and cfg.train.epochs == 3
    assert cfg.method.threshold_params == {"momentum": 0.9}
    cfg.override("train.batch_size", "32")
    assert cfg.train.batch_size == 32
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert Config.from_yaml(again) == cfg


def test_unknown_key_is_named(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epochz.*epochs"):
        Config.from_yaml(path)
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'"):
        Config().override("optim.lrr", 1)
    with pytest.raises(ConfigError, match="'bogus'"):
        Config.from_dict({"bogus": {}})


def test_bad_types_and_ranges(tmp_path) -> None:
    with pytest.raises(ConfigError, match="expected an integer"):
        Config.from_dict({"train": {"epochs": "many"}})
    cfg = Config()
    cfg.method.alpha = 1.5
    with pytest.raises(ConfigError, match="alpha"):
        cfg.validate()
    cfg = Config()
    cfg.data.noise = "symmetric:1.2"
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        cfg.validate()
    cfg = Config()
    cfg.train.precision = "fp8"
    with pytest.raises(ConfigError, match="precision"):
        cfg.validate()


def test_invalid_yaml_names_file_and_line(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match="c.yaml"):
        Config.from_yaml(path)


def test_paper_defaults() -> None:
    c = Config()
    assert (c.optim.name, c.optim.lr, c.optim.head_lr, c.optim.lr_decay) == ("adam", 1e-3, 1e-2, 0.95)
    assert (c.method.alpha, c.method.warmup_epochs, c.method.threshold) == (0.5, 5, "batch_mean")
    assert (c.train.batch_size, c.train.epochs) == (128, 40)
