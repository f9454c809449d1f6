"""A faster weight gradient for convolutions with small output maps, for bf16 training on CPU.

Why: on CPUs with AMX/AVX-512 BF16, PyTorch's oneDNN kernel for the *weight* gradient of a bf16
convolution is 1.8-8x slower than the same work done as one matrix product whenever the output
map is small (at most 7x7 pixels: ResNet layer3/layer4 at 112 px, layer3/layer4 at 64 px).
Measured on the 2-core development machine (``benchmarks/conv_weight_grad.py``, batch 128,
channels_last, docs/performance.md): 512->512 3x3 at 4x4 px 102.0 ms (oneDNN) vs 21.7 ms (im2col +
matmul); 256->256 3x3 at 7x7 px 34.7 vs 19.4 ms; from 8x8 px up oneDNN is as fast or faster
(128->128 at 14x14: 16.9 vs 39.2 ms), so only small maps take this path. The input gradient and
the forward pass stay with oneDNN.

How: :class:`SmallMapConv2d` is ``nn.Conv2d`` with one change: in training, under bf16, on CPU,
when the output map has at most :data:`MAX_OUTPUT_PIXELS` pixels, its forward goes through an
autograd function whose backward computes the weight gradient as
``grad_out^T (O, N*Ho*Wo) @ im2col(x) (N*Ho*Wo, kh*kw*C)`` (bf16 inputs, fp32 accumulation, bf16
result, like oneDNN's). Forward outputs are bit-identical to ``nn.Conv2d``'s under autocast, and
so are the input gradients (same kernel); weight gradients agree to bf16 rounding. Evaluation,
export, fp32 and CUDA are untouched. Parameters and ``state_dict`` are the same, so checkpoints
do not know it was used.

Not a library: neither torchvision nor timm changes how a convolution is differentiated, and
``torch.compile`` (which could) makes this CPU's bf16 step slower (docs/performance.md), so the
trainer leaves the swap out when ``--compile`` is on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dnfer.engine.device import Precision

#: Output maps up to this many pixels (7x7) take the matmul weight gradient; measured crossover
#: between 7x7 (matmul 1.8-2.8x faster) and 8x8 (even) / 14x14 (oneDNN 1-2.3x faster).
MAX_OUTPUT_PIXELS = 49


def im2col_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, *, kernel_size: tuple[int, int],
                       stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
    """Weight gradient of ``conv2d(x, w, stride, padding)`` (dilation 1, one group) by one matmul.

    Args:
        grad_out: (N, O, Ho, Wo) gradient of the convolution's output.
        x: (N, C, H, W) the convolution's input.
    Returns:
        (O, C, kh, kw) in the dtype of the inputs, channels_last-strided (the layout of the matmul).
    """
    n, c, h, w = x.shape
    o, ho, wo = grad_out.shape[1:]
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    x_nhwc = x.permute(0, 2, 3, 1)  # a free view for a channels_last x
    if ph or pw:
        x_nhwc = F.pad(x_nhwc, (0, 0, pw, pw, ph, ph))
    x_nhwc = x_nhwc.contiguous()
    sn, sy, sx, sc = x_nhwc.stride()
    # cols[n, i, j, a, b, :] = x_padded[n, i*sh + a, j*sw + b, :]; one copy makes it (N*Ho*Wo, kh*kw*C)
    cols = x_nhwc.as_strided((n, ho, wo, kh, kw, c), (sn, sy * sh, sx * sw, sy, sx, sc))
    cols = cols.reshape(n * ho * wo, kh * kw * c)
    g = grad_out.permute(0, 2, 3, 1).reshape(n * ho * wo, o)
    return (g.t() @ cols).view(o, kh, kw, c).permute(0, 3, 1, 2)


class _MatmulWeightGradConv(torch.autograd.Function):
    """conv2d whose backward takes the weight gradient from :func:`im2col_weight_grad`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, int], padding: tuple[int, int]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        if x.is_contiguous(memory_format=torch.channels_last):
            grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, list(ctx.stride), list(ctx.padding), [1, 1], False, [0, 0], 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_w = im2col_weight_grad(grad_out, x, kernel_size=tuple(weight.shape[2:]), stride=ctx.stride,
                                        padding=ctx.padding)
        if ctx.needs_input_grad[2]:
            grad_b = grad_out.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


def _effective_bf16(x: torch.Tensor) -> bool:
    """True when a CPU convolution on ``x`` would run in bf16 (autocast to bf16, or bf16 tensors)."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose bf16 CPU training steps on small output maps use the matmul weight
    gradient (module docstring). Made by :func:`use_matmul_weight_grad`, never constructed directly."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (self.training and torch.is_grad_enabled() and input.device.type == "cpu" and input.dim() == 4
                and _effective_bf16(input)):
            (kh, kw), (sh, sw) = self.kernel_size, self.stride
            ph, pw = self.padding  # type: ignore[misc]  # only numeric padding is swapped in
            ho = (input.shape[2] + 2 * ph - kh) // sh + 1
            wo = (input.shape[3] + 2 * pw - kw) // sw + 1
            if ho * wo <= MAX_OUTPUT_PIXELS:
                bf16 = torch.bfloat16
                # Cast as autocast would; the casts' own backward returns fp32 gradients to fp32 weights.
                with torch.autocast("cpu", enabled=False):
                    return _MatmulWeightGradConv.apply(input.to(bf16), weight.to(bf16),
                                                       None if bias is None else bias.to(bf16), (sh, sw), (ph, pw))
        return super()._conv_forward(input, weight, bias)


def _eligible(m: nn.Module) -> bool:
    # Exact type only: subclasses (timm's Conv2dSame, StdConv2d, ...) override forward themselves.
    return (type(m) is nn.Conv2d and m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def wants_matmul_weight_grad(setting: str, device: torch.device, precision: Precision, *, compiled: bool) -> bool:
    """The trainer's rule (``train.conv_weight_grad``): ``auto`` means bf16 training on CPU, not compiled."""
    return setting == "auto" and device.type == "cpu" and precision.dtype == torch.bfloat16 and not compiled


def use_matmul_weight_grad(*modules: nn.Module) -> int:
    """Turn every plain ``nn.Conv2d`` in ``modules`` (one group, no dilation, zero padding) into a
    :class:`SmallMapConv2d`, in place. Returns how many were changed (a convolution shared by two
    of them counts once). Parameters, buffers and ``state_dict`` keys are unchanged."""
    n = 0
    for module in modules:
        for m in module.modules():
            if _eligible(m):
                m.__class__ = SmallMapConv2d
                n += 1
    return n
