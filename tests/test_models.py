"""Model factory: every registered model's shapes, resnet10_slim's layout, memory-format invariance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dnfer.engine.device import default_channels_last
from dnfer.errors import ConfigError
from dnfer.models.factory import FEROutput, count_parameters, create_model
from dnfer.registry import MODELS, load_builtins

load_builtins()


@pytest.mark.parametrize("name", sorted(MODELS.names()))
def test_every_registered_model_maps_images_to_logits_features_and_maps(name: str) -> None:
    model = create_model(name, 5, image_size=48).eval()
    out = model(torch.randn(3, 3, 48, 48), return_features=True)
    assert isinstance(out, FEROutput)
    assert out.logits.shape == (3, 5)
    assert out.features.shape == (3, model.feature_dim)
    assert out.maps.shape[:2] == (3, model.feature_dim)
    # features are the global average of the maps, logits the head of the features
    assert torch.allclose(out.features, out.maps.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(out.logits, model.head(out.features), atol=1e-5)


def _slim_parameter_count(width: int, classes: int) -> int:
    """Hand count: 7x7 stem, one BasicBlock per stage (two 3x3 convs, two BNs, 1x1+BN shortcut
    where the width doubles), linear head."""
    n = 3 * width * 49 + 2 * width  # stem conv + BN
    n += 2 * (width * width * 9) + 2 * 2 * width  # stage 1: no shortcut
    cin = width
    for cout in (2 * width, 4 * width, 8 * width):
        n += cin * cout * 9 + cout * cout * 9 + 2 * 2 * cout + cin * cout + 2 * cout
        cin = cout
    return n + cin * classes + classes


def test_resnet10_slim_layout_and_initialisation() -> None:
    torch.manual_seed(0)
    model = create_model("resnet10_slim", 7, image_size=64)
    assert count_parameters(model) == _slim_parameter_count(32, 7)
    assert model.feature_dim == 256
    # 64 px: stem /2, max-pool /2, three stride-2 stages -> a 2x2 map
    assert model(torch.randn(2, 3, 64, 64), return_features=True).maps.shape == (2, 256, 2, 2)
    # torchvision's ResNet init (Kaiming normal, fan_out) on the rebuilt convolutions:
    # std = sqrt(2 / (out_channels * k * k)); PyTorch's default init would be ~3x smaller.
    conv = model.backbone.layer4[0].conv2
    want = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(want, rel=0.05)
    with pytest.raises(ConfigError, match="no pretrained weights"):
        create_model("resnet10_slim", 7, weights="IMAGENET1K_V1")


@pytest.mark.parametrize("name", ["resnet10_slim", "resnet18", "tiny_cnn"])
def test_channels_last_changes_speed_not_results(name: str) -> None:
    """The trainer's default memory format on CPU must not change a training step's numbers."""
    assert default_channels_last(torch.device("cpu"))
    x, y = torch.randn(4, 3, 40, 40, generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 2, 1])
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        model = create_model(name, 3, image_size=40).to(memory_format=fmt)
        loss = nn.functional.cross_entropy(model(x.contiguous(memory_format=fmt)), y)
        loss.backward()
        grads.append((loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    # The two layouts use different oneDNN kernels, which round differently; where two max-pool
    # inputs nearly tie, that can move a gradient to the neighbouring pixel (measured: relative
    # difference 5e-6 typically, up to 7e-3 for some inputs). A layout bug gives O(1).
    g0, g1 = grads[0][1], grads[1][1]
    assert ((g0 - g1).norm() / g0.norm()).item() < 2e-2
