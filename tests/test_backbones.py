"""Named backbones (``--pretrained dnfer:NAME``): built once on first use, cached by recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

import dnfer.engine.backbones as backbones
from dnfer.engine.backbones import named_backbone, recipe, recipe_key
from dnfer.errors import ConfigError
from dnfer.models.factory import create_model
from dnfer.models.pretrained import load_pretrained

TINY = dict(objective="identity", data="synthetic", model="tiny_cnn", image_size=16, epochs=1, batch_size=8,
            identities=4, images_per_identity=6, seed=0, probe_data=None, precision="fp32", threads=1)


@pytest.fixture()
def tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("DNFER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(backbones.NAMED_BACKBONES, "tiny", dict(TINY))
    return tmp_path / "cache" / "backbones"


def test_first_use_builds_then_the_cache_is_reused(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    model = create_model("tiny_cnn", 7, image_size=16)
    report = load_pretrained(model, "dnfer:tiny", model_name="tiny_cnn")
    assert report.ok and report.loaded == len(model.backbone.state_dict())
    path = named_backbone("tiny", model_name="tiny_cnn", log=said.append)
    assert path.parent.parent == tiny and path.parent.name == f"tiny-{recipe_key(recipe('tiny'))}"
    assert said == []  # cached: nothing built, nothing said

    def no_build(*_a: object, **_k: object) -> None:
        raise AssertionError("rebuilt a cached backbone")

    monkeypatch.setattr(backbones, "pretrain", no_build)
    assert named_backbone("tiny") == path


def test_a_changed_recipe_gets_its_own_folder(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = recipe_key(recipe("tiny"))
    monkeypatch.setitem(backbones.NAMED_BACKBONES, "tiny", dict(TINY, epochs=2))
    assert recipe_key(recipe("tiny")) != key
    monkeypatch.setitem(backbones.NAMED_BACKBONES, "tiny", dict(TINY, threads=2))  # not a weight setting
    assert recipe_key(recipe("tiny")) == key


def test_wrong_model_size_or_name_is_one_clear_error(tiny: Path) -> None:
    with pytest.raises(ConfigError, match="is a tiny_cnn backbone; train with --model tiny_cnn"):
        named_backbone("tiny", model_name="resnet18")
    with pytest.raises(ConfigError, match="--image-size 16"):
        named_backbone("tiny", model_name="tiny_cnn", image_size=32)
    with pytest.raises(ConfigError, match="unknown named backbone; valid: .*dnfer:synthetic-identity"):
        named_backbone("nope")
    assert not tiny.exists()  # nothing built for a refused request
