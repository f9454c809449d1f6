"""Small-map convolutions on a mosaic (engine.cpu_tuning.small_map_conv) and the fused optimiser."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import tiny_config
from torch import nn

from dnfer.config import Config
from dnfer.engine.cpu_tuning import small_map_conv
from dnfer.engine.cpu_tuning.small_map_conv import (
    MAX_OUTPUT_PIXELS,
    SmallMapConv2d,
    mosaic_conv2d,
    use_small_map_conv,
    wants_small_map_conv,
)
from dnfer.engine.device import resolve_precision
from dnfer.errors import ConfigError
from dnfer.models.factory import create_model

CPU = torch.device("cpu")


def _random_conv_cases(count: int, seed: int) -> list[tuple[int, ...]]:
    """(N, C, O, H, W, kh, kw, sh, sw, ph, pw, images_per_row): odd batches, 1-pixel maps, kernels
    larger than 2 * padding + 1 (no separator needed), padding larger than the kernel's half."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        kh, kw, ph, pw = rng.randint(1, 5), rng.randint(1, 5), rng.randint(0, 3), rng.randint(0, 3)
        h, w = rng.randint(max(1, kh - 2 * ph), 9), rng.randint(max(1, kw - 2 * pw), 9)
        cases.append((rng.randint(1, 20), rng.randint(1, 4), rng.randint(1, 4), h, w, kh, kw, rng.randint(1, 3),
                      rng.randint(1, 3), ph, pw, rng.randint(1, 8)))
    return cases


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_mosaic_conv_equals_conv2d_with_all_gradients(layout) -> None:
    """In float64 the mosaic is the convolution: outputs and input, weight and bias gradients
    agree to rounding for random shapes, strides, paddings and row widths."""
    g = torch.Generator().manual_seed(0)
    for n, c, o, h, w, kh, kw, sh, sw, ph, pw, per_row in _random_conv_cases(150, seed=1):
        x = torch.randn(n, c, h, w, dtype=torch.float64, generator=g).contiguous(memory_format=layout)
        x.requires_grad_()
        weight = torch.randn(o, c, kh, kw, dtype=torch.float64, generator=g, requires_grad=True)
        bias = torch.randn(o, dtype=torch.float64, generator=g, requires_grad=True)
        expected = F.conv2d(x, weight, bias, (sh, sw), (ph, pw))
        grad_out = torch.randn(expected.shape, dtype=torch.float64, generator=g)
        got = mosaic_conv2d(x, weight, bias, stride=(sh, sw), padding=(ph, pw), images_per_row=per_row)
        case = f"x {tuple(x.shape)} k {kh}x{kw} s {sh},{sw} p {ph},{pw} per row {per_row}"
        assert got.shape == expected.shape, case
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=case)
        for a, b in zip(torch.autograd.grad(got, (x, weight, bias), grad_out),
                        torch.autograd.grad(expected, (x, weight, bias), grad_out), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=case)


def test_mosaic_conv_without_bias_and_on_frozen_input() -> None:
    """A first layer: no bias, an input that needs no gradient; zero images padding a batch of 5
    into rows of 4 get no say in the weight gradient."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64, generator=g)
    weight = torch.randn(6, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    got = mosaic_conv2d(x, weight, stride=(1, 1), padding=(1, 1), images_per_row=4)
    expected = F.conv2d(x, weight, None, 1, 1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (gw,) = torch.autograd.grad(got.square().sum(), weight)
    (gw_expected,) = torch.autograd.grad(expected.square().sum(), weight)
    torch.testing.assert_close(gw, gw_expected, rtol=1e-12, atol=1e-12)
    assert got.is_contiguous(memory_format=torch.channels_last)
    one_row = mosaic_conv2d(x[:2], weight, stride=(1, 1), padding=(1, 1), images_per_row=4)
    assert one_row.is_contiguous(memory_format=torch.channels_last)  # regression: was a strided view


def test_mosaic_conv_rejects_a_kernel_larger_than_the_padded_input() -> None:
    with pytest.raises(ValueError, match="kernel 5x5 .* does not fit a 2x2 input"):
        mosaic_conv2d(torch.zeros(2, 1, 2, 2), torch.zeros(1, 1, 5, 5), padding=(1, 1))


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


class _CountingMosaic:
    """Wraps :func:`mosaic_conv2d` as the module calls it, to count fast-path calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = small_map_conv.mosaic_conv2d

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(small_map_conv, "mosaic_conv2d", counted)


def test_fast_path_taken_only_for_small_maps_in_bf16_channels_last(monkeypatch) -> None:
    counter = _CountingMosaic(monkeypatch)
    model = create_model("resnet18", 7, image_size=64).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    pixels = _output_pixels_of_convs(model, x).values()
    small = sum(p <= MAX_OUTPUT_PIXELS for p in pixels)
    assert 0 < small < len(pixels)  # 64 px ResNet-18: layer3 (4x4) and layer4 (2x2) only
    assert use_small_map_conv(model) == len(pixels)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
    assert counter.calls == small
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        model(x)  # evaluation passes too
    assert counter.calls == 2 * small
    counter.calls = 0
    model.train()
    model(x)  # fp32
    model.to(torch.bfloat16)(x.to(torch.bfloat16))  # bf16 weights without autocast: taken
    assert counter.calls == small
    counter.calls = 0
    nchw = create_model("resnet18", 7, image_size=64).train()
    use_small_map_conv(nchw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nchw(x.contiguous())  # NCHW: measured only in channels_last, left native
    assert counter.calls == 0


def test_bf16_step_matches_native_to_rounding() -> None:
    """Under autocast a training step with mosaics gives the native step's logits and gradients
    to bf16 rounding, and only convolutions with small output maps take the mosaic."""
    x = torch.randn(8, 3, 48, 48, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    runs = {}
    for name in ("native", "mosaic"):
        torch.manual_seed(0)
        model = create_model("resnet10_slim", 7, image_size=48).to(memory_format=torch.channels_last).train()
        if name == "mosaic":
            use_small_map_conv(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        runs[name] = (logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(runs["mosaic"][0], runs["native"][0], rtol=2e-2, atol=2e-2)
    pixels = _output_pixels_of_convs(create_model("resnet10_slim", 7, image_size=48), x)
    small = {n for n, p in pixels.items() if p <= MAX_OUTPUT_PIXELS}
    assert small and len(small) < len(pixels)  # 48 px: layer3 (3x3) and layer4 (2x2)
    for n, g_native in runs["native"][1].items():
        g_mosaic = runs["mosaic"][1][n]
        assert g_mosaic.dtype == g_native.dtype == torch.float32
        assert ((g_mosaic - g_native).norm() / g_native.norm()).item() < 1e-2, n


def test_swap_keeps_parameters_and_skips_what_it_cannot_handle() -> None:
    class OwnForward(nn.Conv2d):  # e.g. timm's Conv2dSame: has its own forward
        pass

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(4, 4, 3, padding=1, groups=2),
                          nn.Conv2d(4, 4, 3, padding=2, dilation=2), nn.Conv2d(4, 4, 3, padding="same"),
                          nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), OwnForward(4, 4, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_small_map_conv(model) == 1
    assert [type(m).__name__ for m in model] == ["SmallMapConv2d", "Conv2d", "Conv2d", "Conv2d", "Conv2d",
                                                 "OwnForward"]
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert use_small_map_conv(model) == 0  # idempotent
    other = nn.Conv2d(3, 4, 1)
    assert use_small_map_conv(model, other) == 1 and type(other) is SmallMapConv2d  # several modules


def test_bias_and_frozen_input_paths(monkeypatch) -> None:
    """A convolution with a bias, on an input that needs no gradient (a network's first layer)."""
    counter = _CountingMosaic(monkeypatch)
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=True)
    fast = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=True)
    fast.load_state_dict(conv.state_dict())
    use_small_map_conv(fast)
    x = torch.randn(4, 6, 10, 10).contiguous(memory_format=torch.channels_last)
    outs = []
    for m in (conv, fast):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(m(x))
        outs[-1].float().square().sum().backward()
    assert counter.calls == 1
    torch.testing.assert_close(outs[1].float(), outs[0].float(), rtol=2e-2, atol=2e-2)
    for a, b in ((fast.weight.grad, conv.weight.grad), (fast.bias.grad, conv.bias.grad)):
        assert a.dtype == torch.float32 and ((a - b).norm() / b.norm()).item() < 1e-2


def test_trainer_rule() -> None:
    bf16, fp32 = resolve_precision("bf16", CPU), resolve_precision("fp32", CPU)
    assert wants_small_map_conv("auto", CPU, bf16, compiled=False)
    assert not wants_small_map_conv("native", CPU, bf16, compiled=False)
    assert not wants_small_map_conv("auto", CPU, fp32, compiled=False)
    assert not wants_small_map_conv("auto", CPU, bf16, compiled=True)
    assert not wants_small_map_conv("auto", torch.device("cuda"), bf16, compiled=False)


@pytest.mark.parametrize(("setting", "precision", "swapped"), [("auto", "bf16", True), ("native", "bf16", False),
                                                               ("auto", "fp32", False)])
def test_fit_applies_the_setting(tmp_path, monkeypatch, setting: str, precision: str, swapped: bool) -> None:
    from dnfer.engine import cpu_tuning, trainer

    seen: list[nn.Module] = []
    real = cpu_tuning.use_small_map_conv
    monkeypatch.setattr(cpu_tuning, "use_small_map_conv", lambda *ms: (seen.extend(ms), real(*ms))[1])
    cfg = tiny_config(str(tmp_path / "run"), epochs=1, precision=precision, small_map_conv=setting)
    summary = trainer.fit(cfg, log=lambda m: None)
    assert 0.0 <= summary["final_test_acc"] <= 1.0
    assert bool(seen) is swapped
    if swapped:
        assert any(isinstance(m, SmallMapConv2d) for m in seen[0].modules())


def test_bad_setting_is_one_clear_error() -> None:
    cfg = Config()
    cfg.train.small_map_conv = "fast"
    with pytest.raises(ConfigError, match="train.small_map_conv.*auto.*native"):
        cfg.validate()


def test_cli_flag_reaches_the_config() -> None:
    import argparse

    from dnfer.commands import train as train_cmd

    parser = argparse.ArgumentParser()
    train_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", "--small-map-conv", "native"])
    assert train_cmd.config_from_args(args).train.small_map_conv == "native"
    assert train_cmd.config_from_args(parser.parse_args(["train"])).train.small_map_conv == "auto"


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimiser_uses_fused_kernels_on_cpu(name: str) -> None:
    from dnfer.engine.build import build_optimizer
    from dnfer.engine.trainer import build_method

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
