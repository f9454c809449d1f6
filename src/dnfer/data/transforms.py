"""The paper's weak and strong views, per-sample (DataLoader workers) and batched (on device).

Weak view: reflect-pad ``pad`` px + random crop back to size, then horizontal flip (p=0.5).
Strong view: an independent weak view + FixMatch-style RandAugment (``num_ops`` ops drawn with
replacement from :data:`OPS`, each applied with p=0.5 at level ``magnitude`` on the 0..10 scale)
+ Cutout (a ``cutout`` x ``cutout`` box filled with gray 128, centre uniform over the image,
clipped at the border). Both views work on uint8 ``(3, H, W)`` / ``(B, 3, H, W)`` RGB tensors.

Two implementations with the same distribution:

* :func:`weak_transform` / :func:`strong_transform`: per-sample callables for DataLoader workers,
  built from ``torchvision.transforms.v2`` (``RandomCrop`` with reflect padding,
  ``RandomHorizontalFlip``) and ``v2.functional`` ops. Randomness comes from torch's global RNG,
  which the DataLoader seeds per worker from its ``generator``.
* :class:`BatchAugment`: the whole batch at once on ``x.device``, every image drawing its own
  flip, crop offset, ops, levels, signs and Cutout box (torchvision v2 and kornia batch transforms
  draw one op for the whole batch, a different distribution). Hand-written because no kept
  library does per-sample RandAugment on a batch; every op replicates the torchvision functional
  formula so that the two implementations agree pixel for pixel (up to float rounding, <= 1).

Op arguments at level ``m`` (``f = m / 10``), chosen to equal the authors' code (DNFER
``RandomAugment(2, 10)``, a cv2 port of FixMatch's RandAugment) at the paper's level 10:

============  =====================================  ========================================
op            argument                               note
============  =====================================  ========================================
Brightness,   factor ``0.1 + 1.8 f`` (1.9 at 10)     torchvision adjust_brightness/_saturation/
Color,                                               _contrast/_sharpness (PIL semantics;
Contrast,                                            contrast blends towards the image's mean
Sharpness                                            gray, the authors' port used a fixed 74)
Posterize     keep ``8 - floor(4 f)`` bits (4)       authors: ``floor(4 f)`` bits, equal at 10
Solarize      threshold ``floor(256 f)`` (256)       as the authors: a no-op at level 10
Rotate        +-``30 f`` degrees, about the centre   bilinear, fill 128
ShearX/Y      +-``0.3 f`` shear, about the top-left  bilinear, fill 128 (PIL/cv2 convention)
TranslateX/Y  +-``round(f * 10 * size / 224)`` px    authors: 10 px at 224 px; scaled with size
AutoContrast, Equalize, Identity                     no argument
============  =====================================  ========================================

Signs of the geometric ops are drawn per image (p=0.5 each). Draws per image: crop offsets
uniform in ``[-pad, pad]``, flip, ``num_ops`` op indices, ``num_ops`` apply coins, levels (all
``magnitude`` unless ``random_magnitude``), signs, Cutout centre.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from dnfer.errors import ConfigError, DataError
from dnfer.preprocessing import IMAGENET_MEAN, IMAGENET_STD

#: FixMatch's RandAugment op list (kekmodel/FixMatch-pytorch ``fixmatch_augment_pool``; the same
#: 14 names as the authors' ``RandomAugment``).
OPS: tuple[str, ...] = (
    "AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize",
    "Rotate", "Sharpness", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY",
)  # fmt: skip
GEOMETRIC_OPS: frozenset[str] = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})
_GEOMETRIC_INDEX = torch.tensor([i for i, name in enumerate(OPS) if name in GEOMETRIC_OPS])
_GEOMETRIC_GROUP = len(OPS)  # the group id all geometric ops share in a slot (one warp)
_IDENTITY, _SOLARIZE = OPS.index("Identity"), OPS.index("Solarize")
MAX_LEVEL = 10
FILL = 128  # gray of the authors' geometric ops and Cutout

# The paper's numbers at its 224-px input; defaults scale them with the image size.
_REF_SIZE = 224
_REF_PAD = 4
_REF_CUTOUT = 16
_REF_TRANSLATE = 10


def default_pad(image_size: int) -> int:
    """Reflect-pad width used when ``pad`` is None: ``max(1, round(4 * image_size / 224))``.

    The paper pads 4 px at 224 px, i.e. shifts the face by up to 1.8 % of its width. Scaling
    keeps that relative shift at any training size (1 px at 64, 2 px at 112, 4 px at 224),
    and the floor of 1 keeps the weak view from degenerating into a flip only.
    """
    return max(1, round(_REF_PAD * image_size / _REF_SIZE))


def default_cutout(image_size: int) -> int:
    """Cutout side used when ``cutout`` is None: ``max(1, round(16 * image_size / 224))``.

    Same reasoning as :func:`default_pad`: the paper's 16 px box covers 0.5 % of a 224 px face;
    scaling keeps that fraction (5 px at 64, 8 px at 112).
    """
    return max(1, round(_REF_CUTOUT * image_size / _REF_SIZE))


def _resolve(
    image_size: int, pad: int | None, num_ops: int, magnitude: int, cutout: int | None
) -> tuple[int, int]:
    """Validate options; return ``(pad, cutout)`` with defaults filled in."""
    if not isinstance(image_size, int) or image_size < 2:
        raise ConfigError(f"image_size must be an integer >= 2, got {image_size!r}.")
    pad = default_pad(image_size) if pad is None else pad
    if not isinstance(pad, int) or not 0 <= pad < image_size:
        raise ConfigError(
            f"augmentation pad must be an integer in [0, {image_size - 1}] for {image_size}-px images "
            f"(reflect padding needs pad < size), got {pad!r}."
        )
    if not isinstance(num_ops, int) or num_ops < 0:
        raise ConfigError(f"RandAugment num_ops must be an integer >= 0, got {num_ops!r}.")
    if not isinstance(magnitude, int) or not 0 <= magnitude <= MAX_LEVEL:
        raise ConfigError(f"RandAugment magnitude must be an integer in [0, {MAX_LEVEL}], got {magnitude!r}.")
    cutout = default_cutout(image_size) if cutout is None else cutout
    if not isinstance(cutout, int) or not 0 <= cutout <= image_size:
        raise ConfigError(f"cutout must be an integer in [0, {image_size}] (0 disables it), got {cutout!r}.")
    return pad, cutout


# --------------------------------------------------------------------------------------------
# Random draws (shared by both implementations, so the distributions agree by construction)


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _to_device(t: Tensor, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """Copy a small CPU tensor (indices, per-image arguments) to ``device`` without a sync.

    A blocking host-to-GPU copy waits for every kernel already queued on the stream, so each
    of the dozens per batch would stall the host until the GPU drained; a non-blocking copy from
    pageable memory is staged by the driver at once, so ``t`` may be freed right after.
    """
    return t.to(device=device, dtype=dtype, non_blocking=True)


def sample_op_params(
    n: int,
    num_ops: int,
    magnitude: int,
    *,
    random_magnitude: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Draw RandAugment choices for ``n`` images (CPU tensors).

    Returns:
        ops: int64 ``(n, num_ops)`` indices into :data:`OPS` (with replacement).
        apply: bool ``(n, num_ops)``, each True with p=0.5.
        level: float64 ``(n, num_ops)``: ``magnitude``, or uniform on ``1..magnitude`` when
            ``random_magnitude`` (FixMatch's RandAugmentMC draws its level per op too).
        sign: float64 ``(n, num_ops)`` of +-1 for the geometric ops.
    """
    dev = _draw_device(generator)
    ops = torch.randint(0, len(OPS), (n, num_ops), generator=generator, device=dev)
    apply = torch.rand(n, num_ops, generator=generator, device=dev) < 0.5
    if random_magnitude and magnitude >= 1:
        level = torch.randint(1, magnitude + 1, (n, num_ops), generator=generator, device=dev)
        level = level.to(torch.float64)
    else:
        level = torch.full((n, num_ops), float(magnitude), dtype=torch.float64, device=dev)
    sign = torch.where(torch.rand(n, num_ops, generator=generator, device=dev) < 0.5, -1.0, 1.0)
    return ops.cpu(), apply.cpu(), level.cpu(), sign.to(torch.float64).cpu()


def sample_cutout_centres(
    n: int, height: int, width: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Cutout centres for ``n`` images: int64 ``(n,)`` rows and columns, uniform over the image."""
    dev = _draw_device(generator)
    cy = torch.randint(0, height, (n,), generator=generator, device=dev)
    cx = torch.randint(0, width, (n,), generator=generator, device=dev)
    return cy.cpu(), cx.cpu()


def cutout_box(centre: Tensor, size: int, extent: int) -> tuple[Tensor, Tensor]:
    """Half-open box ``[lo, hi)`` along one axis: ``size`` px from ``centre - size // 2``, clipped.

    For even sizes this is the authors' ``[c - s/2, c + s/2)``.
    """
    lo = centre - size // 2
    return lo.clamp(min=0), (lo + size).clamp(max=extent)


def op_argument(op: str, level: Tensor, sign: Tensor, size: int) -> Tensor:
    """The op's argument (float64, same shape as ``level``) for levels on the 0..10 scale.

    Enhance ops: blend factor; Posterize: bits kept; Solarize: threshold (256 = no-op);
    Rotate: degrees; ShearX/Y: shear angle in degrees (``atan`` of the shear factor, the
    torchvision convention); TranslateX/Y: integer pixels; others: 0.
    """
    f = level.to(torch.float64) / MAX_LEVEL
    if op in ("Brightness", "Color", "Contrast", "Sharpness"):
        return 0.1 + 1.8 * f
    if op == "Posterize":
        return 8.0 - torch.floor(4.0 * f)
    if op == "Solarize":
        return torch.floor(256.0 * f)
    if op == "Rotate":
        return sign * 30.0 * f
    if op in ("ShearX", "ShearY"):
        return sign * torch.rad2deg(torch.atan(0.3 * f))
    if op in ("TranslateX", "TranslateY"):
        return sign * torch.round(f * (_REF_TRANSLATE * size / _REF_SIZE))
    return torch.zeros_like(f)


# --------------------------------------------------------------------------------------------
# Per-sample implementation (torchvision.transforms.v2)


def apply_op(img: Tensor, op: str, arg: float) -> Tensor:
    """Apply one op with its argument (see :func:`op_argument`) to a uint8 ``(3, H, W)`` image."""
    bilinear = InterpolationMode.BILINEAR
    fill = [float(FILL)]
    if op == "Identity":
        return img
    if op == "AutoContrast":
        return F.autocontrast(img)
    if op == "Equalize":
        return F.equalize(img)
    if op == "Brightness":
        return F.adjust_brightness(img, arg)
    if op == "Color":
        return F.adjust_saturation(img, arg)
    if op == "Contrast":
        return F.adjust_contrast(img, arg)
    if op == "Sharpness":
        return F.adjust_sharpness(img, arg)
    if op == "Posterize":
        return F.posterize(img, int(arg))
    if op == "Solarize":
        # threshold 256 inverts nothing; torchvision rejects thresholds above 255
        return img if arg > 255 else F.solarize(img, arg)
    if op == "Rotate":
        return F.affine(img, angle=arg, translate=[0, 0], scale=1.0, shear=[0.0, 0.0],
                        interpolation=bilinear, fill=fill)  # fmt: skip
    if op in ("ShearX", "ShearY"):
        # center=[0, 0]: shear about the top-left corner like PIL's/cv2's (1, v, 0, 0, 1, 0)
        shear = [arg, 0.0] if op == "ShearX" else [0.0, arg]
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                        interpolation=bilinear, fill=fill, center=[0, 0])  # fmt: skip
    if op in ("TranslateX", "TranslateY"):
        t = [int(arg), 0] if op == "TranslateX" else [0, int(arg)]
        return F.affine(img, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0],
                        interpolation=bilinear, fill=fill)  # fmt: skip
    raise ConfigError(f"unknown augmentation op {op!r}; valid: {', '.join(OPS)}.")


class _CheckImage:
    """First step of the per-sample pipelines: a clear error instead of a silent wrong crop."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, img: Tensor) -> Tensor:
        s = self.image_size
        if not isinstance(img, Tensor) or img.dtype != torch.uint8 or tuple(img.shape) != (3, s, s):
            got = f"{img.dtype} {tuple(img.shape)}" if isinstance(img, Tensor) else type(img).__name__
            raise DataError(f"augmentation input must be a uint8 tensor of shape (3, {s}, {s}), got {got}.")
        return img


class RandAugmentFM:
    """FixMatch-style RandAugment on one uint8 ``(3, H, W)`` image (torch global RNG).

    Differs from ``v2.RandAugment``: FixMatch's op list and ranges, each drawn op applied with
    p=0.5 (torchvision always applies), fill 128.
    """

    def __init__(self, image_size: int, num_ops: int = 2, magnitude: int = 10, *,
                 random_magnitude: bool = False) -> None:  # fmt: skip
        _resolve(image_size, 0, num_ops, magnitude, 0)
        self.image_size = image_size
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.random_magnitude = random_magnitude

    def __call__(self, img: Tensor) -> Tensor:
        ops, apply, level, sign = sample_op_params(
            1, self.num_ops, self.magnitude, random_magnitude=self.random_magnitude
        )
        return self.apply_params(img, ops[0], apply[0], level[0], sign[0])

    def apply_params(self, img: Tensor, ops: Tensor, apply: Tensor, level: Tensor, sign: Tensor) -> Tensor:
        """Apply given draws (each ``(num_ops,)``, as from :func:`sample_op_params`)."""
        for k in range(ops.shape[0]):
            if bool(apply[k]):
                name = OPS[int(ops[k])]
                arg = op_argument(name, level[k : k + 1], sign[k : k + 1], self.image_size)
                img = apply_op(img, name, float(arg[0]))
        return img


class Cutout:
    """Fill a ``size`` x ``size`` box (centre uniform over the image, clipped) with ``fill``."""

    def __init__(self, size: int, fill: int = FILL) -> None:
        self.size = size
        self.fill = fill

    def __call__(self, img: Tensor) -> Tensor:
        if self.size <= 0:
            return img
        h, w = img.shape[-2:]
        cy, cx = sample_cutout_centres(1, h, w)
        y0, y1 = cutout_box(cy, self.size, h)
        x0, x1 = cutout_box(cx, self.size, w)
        out = img.clone()
        out[..., int(y0) : int(y1), int(x0) : int(x1)] = self.fill
        return out


def weak_transform(image_size: int, *, pad: int | None = None) -> Callable[[Tensor], Tensor]:
    """Per-sample weak view: reflect-pad ``pad`` + random crop back to size, then flip p=0.5.

    Args:
        image_size: side of the square input and output.
        pad: reflect padding in px; None = :func:`default_pad` (4 px at 224, scaled).

    Returns:
        A callable uint8 ``(3, S, S)`` -> uint8 ``(3, S, S)`` using torch's global RNG.
    """
    pad, _ = _resolve(image_size, pad, 0, 0, 0)
    steps: list[Callable[[Tensor], Tensor]] = [_CheckImage(image_size)]
    if pad > 0:
        steps.append(v2.RandomCrop(image_size, padding=pad, padding_mode="reflect"))
    steps.append(v2.RandomHorizontalFlip(p=0.5))
    return v2.Compose(steps)


def strong_transform(
    image_size: int,
    *,
    pad: int | None = None,
    num_ops: int = 2,
    magnitude: int = 10,
    cutout: int | None = None,
    random_magnitude: bool = False,
) -> Callable[[Tensor], Tensor]:
    """Per-sample strong view: weak view + FixMatch RandAugment + Cutout (fill 128).

    Args:
        image_size: side of the square input and output.
        pad: reflect padding in px; None = :func:`default_pad`.
        num_ops: ops drawn per image (with replacement); 0 disables RandAugment.
        magnitude: level on the 0..10 scale (see the module table).
        cutout: Cutout side in px; None = :func:`default_cutout`; 0 disables.
        random_magnitude: draw each op's level uniformly from ``1..magnitude`` instead.

    Returns:
        A callable uint8 ``(3, S, S)`` -> uint8 ``(3, S, S)`` using torch's global RNG.
    """
    pad, cutout = _resolve(image_size, pad, num_ops, magnitude, cutout)
    steps: list[Callable[[Tensor], Tensor]] = [weak_transform(image_size, pad=pad)]
    if num_ops > 0:
        steps.append(RandAugmentFM(image_size, num_ops, magnitude, random_magnitude=random_magnitude))
    if cutout > 0:
        steps.append(Cutout(cutout))
    return v2.Compose(steps)


# --------------------------------------------------------------------------------------------
# Batched implementation


@dataclass
class AugmentParams:
    """Per-image draws for a batch of ``B`` images (CPU tensors).

    Attributes:
        top, left: int64 ``(B,)`` crop offsets into the padded image, in ``[0, 2 * pad]``.
        flip: bool ``(B,)`` horizontal flip after the crop.
        ops, apply, level, sign: ``(B, num_ops)`` RandAugment draws (see
            :func:`sample_op_params`); ``num_ops`` is 0 for a weak view.
        cut_y, cut_x: int64 ``(B,)`` Cutout centres (unused when Cutout is off).
    """

    top: Tensor
    left: Tensor
    flip: Tensor
    ops: Tensor
    apply: Tensor
    level: Tensor
    sign: Tensor
    cut_y: Tensor
    cut_x: Tensor


def _inverse_affine(angle: Tensor, tx: Tensor, ty: Tensor, shear_x: Tensor, shear_y: Tensor,
                    cx: Tensor, cy: Tensor) -> Tensor:  # fmt: skip
    """Per-sample inverse affine matrices ``(N, 2, 3)`` float64 in centred pixel coordinates.

    Vectorised ``torchvision.transforms.v2.functional._geometry._get_inverse_affine_matrix``
    (scale 1); angles in degrees, ``cx, cy`` the centre relative to the image centre.
    """
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=-1).view(-1, 2, 3)


def _affine_batch(x: Tensor, theta: Tensor) -> Tensor:
    """Warp uint8 ``(N, C, H, W)`` with per-sample inverse matrices ``(N, 2, 3)``; bilinear, fill 128.

    Same grid and fill blending as torchvision's tensor ``affine`` (one grid_sample with an extra
    mask channel), but one matrix per image.
    """
    n, c, h, w = x.shape
    dev = x.device
    base = torch.empty(1, h, w, 3, dtype=torch.float32, device=dev)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev).unsqueeze(-1))
    base[..., 2].fill_(1.0)
    theta32 = theta.to(dtype=torch.float32)
    rescaled = _to_device(theta32.transpose(1, 2).div(torch.tensor([0.5 * w, 0.5 * h], dtype=torch.float32)), dev)
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(rescaled).view(n, h, w, 2)
    img = torch.cat([x.to(torch.float32), torch.ones(n, 1, h, w, device=dev)], dim=1)
    img = nnf.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    img, mask = img[:, :c], img[:, c:]
    img = img.sub_(FILL).mul_(mask).add_(FILL)
    return img.round_().to(torch.uint8)


def _gray_floor(img: Tensor) -> Tensor:
    """``(N, 1, H, W)`` float luma of float ``(N, 3, H, W)``, floored as torchvision does for uint8."""
    r, g, b = img.unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _blend(img: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """``img * f + other * (1 - f)`` clamped to uint8 (in place on float ``img``), ``factor`` float64 ``(N,)``."""
    f = factor.view(-1, 1, 1, 1)
    rest = other.mul((1.0 - f).to(torch.float32))  # other is (N, 1, H, W) or (N, 1, 1, 1): cheap
    return img.mul_(f.to(torch.float32)).add_(rest).clamp_(0, 255).to(torch.uint8)


def _autocontrast(x: Tensor) -> Tensor:
    """torchvision's ``autocontrast`` for uint8 ``(N, C, H, W)``, per image and channel, with the
    same float32 arithmetic (bit-identical) but ``torch.where`` instead of its boolean-mask
    writes, each of which makes a GPU sync with the host."""
    img = x.to(torch.float32)
    low = img.amin(dim=(-2, -1), keepdim=True)
    high = img.amax(dim=(-2, -1), keepdim=True)
    flat = high == low  # one grey level: left as it is
    inv_scale = torch.where(flat, 1.0, (high - low).mul_(1.0 / 255))
    low = torch.where(flat, 0.0, low)
    return img.sub_(low).div_(inv_scale).clamp_(0, 255).to(torch.uint8)


def _colour_batch(x: Tensor, op: str, arg: Tensor) -> Tensor:
    """Non-geometric op on uint8 ``(N, 3, H, W)`` with per-sample float64 arguments ``(N,)``."""
    if op == "AutoContrast":
        return _autocontrast(x)
    if op == "Equalize":
        return F.equalize(x)  # already per image and channel
    if op == "Posterize":
        keep = (255 << (8 - arg.to(torch.int64))) & 255
        return x & _to_device(keep, x.device, torch.uint8).view(-1, 1, 1, 1)
    if op == "Solarize":
        thr = _to_device(arg, x.device, torch.int16).view(-1, 1, 1, 1)
        return torch.where(x.to(torch.int16) >= thr, 255 - x, x)
    arg = _to_device(arg, x.device)
    img = x.to(torch.float32)
    if op == "Brightness":
        return img.mul_(arg.to(torch.float32).view(-1, 1, 1, 1)).clamp_(0, 255).to(torch.uint8)
    if op == "Color":
        return _blend(img, _gray_floor(img), arg)
    if op == "Contrast":
        return _blend(img, _gray_floor(img).mean(dim=(1, 2, 3), keepdim=True), arg)
    if op == "Sharpness":
        h, w = x.shape[-2:]
        if h <= 2 or w <= 2:
            return x
        k = torch.full((3, 3), 1.0 / 13.0, device=x.device)
        k[1, 1] = 5.0 / 13.0
        blurred = nnf.conv2d(img, k.expand(3, 1, 3, 3), groups=3).round_()
        inner = img[..., 1:-1, 1:-1]
        inner.add_(blurred.sub_(inner).mul_((1.0 - arg).to(torch.float32).view(-1, 1, 1, 1)))
        return img.clamp_(0, 255).to(torch.uint8)
    raise ConfigError(f"unknown augmentation op {op!r}; valid: {', '.join(OPS)}.")


def _geometric_theta(names: Sequence[str], arg: Tensor, h: int, w: int) -> Tensor:
    """Inverse affine matrices ``(N, 2, 3)`` for geometric ops ``names[i]`` with arguments ``arg``."""
    arg = arg.to(torch.float64)

    def where(*ops: str) -> Tensor:
        return torch.tensor([name in ops for name in names], dtype=torch.bool)

    zero = torch.zeros(len(names), dtype=torch.float64)
    shear = where("ShearX", "ShearY")
    # shears pivot on the top-left corner, as F.affine(center=[0, 0])
    cx, cy = torch.where(shear, -w * 0.5, zero), torch.where(shear, -h * 0.5, zero)
    angle, tx, ty, shx, shy = (torch.where(where(op), arg, zero)
                               for op in ("Rotate", "TranslateX", "TranslateY", "ShearX", "ShearY"))
    return _inverse_affine(angle, tx, ty, shx, shy, cx, cy)


class BatchAugment:
    """Weak or strong view of a uint8 batch on its own device, with per-image randomness.

    Args:
        image_size: side of the square images.
        strong: False = weak view (crop + flip); True = weak + RandAugment + Cutout.
        pad, num_ops, magnitude, cutout, random_magnitude: as in :func:`strong_transform`
            (``num_ops``, ``magnitude``, ``cutout`` are ignored for a weak view).

    Call with ``x`` uint8 ``(B, 3, S, S)`` (any device) and an optional ``torch.Generator``
    (a CPU generator is best: draws are made on the generator's device and moved to the CPU,
    which for a CUDA generator costs a sync). The same generator state gives the same output on
    any device, up to float rounding. Never calls ``.cuda()``.
    """

    def __init__(
        self,
        image_size: int,
        *,
        strong: bool,
        pad: int | None = None,
        num_ops: int = 2,
        magnitude: int = 10,
        cutout: int | None = None,
        random_magnitude: bool = False,
    ) -> None:
        self.pad, cutout = _resolve(image_size, pad, num_ops, magnitude, cutout)
        self.image_size = image_size
        self.strong = strong
        self.num_ops = num_ops if strong else 0
        self.magnitude = magnitude
        self.cutout = cutout if strong else 0
        self.random_magnitude = random_magnitude

    def __repr__(self) -> str:
        return (
            f"BatchAugment(image_size={self.image_size}, strong={self.strong}, pad={self.pad}, "
            f"num_ops={self.num_ops}, magnitude={self.magnitude}, cutout={self.cutout})"
        )

    def sample_params(self, batch: int, generator: torch.Generator | None = None) -> AugmentParams:
        """Draw every image's flip, crop offset, ops, levels, signs and Cutout centre."""
        dev = _draw_device(generator)
        span = 2 * self.pad + 1
        top = torch.randint(0, span, (batch,), generator=generator, device=dev).cpu()
        left = torch.randint(0, span, (batch,), generator=generator, device=dev).cpu()
        flip = (torch.rand(batch, generator=generator, device=dev) < 0.5).cpu()
        ops, apply, level, sign = sample_op_params(
            batch, self.num_ops, self.magnitude, random_magnitude=self.random_magnitude, generator=generator
        )
        if self.cutout > 0:
            cut_y, cut_x = sample_cutout_centres(batch, self.image_size, self.image_size, generator)
        else:
            cut_y = cut_x = torch.zeros(batch, dtype=torch.int64)
        return AugmentParams(top, left, flip, ops, apply, level, sign, cut_y, cut_x)

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment uint8 ``(B, 3, S, S)``; returns a new uint8 ``(B, 3, S, S)`` on ``x.device``."""
        s = self.image_size
        if (
            not isinstance(x, Tensor)
            or x.dtype != torch.uint8
            or x.ndim != 4
            or tuple(x.shape[1:]) != (3, s, s)
        ):
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise DataError(
                f"BatchAugment input must be a uint8 tensor of shape (B, 3, {s}, {s}), got {got}."
            )
        return self.apply(x, self.sample_params(x.shape[0], generator))

    def apply(self, x: Tensor, p: AugmentParams) -> Tensor:
        """Apply given draws to uint8 ``(B, 3, S, S)``."""
        out = self._crop_flip(x, p)
        for k in range(p.ops.shape[1]):
            out = self._apply_slot(out, p.ops[:, k], p.apply[:, k], p.level[:, k], p.sign[:, k])
        if self.cutout > 0:
            out = self._cutout(out, p.cut_y, p.cut_x)
        return out

    def _crop_flip(self, x: Tensor, p: AugmentParams) -> Tensor:
        # Reflect-pad once (cheap on uint8). On CPU, copying each image's window is fastest
        # (memcpy-like slices); elsewhere one vectorised copy avoids B kernel launches.
        xp = nnf.pad(x, (self.pad,) * 4, mode="reflect") if self.pad > 0 else x
        if x.device.type == "cpu":
            return self._crop_flip_loop(xp, p, x.shape[-1])
        return self._crop_flip_vectorised(xp, p, x.shape[-1])

    @staticmethod
    def _crop_flip_loop(xp: Tensor, p: AugmentParams, size: int) -> Tensor:
        """Crop ``size`` x ``size`` windows from padded ``xp`` image by image, flipping some."""
        out = torch.empty(xp.shape[:2] + (size, size), dtype=xp.dtype, device=xp.device)
        for i, (t, le, fl) in enumerate(zip(p.top.tolist(), p.left.tolist(), p.flip.tolist(), strict=True)):
            win = xp[i, :, t : t + size, le : le + size]
            out[i] = win.flip(-1) if fl else win
        return out

    @staticmethod
    def _crop_flip_vectorised(xp: Tensor, p: AugmentParams, size: int) -> Tensor:
        """Same as :meth:`_crop_flip_loop` with one gather: each image's rows and (reversed when
        flipped) columns are indices into padded ``xp``, sent to the device in one copy."""
        ar = torch.arange(size)
        rows = p.top.view(-1, 1) + ar  # (B, H)
        cols = p.left.view(-1, 1) + torch.where(p.flip.view(-1, 1), size - 1 - ar, ar)  # (B, W)
        rc = _to_device(torch.cat([rows, cols], dim=1), xp.device)
        bi = torch.arange(xp.shape[0], device=xp.device).view(-1, 1, 1)
        out = xp[bi, :, rc[:, :size, None], rc[:, None, size:]]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous()

    def _apply_slot(self, x: Tensor, ops: Tensor, apply: Tensor, level: Tensor, sign: Tensor) -> Tensor:
        """One RandAugment slot: every image runs the op it drew (or none) with its own argument.

        The batch is sorted by op (one ``index_select``), each op runs once on its contiguous
        slice (all geometric ops together: one warp), and the slices are concatenated and put
        back in order (one more ``index_select``). The draws are CPU tensors, so the plan is
        made on the host and reaches the device in a few non-blocking copies, with no sync. No
        ``index_copy_``/``index_put_``: on a GPU in deterministic mode each of those becomes a
        sort-based scatter of ~20 launches, and launches are what a GPU batch costs the host.
        """
        s = self.image_size
        op_of = torch.where(apply, ops, _IDENTITY)
        args = torch.zeros(len(op_of), dtype=torch.float64)
        for j in torch.unique(op_of).tolist():
            m = op_of == j
            args[m] = op_argument(OPS[j], level[m], sign[m], s)
        # threshold 256 (Solarize at level 10) inverts nothing: no work
        op_of[(op_of == _SOLARIZE) & (args > 255)] = _IDENTITY
        if bool((op_of == _IDENTITY).all()):
            return x
        group = torch.where(torch.isin(op_of, _GEOMETRIC_INDEX), _GEOMETRIC_GROUP, op_of)
        order = torch.argsort(group, stable=True)
        group, op_sorted, args = group[order], op_of[order], args[order]
        plan = _to_device(torch.cat([order, torch.argsort(order)]), x.device)  # (2B,) one copy
        order_d, inverse_d = plan[: len(order)], plan[len(order):]
        args_d = _to_device(args, x.device)
        xs = x.index_select(0, order_d)
        pieces, start = [], 0
        for g, count in zip(*torch.unique_consecutive(group, return_counts=True), strict=True):
            g, stop = int(g), start + int(count)
            part = xs[start:stop]
            if g == _IDENTITY:
                pieces.append(part)
            elif g == _GEOMETRIC_GROUP:
                names = [OPS[j] for j in op_sorted[start:stop].tolist()]
                pieces.append(_affine_batch(part, _geometric_theta(names, args[start:stop], s, s)))
            else:
                pieces.append(_colour_batch(part, OPS[g], args_d[start:stop]))
            start = stop
        return torch.cat(pieces).index_select(0, inverse_d)

    def _cutout(self, x: Tensor, cy: Tensor, cx: Tensor) -> Tensor:
        if x.device.type == "cpu":
            return self._cutout_indexed(x, cy, cx, self.cutout)
        return self._cutout_masked(x, cy, cx, self.cutout)

    @staticmethod
    def _cutout_indexed(x: Tensor, cy: Tensor, cx: Tensor, size: int) -> Tensor:
        """Fill each image's clipped ``size`` box around ``(cy, cx)`` with gray, in place.

        Writes only the B * size**2 box pixels (index_put_), fastest on a CPU: a full-batch
        mask costs ~10x more there. Indices outside the image are clamped onto its edge
        row/column, which always lies inside the clipped box, so clamping reproduces the
        clipping (duplicates write 128 too).
        """
        b, _, h, w = x.shape
        ar = torch.arange(size)
        rows = _to_device((cy.view(-1, 1) - size // 2 + ar).clamp(0, h - 1), x.device)  # (B, size)
        cols = _to_device((cx.view(-1, 1) - size // 2 + ar).clamp(0, w - 1), x.device)
        bi = torch.arange(b, device=x.device).view(-1, 1, 1)
        x[bi, :, rows.view(b, -1, 1), cols.view(b, 1, -1)] = FILL
        return x

    @staticmethod
    def _cutout_masked(x: Tensor, cy: Tensor, cx: Tensor, size: int) -> Tensor:
        """Same as :meth:`_cutout_indexed` as one masked fill: a few launches on a GPU and no
        ``index_put_`` (a sort-based scatter in deterministic mode, see ``_apply_slot``)."""
        b, _, h, w = x.shape
        dev = x.device
        y0, y1 = cutout_box(cy, size, h)
        x0, x1 = cutout_box(cx, size, w)
        box = _to_device(torch.stack([y0, y1, x0, x1]), dev).view(4, b, 1)
        ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
        rows_in = (ar_h >= box[0]) & (ar_h < box[1])  # (B, H)
        cols_in = (ar_w >= box[2]) & (ar_w < box[3])  # (B, W)
        return x.masked_fill_((rows_in[:, :, None] & cols_in[:, None, :]).unsqueeze(1), FILL)


def normalize(
    x: Tensor,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """uint8 ``(..., 3, H, W)`` -> ``dtype`` ``(x / 255 - mean) / std`` on ``x.device``.

    Elementwise only, so a channels_last input gives a channels_last output.
    """
    m = _to_device(torch.tensor(mean, dtype=torch.float64).mul(255.0), x.device, dtype).view(-1, 1, 1)
    sd = _to_device(torch.tensor(std, dtype=torch.float64).mul(255.0), x.device, dtype).view(-1, 1, 1)
    return x.to(dtype).sub_(m).div_(sd)
