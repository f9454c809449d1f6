"""Faster bf16 CPU convolutions on small output maps: run them on a mosaic of the batch.

Why: on CPUs with AMX/AVX-512 BF16, PyTorch's oneDNN convolution kernels block the work along
the output row, and a row of 4 or 7 pixels fills a fraction of a 16-row AMX tile: at batch 256,
ResNet-18 at 112 px, the 512->512 3x3 convolutions on 4x4 maps ran at about 0.37 TFLOPS
forward, a third of the same layers' rate on 28x28 maps, and their weight gradient several
times slower still (docs/performance.md, "Small-map convolutions as a mosaic").

How: :func:`mosaic_conv2d` lays ``images_per_row`` images of the batch side by side along the
width, separated by zero columns, and runs one ordinary ``F.conv2d`` on the wide map (batch
divided by ``images_per_row``). The separators are exactly the zero padding each image would
have had, so every kept output pixel is the same sum of products as in the per-image
convolution (tested in float64 against ``F.conv2d`` for outputs and all gradients); the extra
output columns over the separators are dropped. Autograd differentiates the layout copies and
the wide convolution, so the backward pass (input and weight gradients) runs on wide maps too.
The copies are cheap exactly where this is used: small maps are the smallest activations.

:class:`SmallMapConv2d` is ``nn.Conv2d`` with one change: under bf16 (autocast or bf16
tensors), on CPU, for channels_last inputs, when the output map has at most
:data:`MAX_OUTPUT_PIXELS` pixels, its forward goes through :func:`mosaic_conv2d`, in training
steps (whole ResNet-18 steps at 112 px 1.5x faster than with PyTorch's convolutions) and in
the trainer's bf16 evaluation passes (whole forward passes 1.13-1.16x). fp32 (measured: no gain), NCHW, CUDA, ONNX export (fp32)
and ``torch.compile`` are untouched. Parameters and ``state_dict`` are the same, so checkpoints
do not know it was used. Results equal ``nn.Conv2d``'s up to the order of floating-point sums
(on the development CPU the forward pass even came out bit-identical: oneDNN sums each output
pixel's products in the same order whatever the map's width).

Not a library: neither torchvision nor timm changes how a convolution is laid out for the
kernel, and ``torch.compile`` makes this CPU's bf16 step slower (docs/performance.md), so the
trainer leaves the swap out when ``--compile`` is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dnfer.engine.device import Precision

#: Output maps up to this many pixels (7x7) run on a mosaic. Measured on the development CPU
#: (benchmarks/small_map_conv.py, forward + backward, batch 256): outputs of 2x2 to 7x7 pixels
#: 1.2-6.7x faster (one 1x1 shortcut even); outputs of 8x8 and more 0.37-1.17x, so native.
MAX_OUTPUT_PIXELS = 49

#: Images laid side by side: 16 makes a 4x4 map 80 columns wide, enough to fill AMX tiles;
#: 8 to 32 measured within noise of each other, 4 slower.
IMAGES_PER_ROW = 16


def _output_size(h: int, w: int, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int]) -> tuple[int, int]:
    """(Ho, Wo) of a convolution (dilation 1) on an (H, W) map; < 1 where the kernel does not fit."""
    return (h + 2 * padding[0] - kernel[0]) // stride[0] + 1, (w + 2 * padding[1] - kernel[1]) // stride[1] + 1


def _separator(width: int, kernel: int, stride: int, padding: int) -> int:
    """Zero columns after each image so that the mosaic's convolution equals the per-image one.

    Needs: >= ``padding`` (they are the next image's left padding); a multiple of ``stride`` per
    image block (every image's first output column lands on the stride grid); and blocks at
    least as wide, in output columns, as one image's output (outputs of neighbours never overlap).
    """
    sep = max(padding, 2 * padding - kernel + stride, 0)
    sep += -(width + sep) % stride
    return sep


def mosaic_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                  images_per_row: int = IMAGES_PER_ROW) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (dilation 1, one group, zero padding),
    computed as one convolution over rows of ``images_per_row`` images placed side by side.

    Args:
        x: (N, C, H, W) input, any memory format (channels_last is the fast one: the layout
            copies are then plain row copies).
        weight: (O, C, kh, kw).
        bias: (O,) or None.
        images_per_row: images per mosaic row; a batch that is not a multiple of it is padded
            with zero images, whose outputs are dropped (and whose gradients are zero).
    Returns:
        (N, O, Ho, Wo), channels_last-strided, equal to ``F.conv2d``'s result up to the order of
        floating-point sums. Differentiable in ``x``, ``weight`` and ``bias``.
    """
    n, c, h, w = x.shape
    kh, kw = weight.shape[2:]
    sw, pw = stride[1], padding[1]  # the mosaic runs along the width
    ho, wo = _output_size(h, w, (kh, kw), stride, padding)
    if ho < 1 or wo < 1:
        raise ValueError(f"mosaic_conv2d: kernel {kh}x{kw} with padding {padding} does not fit a {h}x{w} input")
    per_row = max(1, min(images_per_row, n))
    rows = -(-n // per_row)
    sep = _separator(w, kw, sw, pw)
    block = w + sep  # input columns per image in the mosaic
    x_nhwc = x.permute(0, 2, 3, 1)  # a free view for channels_last x
    if rows * per_row > n:  # zero images fill the last row
        x_nhwc = F.pad(x_nhwc, (0, 0, 0, 0, 0, 0, 0, rows * per_row - n))
    # (rows, per_row, H, W, C) -> (rows, H, per_row, W + sep, C): one copy (the padding's).
    mosaic = F.pad(x_nhwc.reshape(rows, per_row, h, w, c).permute(0, 2, 1, 3, 4), (0, 0, 0, sep))
    mosaic = mosaic.reshape(rows, h, per_row * block, c)
    y = F.conv2d(mosaic.permute(0, 3, 1, 2), weight, bias, stride, padding)
    out_block = block // sw  # output columns per image; its first `wo` are the image's output
    y_nhwc = y.permute(0, 2, 3, 1)
    # Pad or slice the width to per_row whole blocks. Slices only where they drop something:
    # autograd's backward of every slice, even a no-op one, zero-fills a gradient of the whole
    # input and copies into it.
    extra = y_nhwc.shape[2] - per_row * out_block
    if extra < 0:  # only convolutions without padding end before the last block does
        y_nhwc = F.pad(y_nhwc, (0, 0, 0, -extra))
    elif extra > 0:
        y_nhwc = y_nhwc[:, :, :per_row * out_block]
    y_nhwc = y_nhwc.reshape(rows, ho, per_row, out_block, -1)
    if out_block > wo:
        y_nhwc = y_nhwc[:, :, :, :wo]
    # One copy back to (N, Ho, Wo, O); reshape alone returns a strided view when rows == 1.
    out = y_nhwc.permute(0, 2, 1, 3, 4).reshape(rows * per_row, ho, wo, -1)
    if rows * per_row > n:
        out = out[:n]
    return out.contiguous().permute(0, 3, 1, 2)


def _effective_bf16(x: torch.Tensor) -> bool:
    """True when a CPU convolution on ``x`` would run in bf16 (autocast to bf16, or bf16 tensors)."""
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose bf16 CPU calls with small output maps run on a mosaic (module
    docstring). Made by :func:`use_small_map_conv`, never constructed directly."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (input.device.type == "cpu" and input.dim() == 4
                and input.is_contiguous(memory_format=torch.channels_last) and _effective_bf16(input)):
            padding: tuple[int, int] = self.padding  # type: ignore[assignment]  # only numeric padding is swapped in
            ho, wo = _output_size(input.shape[2], input.shape[3], self.kernel_size, self.stride, padding)
            if 1 <= ho and 1 <= wo and ho * wo <= MAX_OUTPUT_PIXELS:  # else PyTorch's own call (and errors)
                return mosaic_conv2d(input, weight, bias, stride=self.stride, padding=padding)
        return super()._conv_forward(input, weight, bias)


def _eligible(m: nn.Module) -> bool:
    # Exact type only: subclasses (timm's Conv2dSame, StdConv2d, ...) override forward themselves.
    return (type(m) is nn.Conv2d and m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


def wants_small_map_conv(setting: str, device: torch.device, precision: Precision, *, compiled: bool) -> bool:
    """The trainer's rule (``train.small_map_conv``): ``auto`` means bf16 on CPU (training steps and
    the trainer's evaluation passes), not compiled."""
    return setting == "auto" and device.type == "cpu" and precision.dtype == torch.bfloat16 and not compiled


def use_small_map_conv(*modules: nn.Module) -> int:
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
