"""The matmul weight gradient for small-map convolutions (engine.conv_grad) and the fused optimiser."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import tiny_config
from torch import nn

from dnfer.config import Config
from dnfer.engine import conv_grad
from dnfer.engine.conv_grad import (
    MAX_OUTPUT_PIXELS,
    SmallMapConv2d,
    im2col_weight_grad,
    use_matmul_weight_grad,
    wants_matmul_weight_grad,
)
from dnfer.engine.device import resolve_precision
from dnfer.errors import ConfigError
from dnfer.models.factory import create_model
from dnfer.registry import load_builtins

load_builtins()
CPU = torch.device("cpu")


@pytest.mark.parametrize(("shape", "out_ch", "kernel", "stride", "padding"), [
    ((3, 5, 9, 7), 4, (3, 3), (1, 1), (1, 1)),     # ResNet 3x3, odd sizes
    ((2, 3, 11, 10), 6, (7, 7), (2, 2), (3, 3)),   # ResNet stem
    ((2, 4, 8, 8), 5, (1, 1), (2, 2), (0, 0)),     # ResNet downsample shortcut
    ((2, 4, 6, 9), 3, (3, 1), (2, 1), (1, 0)),     # non-square everything
    ((1, 2, 5, 5), 2, (5, 5), (1, 1), (0, 0)),     # kernel as large as the input: 1x1 output
])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_im2col_weight_grad_equals_autograd(shape, out_ch, kernel, stride, padding, layout) -> None:
    """In float64 the matmul formulation is the convolution's weight gradient, exactly (up to rounding)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, generator=g).contiguous(memory_format=layout)
    w = torch.randn(out_ch, shape[1], *kernel, dtype=torch.float64, generator=g).requires_grad_()
    y = F.conv2d(x, w, stride=stride, padding=padding)
    grad_out = torch.randn(y.shape, dtype=torch.float64, generator=g).contiguous(memory_format=layout)
    (expected,) = torch.autograd.grad(y, w, grad_out)
    got = im2col_weight_grad(grad_out, x, kernel_size=kernel, stride=stride, padding=padding)
    assert got.shape == w.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _output_pixels_of_convs(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Output map size (pixels) of every convolution of ``model`` on ``x``, by weight name."""
    sizes: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: sizes.__setitem__(f"{n}.weight",
                                                                                 out.shape[-2] * out.shape[-1]))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return sizes


class _CountingFunction:
    """Wraps the autograd function's ``apply`` to count fast-path calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = conv_grad._MatmulWeightGradConv.apply

        def counted(*args):
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(conv_grad._MatmulWeightGradConv, "apply", counted)


def test_fast_path_taken_only_for_small_maps_in_bf16_training(monkeypatch) -> None:
    counter = _CountingFunction(monkeypatch)
    model = create_model("resnet18", 7, image_size=64).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    pixels = _output_pixels_of_convs(model, x).values()
    small = sum(p <= MAX_OUTPUT_PIXELS for p in pixels)
    assert 0 < small < len(pixels)  # 64 px ResNet-18: layer3 (4x4) and layer4 (2x2) only
    assert use_matmul_weight_grad(model) == len(pixels)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert counter.calls == small
    counter.calls = 0
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(x)  # no gradient wanted
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)  # evaluation
    model.train()
    model(x)  # fp32
    assert counter.calls == 0


def test_bf16_step_changes_only_small_map_weight_gradients() -> None:
    """Under autocast the forward is bit-identical to nn.Conv2d, and so is every gradient except
    the weight gradients of the small-map convolutions (the input gradients, which carry the
    backward pass on, come from the same kernel); those agree to bf16 rounding."""
    x = torch.randn(8, 3, 48, 48, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    runs = {}
    for name in ("native", "matmul"):
        torch.manual_seed(0)
        model = create_model("resnet10_slim", 7, image_size=48).to(memory_format=torch.channels_last).train()
        if name == "matmul":
            use_matmul_weight_grad(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        runs[name] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert torch.equal(runs["native"][0], runs["matmul"][0])
    pixels = _output_pixels_of_convs(create_model("resnet10_slim", 7, image_size=48), x)
    small = {n for n, p in pixels.items() if p <= MAX_OUTPUT_PIXELS}
    assert small and len(small) < len(pixels)  # 48 px: layer3 (3x3) and layer4 (2x2)
    for n, g_native in runs["native"][1].items():
        g_matmul = runs["matmul"][1][n]
        assert g_matmul.dtype == g_native.dtype == torch.float32
        if n in small:
            assert ((g_matmul - g_native).norm() / g_native.norm()).item() < 1e-2, n
        else:
            assert torch.equal(g_matmul, g_native), n


def test_swap_keeps_parameters_and_skips_what_it_cannot_handle() -> None:
    class OwnForward(nn.Conv2d):  # e.g. timm's Conv2dSame: has its own forward
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(4, 4, 3, padding=1, groups=2),
                          nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 4, 3, padding="same"),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), OwnForward(4, 4, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_matmul_weight_grad(model) == 1
    assert [type(m).__name__ for m in model] == ["SmallMapConv2d", "Conv2d", "Conv2d", "Conv2d", "Conv2d",
                                                 "OwnForward"]
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert use_matmul_weight_grad(model) == 0  # idempotent
    other = nn.Conv2d(3, 4, 1)
    assert use_matmul_weight_grad(model, other) == 1 and type(other) is SmallMapConv2d  # several modules


def test_bias_and_frozen_input_paths(monkeypatch) -> None:
    """A convolution with a bias, on an input that needs no gradient (a network's first layer)."""
    counter = _CountingFunction(monkeypatch)
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=True)
    fast = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=True)
    fast.load_state_dict(conv.state_dict())
    use_matmul_weight_grad(fast)
    x = torch.randn(4, 6, 10, 10)
    outs = []
    for m in (conv, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(m(x))
        outs[-1].float().square().sum().backward()
    assert counter.calls == 1
    assert torch.equal(outs[0], outs[1])
    for a, b in ((fast.weight.grad, conv.weight.grad), (fast.bias.grad, conv.bias.grad)):
        assert a.dtype == torch.float32 and ((a - b).norm() / b.norm()).item() < 1e-2


def test_trainer_rule() -> None:
    bf16, fp32 = resolve_precision("bf16", CPU), resolve_precision("fp32", CPU)
    assert wants_matmul_weight_grad("auto", CPU, bf16, compiled=False)
    assert not wants_matmul_weight_grad("native", CPU, bf16, compiled=False)
    assert not wants_matmul_weight_grad("auto", CPU, fp32, compiled=False)
    assert not wants_matmul_weight_grad("auto", CPU, bf16, compiled=True)
    assert not wants_matmul_weight_grad("auto", torch.device("cuda"), bf16, compiled=False)


@pytest.mark.parametrize(("setting", "precision", "swapped"), [("auto", "bf16", True), ("native", "bf16", False),
                                                               ("auto", "fp32", False)])
def test_fit_applies_the_setting(tmp_path, monkeypatch, setting: str, precision: str, swapped: bool) -> None:
    from dnfer.engine import trainer

    seen: list[nn.Module] = []
    real = trainer.use_matmul_weight_grad
    monkeypatch.setattr(trainer, "use_matmul_weight_grad", lambda *ms: (seen.extend(ms), real(*ms))[1])
    cfg = tiny_config(str(tmp_path / "run"), epochs=1, precision=precision, conv_weight_grad=setting)
    summary = trainer.fit(cfg, log=lambda m: None)
    assert 0.0 <= summary["final_test_acc"] <= 1.0
    assert bool(seen) is swapped
    if swapped:
        assert any(isinstance(m, SmallMapConv2d) for m in seen[0].modules())


def test_bad_setting_is_one_clear_error() -> None:
    cfg = Config()
    cfg.train.conv_weight_grad = "fast"
    with pytest.raises(ConfigError, match="train.conv_weight_grad.*auto.*native"):
        cfg.validate()


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimiser_uses_fused_kernels_on_cpu(name: str) -> None:
    from dnfer.engine.trainer import build_method, build_optimizer

    cfg = Config()
    cfg.model.name, cfg.optim.name = "tiny_cnn", name
    model = create_model("tiny_cnn", 7, image_size=16)
    method = build_method(cfg, 7, 10)
    method.setup(model)
    opt = build_optimizer(cfg, model, method)
    assert all(g["fused"] for g in opt.param_groups)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
