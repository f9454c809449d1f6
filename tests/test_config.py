"""Config: YAML load, flag overrides, unknown keys and bad values named."""

from __future__ import annotations

import pytest

from dnfer.config import Config, comparable_config
from dnfer.errors import ConfigError
from dnfer.methods.dnfer import DNFERParams


def test_yaml_round_trip_and_overrides(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  noise: symmetric:0.2\ntrain:\n  epochs: 3\n"
                    "method:\n  params: {threshold: ema, threshold_params: {momentum: 0.9}}\n")
    cfg = Config.from_yaml(path)
    assert cfg.data.noise == "symmetric:0.2" and cfg.train.epochs == 3
    assert cfg.method.params["threshold_params"] == {"momentum": 0.9}
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
    cfg.method.params["alpha"] = 1.5
    with pytest.raises(ConfigError, match=r"method\.params\.alpha must be in \[0, 1\], got 1\.5"):
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
    assert (c.optim.name, c.optim.lr, c.optim.head_lr, c.optim.lr_decay) == ("adam", 1e-3, None, 0.95)
    assert c.optim.resolved_head_lr("weights.pth") == pytest.approx(1e-2)  # the paper's 10x head rate
    p = DNFERParams()
    assert (p.alpha, p.warmup_epochs, p.threshold, p.threshold_params) == (0.5, 5, "batch_mean", {})
    assert c.method.name == "dnfer_plus"  # the recommended method; --method dnfer is the paper's
    assert (c.train.batch_size, c.train.epochs) == (128, 40)


#: (method, params, the words of the one error line): every method checks its own options.
BAD_PARAMS = [
    ("dnfer", {"alpha": -0.1}, ["method.params.alpha", "[0, 1]", "-0.1"]),
    ("dnfer", {"warmup_epochs": -1}, ["method.params.warmup_epochs", ">= 0"]),
    ("dnfer", {"warmup_epochs": "many"}, ["method.params.warmup_epochs", "integer"]),
    ("dnfer", {"threshold": "median"}, ["method.params.threshold", "batch_mean", "median"]),
    ("dnfer", {"threshold": "ema", "threshold_params": {"momentum": 1.5}}, ["threshold_params", "momentum"]),
    ("dnfer", {"threshold": "fixed", "threshold_params": {"mommentum": 0.5}}, ["threshold_params", "mommentum"]),
    ("dnfer", {"kl_log_base": 1}, ["method.params.kl_log_base"]),
    ("eac", {"lam": -1}, ["method.params.lam", ">= 0", "-1"]),
    ("eac", {"erase_min": 0.5, "erase_max": 0.2}, ["method.params.erase_max", "0.5"]),
    ("gce", {"q": 0}, ["method.params.q", "(0, 1]"]),
    ("sce", {"alpha": -1}, ["method.params.alpha", ">= 0"]),
    ("sce", {"alpha": 0, "beta": 0}, ["method.params.beta"]),
    ("sce", {"A": 1}, ["method.params.A", "< 0"]),
    ("scn", {"beta": 1.0}, ["method.params.beta", "(0, 1)"]),
    ("scn", {"relabel_scope": "some"}, ["method.params.relabel_scope", "low or all"]),
    ("scn", {"relabel_epoch": 0}, ["method.params.relabel_epoch", ">= 1"]),
    ("rul", {"dropout": 1.0}, ["method.params.dropout", "[0, 1)"]),
    ("rul", {"uncertainty_dim": 0}, ["method.params.uncertainty_dim", ">= 1"]),
    ("coteaching", {"noise_rate": 0.2, "tk": -1}, ["method.params.tk", ">= 0"]),
    ("coteaching", {"noise_rate": 0.2, "peer_init": "none"}, ["method.params.peer_init", "head or all"]),
    ("coteaching", {"noise_rate": 1.0}, ["method.params.noise_rate", "[0, 1)"]),
    ("coteaching", {}, ["coteaching", "--noise-rate"]),
    ("ce", {"alpha": 0.5}, ["'ce'", "'alpha'", "(none)"]),
]


@pytest.mark.parametrize("method,params,words", BAD_PARAMS, ids=[f"{m}-{sorted(p)}" for m, p, _ in BAD_PARAMS])
def test_method_params_are_checked_by_validate(method: str, params: dict, words: list[str]) -> None:
    cfg = Config()
    cfg.method.name, cfg.method.params = method, params
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_method_params_are_typed_from_text_and_noise_rate_reaches_params() -> None:
    from dnfer.methods.base import parse_params
    from dnfer.registry import METHODS

    p = parse_params(METHODS.get("dnfer"), {"alpha": "0.25", "warmup_epochs": "3"})
    assert (p.alpha, p.warmup_epochs) == (0.25, 3) and isinstance(p.warmup_epochs, int)
    assert parse_params(METHODS.get("coteaching"), {}, noise_rate=0.3).noise_rate == 0.3
    assert parse_params(METHODS.get("ce"), {}, noise_rate=0.3) is not None  # ignored by methods without it
    with pytest.raises(ConfigError, match="disagree"):
        parse_params(METHODS.get("coteaching"), {"noise_rate": 0.1}, noise_rate=0.3)


@pytest.mark.parametrize("key", ["alpha", "warmup_epochs", "threshold", "threshold_params"])
def test_old_top_level_method_key_in_a_written_config_says_where_it_goes(tmp_path, key: str) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(f"method:\n  name: dnfer\n  {key}: 1\n")
    with pytest.raises(ConfigError, match=rf"old.yaml: method\.{key} .*method\.params\.{key}"):
        Config.from_yaml(path)
    with pytest.raises(ConfigError, match=rf"method\.params\.{key}"):
        Config().override(f"method.{key}", 1)


def test_saved_config_with_old_method_keys_migrates_silently() -> None:
    """Checkpoints written before the options moved into method.params still load (eval, predict,
    audit): DNFER's move into params (explicit params win), other methods drop them (they ignored them)."""
    old = {"method": {"name": "dnfer", "alpha": 0.3, "warmup_epochs": 2, "threshold": "ema",
                      "threshold_params": {"momentum": 0.9}, "noise_rate": None, "params": {"kl_log_base": 2.0}}}
    cfg = Config.from_dict(old, source="old.pt", saved=True)
    assert cfg.method.params == {"kl_log_base": 2.0, "alpha": 0.3, "warmup_epochs": 2, "threshold": "ema",
                                 "threshold_params": {"momentum": 0.9}}
    cfg.validate()
    sce = {"method": {"name": "sce", "alpha": 0.5, "warmup_epochs": 5, "threshold": "batch_mean",
                      "threshold_params": {}, "params": {"alpha": 0.2}}}
    assert Config.from_dict(sce, saved=True).method.params == {"alpha": 0.2}
    with pytest.raises(ConfigError, match="method.params.alpha"):
        Config.from_dict(old, source="old.yaml")  # not saved: a hand-written file gets the advice


def test_comparable_config_resolves_defaults_so_old_and_new_layouts_compare_equal() -> None:
    old = {"method": {"name": "dnfer", "alpha": 0.5, "warmup_epochs": 5, "threshold": "batch_mean",
                      "threshold_params": {}, "noise_rate": None, "params": {}}}
    new = Config()
    new.method.name = "dnfer"
    assert comparable_config(old) == comparable_config(new.to_dict())
    assert comparable_config(old) != comparable_config(Config().to_dict())  # the default is dnfer_plus
    changed = new
    changed.method.params["alpha"] = 0.4
    assert comparable_config(old) != comparable_config(changed.to_dict())
