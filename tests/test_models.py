"""Model factory: every registered model's shapes, resnet10_slim's layout, memory-format invariance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dnfer.engine.device import default_channels_last
from dnfer.errors import ConfigError
from dnfer.models.factory import FEROutput, create_model
from dnfer.registry import MODELS


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
    assert sum(p.numel() for p in model.parameters()) == _slim_parameter_count(32, 7)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_pool_before_relu_is_exact_even_with_ties(dtype: torch.dtype, fmt: torch.memory_format) -> None:
    """max(relu(t)) == relu(max(t)) element for element, and the gradients agree bit for bit,
    including windows that tie (all-negative windows tie at 0 after the ReLU; integer inputs
    make positive ties too)."""
    t = torch.randint(-3, 4, (4, 8, 12, 12), generator=torch.Generator().manual_seed(0)).to(dtype)
    t = t.contiguous(memory_format=fmt)
    pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    results = []
    for first, second in ((nn.ReLU(), pool), (pool, nn.ReLU())):
        x = t.clone().requires_grad_(True)
        y = second(first(x))
        y.backward(torch.arange(y.numel(), dtype=dtype).view_as(y) % 5 + 1)  # distinct-ish upstream grads
        results.append((y.detach(), x.grad))
    (y0, g0), (y1, g1) = results
    assert torch.equal(y0, y1)
    assert torch.equal(g0, g1)
    assert (g0 != 0).any() and (y0 == 0).any()  # the case is not trivial: some gradient, some ties at 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resnet_stem_order_matches_torchvision_bit_for_bit(precision: str) -> None:
    """dnfer's ResNet pools before the stem's ReLU; torchvision's forward does ReLU then pool.
    Same weights, same batch (training mode): feature maps and every gradient are identical."""
    import torchvision

    assert list(create_model("resnet18", 7, image_size=64).backbone._modules)[:4] == ["conv1", "bn1", "maxpool", "relu"]
    torch.manual_seed(0)
    tv = torchvision.models.resnet18()
    ours = create_model("resnet18", 7, image_size=64)
    ours.backbone.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    captured: dict[str, torch.Tensor] = {}
    tv.layer4.register_forward_hook(lambda _m, _i, out: captured.__setitem__("maps", out))
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    outs = []
    for net, run in ((tv, lambda inp: (tv(inp), captured["maps"])[1]), (ours.backbone, ours.backbone)):
        inp = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            maps = run(inp)
        maps.float().square().sum().backward()
        grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        outs.append((maps.detach(), inp.grad, grads))
    (m0, gx0, gp0), (m1, gx1, gp1) = outs
    assert torch.equal(m0, m1)
    assert torch.equal(gx0, gx1)
    assert set(gp1) <= set(gp0) and len(gp1) == len([n for n in gp0 if not n.startswith("fc.")]) > 0
    assert all(torch.equal(gp0[n], gp1[n]) for n in gp1)
