"""Pretrained-weight loading: MS-Celeb key layout, torchvision cache, mismatches, bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from dnfer.errors import ConfigError
from dnfer.models.factory import create_model
from dnfer.models.pretrained import load_pretrained


def _resnet18_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).state_dict()


def _backbone_keys(model: torch.nn.Module) -> list[str]:
    return [k for k in model.state_dict() if k.startswith("backbone.")]


def _msceleb_file(tmp_path: Path, state: dict[str, torch.Tensor]) -> Path:
    """The layout of res18_naive.pth_MSceleb.tar: {'state_dict': {'module.<key>': ...}} plus fc.* and feature.*."""
    sd = {f"module.{k}": v for k, v in state.items()}
    sd["module.feature.weight"] = torch.randn(512, 512)
    sd["module.feature.bias"] = torch.randn(512)
    sd["module.fc.weight"] = torch.randn(12000, 512)[:8]  # a classifier of another class count
    sd["module.fc.bias"] = torch.randn(8)
    path = tmp_path / "res18_naive.pth_MSceleb.tar"
    torch.save({"epoch": 30, "arch": "res18", "state_dict": sd, "optimizer": {}}, path)
    return path


def test_msceleb_layout_reports_counts_and_loads_values(tmp_path: Path) -> None:
    state = _resnet18_state(1)
    path = _msceleb_file(tmp_path, state)
    model = create_model("resnet18", 7, image_size=32)
    head_before = model.head.weight.clone()
    report = load_pretrained(model, path)
    n_backbone = len(_backbone_keys(model))
    assert report.loaded == n_backbone == len(state) - 2  # everything but torchvision's own fc.weight/bias
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatch == []
    assert sorted(report.skipped_classifier) == ["fc.bias", "fc.weight", "feature.bias", "feature.weight"]
    assert f"loaded {n_backbone} tensors, missing 0, unexpected 0" in report.summary()
    msd = model.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(msd[f"backbone.{k}"], v), k
    assert torch.equal(model.head.weight, head_before)  # the classifier is never loaded


def test_mismatch_beyond_classifier_is_error_unless_allowed(tmp_path: Path) -> None:
    state = _resnet18_state(2)
    del state["layer4.1.conv2.weight"]  # a missing backbone tensor
    state["extra.weight"] = torch.zeros(3)  # an unexpected one
    path = _msceleb_file(tmp_path, state)
    with pytest.raises(ConfigError, match="missing 1, unexpected 1.*--allow-partial-pretrained"):
        load_pretrained(create_model("resnet18", 7, image_size=32), path)
    model = create_model("resnet18", 7, image_size=32)
    report = load_pretrained(model, path, allow_partial=True)
    assert report.missing == ["backbone.layer4.1.conv2.weight"]
    assert report.unexpected == ["extra.weight"]
    assert report.loaded == len(_backbone_keys(model)) - 1
    assert torch.equal(model.state_dict()["backbone.conv1.weight"], state["conv1.weight"])


def test_shape_mismatch_and_wrong_architecture(tmp_path: Path) -> None:
    state = _resnet18_state(3)
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # a grayscale stem
    path = tmp_path / "gray.pth"
    torch.save(state, path)
    with pytest.raises(ConfigError, match="shape-mismatched 1"):
        load_pretrained(create_model("resnet18", 7, image_size=32), path)
    with pytest.raises(ConfigError, match="no tensor fits the model"):
        load_pretrained(create_model("tiny_cnn", 7, image_size=32), path, allow_partial=True)


def test_dnfer_checkpoint_as_pretrained_skips_its_head(tmp_path: Path) -> None:
    src = create_model("tiny_cnn", 5, image_size=32)
    path = tmp_path / "ck.pt"
    torch.save({"format": "dnfer-checkpoint", "model": src.state_dict()}, path)
    dst = create_model("tiny_cnn", 7, image_size=32)  # another class count: the head cannot load
    report = load_pretrained(dst, path)
    assert report.ok and report.skipped_classifier == ["head.weight", "head.bias"]
    assert report.loaded == len(_backbone_keys(dst))


def test_old_checkpoints_without_bn_counters_load(tmp_path: Path) -> None:
    state = {k: v for k, v in _resnet18_state(4).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = create_model("resnet18", 7, image_size=32)
    report = load_pretrained(model, path)
    assert report.ok and len(report.ignored_counters) == 20  # resnet18 has 20 BatchNorm layers


def test_torchvision_named_weights_from_local_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("DNFER_OFFLINE", "1")
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    expected = tmp_path / "torch" / "hub" / "checkpoints" / Path(url).name
    model = create_model("resnet18", 7, image_size=32)
    with pytest.raises(ConfigError, match="not in the torch hub cache and downloading is off .--offline or DNFER_OFFLINE=1.") as e:
        load_pretrained(model, "torchvision:IMAGENET1K_V1", model_name="resnet18")
    assert str(expected) in str(e.value) and url in str(e.value)
    assert not expected.exists()  # nothing was downloaded
    state = _resnet18_state(5)
    expected.parent.mkdir(parents=True)
    torch.save(state, expected)
    for spec, name in (("torchvision:IMAGENET1K_V1", "resnet18"), ("torchvision:DEFAULT", "resnet18"),
                       ("torchvision:ResNet18_Weights.IMAGENET1K_V1", None)):
        model = create_model("resnet18", 7, image_size=32)
        report = load_pretrained(model, spec, model_name=name)
        assert report.ok and report.loaded == len(_backbone_keys(model))
        assert report.skipped_classifier == ["fc.weight", "fc.bias"]
        assert torch.equal(model.state_dict()["backbone.layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    with pytest.raises(ConfigError, match="valid are DEFAULT, IMAGENET1K_V1"):
        load_pretrained(model, "torchvision:NOPE", model_name="resnet18")
    with pytest.raises(ConfigError, match="needs a torchvision model"):
        load_pretrained(create_model("tiny_cnn", 7), "torchvision:IMAGENET1K_V1", model_name="tiny_cnn")


@pytest.mark.parametrize("content, match", [
    (None, "does not exist"), (b"", "empty"), (b"not a torch file", "not a readable torch checkpoint"),
])
def test_bad_files(tmp_path: Path, content: bytes | None, match: str) -> None:
    path = tmp_path / "w.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        load_pretrained(create_model("tiny_cnn", 7), path)


def test_not_a_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save({"epoch": 3, "note": "no weights"}, path)
    with pytest.raises(ConfigError, match="no state_dict found"):
        load_pretrained(create_model("tiny_cnn", 7), path)


def test_trainer_passes_model_name_and_logs_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dnfer.config import Config
    from dnfer.engine.build import build_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = tmp_path / "hub" / "checkpoints" / Path(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url).name
    path.parent.mkdir(parents=True)
    torch.save(_resnet18_state(6), path)
    cfg = Config()
    cfg.model.name, cfg.model.pretrained = "resnet18", "torchvision:IMAGENET1K_V1"
    lines: list[str] = []
    model = build_model(cfg, 7, 32, lines.append)
    n = len(_backbone_keys(model))
    assert any(f"loaded {n} tensors, missing 0, unexpected 0" in ln for ln in lines), lines


def test_timm_weights_from_local_hf_cache_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("huggingface_hub")
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("DNFER_OFFLINE", "1")
    model = create_model("timm:resnet18", 7, image_size=32)
    with pytest.raises(ConfigError, match="timm/resnet18.a1_in1k.*not in the Hugging Face cache"):
        load_pretrained(model, "timm", model_name="timm:resnet18")
    tmp_path = tmp_path / "hf" / "hub"
    torch.manual_seed(7)
    state = timm.create_model("resnet18", pretrained=False).state_dict()  # with its 1000-class fc
    repo = tmp_path / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / "abc123" / "model.safetensors"))
    report = load_pretrained(model, "timm", model_name="timm:resnet18")
    assert report.ok and report.loaded == len(_backbone_keys(model)) == len(state) - 2
    assert sorted(report.skipped_classifier) == ["fc.bias", "fc.weight"]  # safetensors sorts keys
    assert torch.equal(model.state_dict()["backbone.layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])
    # the API takes the same cached file (timm loads it itself)
    api = create_model("timm:resnet18", 7, image_size=32, weights="timm")
    assert torch.equal(api.state_dict()["backbone.layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])
    with pytest.raises(ConfigError, match="needs --model timm:NAME"):
        load_pretrained(create_model("resnet18", 7), "timm", model_name="resnet18")
