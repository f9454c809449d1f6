"""Property tests for the weak/strong views: per-sample (torchvision v2) vs batched (BatchAugment)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from dnfer.data.transforms import (
    FILL,
    GEOMETRIC_OPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    OPS,
    BatchAugment,
    _affine_batch,
    _colour_batch,
    _geometric_theta,
    apply_op,
    default_cutout,
    default_pad,
    normalize,
    op_argument,
    sample_op_params,
    strong_transform,
    weak_transform,
)
from dnfer.errors import ConfigError, DataError

S = 16  # tiny images keep the file fast


def _image(seed: int, size: int = S, low: int = 0, high: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (3, size, size), generator=g, dtype=torch.uint8)


def _candidates(x: torch.Tensor, pad: int) -> tuple[torch.Tensor, list[tuple[int, int, bool]]]:
    """Every crop (dy, dx in [-pad, pad]) of the reflect-padded image, unflipped and flipped."""
    padded = torch.nn.functional.pad(x[None].float(), (pad,) * 4, mode="reflect")[0].to(torch.uint8)
    h, w = x.shape[-2:]
    imgs, keys = [], []
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            crop = padded[:, dy + pad : dy + pad + h, dx + pad : dx + pad + w]
            for flip in (False, True):
                imgs.append(crop.flip(-1) if flip else crop)
                keys.append((dy, dx, flip))
    return torch.stack(imgs), keys


def _identify(outs: torch.Tensor, x: torch.Tensor, pad: int) -> list[tuple[int, int, bool]]:
    """(dy, dx, flip) of each weak output, found by exact match against all candidates."""
    cands, keys = _candidates(x, pad)
    eq = (outs[:, None] == cands[None]).flatten(2).all(-1)  # (N, K)
    assert bool(eq.any(1).all()), "a weak output is not a reflect-pad crop (+flip) of the input"
    return [keys[int(i)] for i in eq.float().argmax(1)]


def _per_sample(tf, x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.stack([tf(x) for _ in range(n)])


def _batched(aug: BatchAugment, x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    return aug(x.expand(n, -1, -1, -1).contiguous(), torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------


def test_defaults_scale_with_image_size() -> None:
    assert default_pad(224) == 4 and default_cutout(224) == 16  # the paper's values
    assert default_pad(112) == 2 and default_cutout(112) == 8
    assert default_pad(64) == 1 and default_cutout(64) == 5
    assert default_pad(16) == 1 and default_cutout(8) == 1  # never silently disabled
    assert BatchAugment(112, strong=True).pad == 2


@pytest.mark.parametrize("strong", [False, True])
def test_outputs_are_uint8_same_shape_and_device(strong: bool) -> None:
    x = _image(0, 20)
    tf = strong_transform(20) if strong else weak_transform(20)
    y = tf(x)
    assert y.dtype == torch.uint8 and y.shape == x.shape and y.device == x.device
    xb = torch.stack([_image(i, 20) for i in range(5)])
    yb = BatchAugment(20, strong=strong)(xb)
    assert yb.dtype == torch.uint8 and yb.shape == xb.shape and yb.device == xb.device
    assert torch.equal(xb, torch.stack([_image(i, 20) for i in range(5)])), "input was modified"


def test_flip_and_crop_statistics_match_between_implementations() -> None:
    pad, n = 2, 400
    x = _image(1)
    per = _identify(_per_sample(weak_transform(S, pad=pad), x, n, seed=0), x, pad)
    bat = _identify(_batched(BatchAugment(S, strong=False, pad=pad), x, n, seed=0), x, pad)
    tol_flip = 4 * math.sqrt(0.25 / n)
    offsets = range(-pad, pad + 1)
    p_bin = 1 / len(offsets)
    tol_bin = 4 * math.sqrt(p_bin * (1 - p_bin) / n)
    freqs = {}
    for name, keys in (("per-sample", per), ("batched", bat)):
        flips = np.mean([k[2] for k in keys])
        assert abs(flips - 0.5) < tol_flip, f"{name} flip rate {flips}"
        for axis in (0, 1):
            vals = [k[axis] for k in keys]
            assert set(vals) == set(offsets), f"{name} offsets {sorted(set(vals))} do not cover [-pad, pad]"
            f = np.array([vals.count(o) / n for o in offsets])
            assert np.all(np.abs(f - p_bin) < tol_bin), f"{name} axis {axis} offsets not uniform: {f}"
            freqs[name, axis] = f
    for axis in (0, 1):
        diff = np.abs(freqs["per-sample", axis] - freqs["batched", axis])
        assert np.all(diff < math.sqrt(2) * tol_bin)


def test_cpu_and_vectorised_crop_paths_agree() -> None:
    # The CPU path copies image by image; other devices use the vectorised path: same result.
    aug = BatchAugment(S, strong=False, pad=3)
    xb = torch.stack([_image(i) for i in range(12)])
    p = aug.sample_params(12, torch.Generator().manual_seed(0))
    xp = torch.nn.functional.pad(xb, (3,) * 4, mode="reflect")
    assert p.flip.any() and not p.flip.all()
    assert torch.equal(aug._crop_flip_loop(xp, p, S), aug._crop_flip_vectorised(xp, p, S))


@pytest.mark.parametrize("cut", [1, 4, 5, S])
def test_cpu_and_masked_cutout_paths_agree(cut: int) -> None:
    # The CPU writes the box pixels by index; other devices fill a mask: same result, centres
    # at the edges (clipped boxes) included.
    xb = torch.stack([_image(i) for i in range(40)])
    g = torch.Generator().manual_seed(1)
    cy, cx = torch.randint(0, S, (40,), generator=g), torch.randint(0, S, (40,), generator=g)
    cy[:4], cx[:4] = torch.tensor([0, S - 1, 0, S - 1]), torch.tensor([0, 0, S - 1, S - 1])
    indexed = BatchAugment._cutout_indexed(xb.clone(), cy, cx, cut)
    masked = BatchAugment._cutout_masked(xb.clone(), cy, cx, cut)
    assert torch.equal(indexed, masked) and not torch.equal(masked, xb)


def test_identity_when_everything_but_flip_is_disabled() -> None:
    x = _image(2)
    for tf in (weak_transform(S, pad=0), strong_transform(S, pad=0, num_ops=0, cutout=0)):
        outs = _per_sample(tf, x, 40, seed=1)
        is_id = (outs == x).flatten(1).all(1)
        is_flip = (outs == x.flip(-1)).flatten(1).all(1)
        assert bool((is_id | is_flip).all()) and is_id.any() and is_flip.any()
    for aug in (
        BatchAugment(S, strong=False, pad=0),
        BatchAugment(S, strong=True, pad=0, num_ops=0, cutout=0),
    ):
        outs = _batched(aug, x, 40, seed=1)
        is_id = (outs == x).flatten(1).all(1)
        is_flip = (outs == x.flip(-1)).flatten(1).all(1)
        assert bool((is_id | is_flip).all()) and is_id.any() and is_flip.any()


@pytest.mark.parametrize("cut", [4, 5])
def test_cutout_fills_a_clipped_box_with_gray(cut: int) -> None:
    x = _image(3, low=0, high=100)  # no pixel equals 128, so the box is exactly the 128s
    n = 200
    per = _per_sample(strong_transform(S, pad=0, num_ops=0, cutout=cut), x, n, seed=2)
    bat = _batched(BatchAugment(S, strong=True, pad=0, num_ops=0, cutout=cut), x, n, seed=2)
    for name, outs in (("per-sample", per), ("batched", bat)):
        full = 0
        cover_rows = torch.zeros(S)
        cover_cols = torch.zeros(S)
        for y in outs:
            gray = (y == FILL).all(0)
            rows, cols = gray.any(1).nonzero().flatten(), gray.any(0).nonzero().flatten()
            h, w = len(rows), len(cols)
            assert 1 <= h <= cut and 1 <= w <= cut, f"{name}: box {h}x{w}"
            assert int(gray.sum()) == h * w, f"{name}: the filled area is not a rectangle"
            assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w
            rest = ~gray
            ok = (y == x).all(0)[rest].all() or (y == x.flip(-1)).all(0)[rest].all()
            assert ok, f"{name}: pixels outside the box changed"
            full += h == cut and w == cut
            cover_rows += gray.any(1).float() / n
            cover_cols += gray.any(0).float() / n
        # centre uniform: the box [c - cut//2, c - cut//2 + cut) is whole for S - cut + 1 centres
        p_full = ((S - cut + 1) / S) ** 2
        assert abs(full / n - p_full) < 4 * math.sqrt(p_full * (1 - p_full) / n), (name, full / n, p_full)
        # and row i is covered by the centres c with c - cut//2 <= i < c - cut//2 + cut
        c = torch.arange(S).view(-1, 1)
        i = torch.arange(S).view(1, -1)
        p_cover = ((c - cut // 2 <= i) & (i < c - cut // 2 + cut)).float().mean(0)
        tol = 4 * torch.sqrt(p_cover * (1 - p_cover) / n) + 0.02
        assert bool(((cover_rows - p_cover).abs() < tol).all()), f"{name}: box rows not uniform"
        assert bool(((cover_cols - p_cover).abs() < tol).all()), f"{name}: box columns not uniform"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("level", [10, 4])
def test_each_batched_op_matches_torchvision_functional(op: str, level: int) -> None:
    xs = torch.stack([_image(10 + i, 24, low=20, high=230) for i in range(4)])
    lv = torch.full((4,), float(level), dtype=torch.float64)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    args = op_argument(op, lv, sign, 24)
    ref = torch.stack([apply_op(xi, op, float(a)) for xi, a in zip(xs, args, strict=True)])
    if op in GEOMETRIC_OPS:
        got = _affine_batch(xs.clone(), _geometric_theta([op] * 4, args, 24, 24))
    elif op == "Identity":
        got = apply_op(xs, op, 0.0)
    else:
        got = _colour_batch(xs.clone(), op, args)
    diff = (got.int() - ref.int()).abs()
    assert int(diff.max()) <= 1, f"{op}: max diff {int(diff.max())}"
    assert float((diff > 0).float().mean()) < 0.02, f"{op}: too many off-by-one pixels"
    # every op changes the image except Identity, Solarize at level 10 (the authors' threshold
    # 256) and translations that round to 0 px at this size
    noop = (
        op == "Identity"
        or (op == "Solarize" and level == 10)
        or (op in GEOMETRIC_OPS and bool((args == 0).all()))
    )
    assert torch.equal(ref, xs) == noop


@pytest.mark.parametrize(
    ("op", "arg", "pil"),
    [
        ("Posterize", 4.0, lambda im: ImageOps.posterize(im, 4)),
        ("Solarize", 128.0, lambda im: ImageOps.solarize(im, 128)),
        ("Equalize", 0.0, ImageOps.equalize),
        ("Solarize", 256.0, lambda im: im),
    ],
)
def test_ops_match_pil(op: str, arg: float, pil) -> None:
    x = _image(20, 24)
    want = torch.from_numpy(np.array(pil(Image.fromarray(x.permute(1, 2, 0).numpy())))).permute(2, 0, 1)
    assert torch.equal(apply_op(x, op, arg), want)


def test_geometric_ops_hand_checked() -> None:
    x = _image(21, 24)
    t = int(op_argument("TranslateX", torch.tensor([10.0]), torch.tensor([1.0]), 24)[0])
    assert t == round(10 * 24 / 224) == 1
    for out in (
        apply_op(x, "TranslateX", t),
        _affine_batch(x[None].clone(), _geometric_theta(["TranslateX"], torch.tensor([float(t)]), 24, 24))[0],
    ):
        assert torch.equal(out[..., t:], x[..., :-t]) and bool((out[..., :t] == FILL).all())
    for out in (
        apply_op(x, "TranslateY", -t),
        _affine_batch(x[None].clone(), _geometric_theta(["TranslateY"], torch.tensor([-float(t)]), 24, 24))[
            0
        ],
    ):
        assert torch.equal(out[..., :-t, :], x[..., t:, :]) and bool((out[..., -t:, :] == FILL).all())
    # rotating a constant image keeps the centre and fills the corners with 128
    c = torch.full((3, 24, 24), 40, dtype=torch.uint8)
    for out in (
        apply_op(c, "Rotate", 30.0),
        _affine_batch(c[None].clone(), _geometric_theta(["Rotate"], torch.tensor([30.0]), 24, 24))[0],
    ):
        assert bool((out[:, 8:16, 8:16] == 40).all()) and bool((out[:, 0, 0] == FILL).all())


def test_strong_view_draws_differ_across_the_batch() -> None:
    aug = BatchAugment(S, strong=True, pad=0, cutout=0)
    p = aug.sample_params(64, torch.Generator().manual_seed(3))
    applied = p.ops[p.apply]
    assert len(set(applied.tolist())) >= 8, "the batch shares its ops"
    assert 0.35 < float(p.apply.float().mean()) < 0.65
    x = _image(4)
    outs = _batched(aug, x, 64, seed=3)
    distinct = len({bytes(o.flatten().numpy()) for o in outs})
    assert distinct >= 16, f"only {distinct} distinct strong views of one image in a batch of 64"


def test_op_draws_are_uniform_with_replacement() -> None:
    ops, apply, level, sign = sample_op_params(3000, 2, 10, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(ops.flatten(), minlength=len(OPS)).float() / ops.numel()
    assert float((counts - 1 / len(OPS)).abs().max()) < 0.02
    assert float((ops[:, 0] == ops[:, 1]).float().mean()) > 0.03  # with replacement
    assert (
        abs(float(apply.float().mean()) - 0.5) < 0.03 and abs(float((sign > 0).float().mean()) - 0.5) < 0.03
    )
    assert bool((level == 10).all())
    _, _, lv, _ = sample_op_params(
        3000, 1, 10, random_magnitude=True, generator=torch.Generator().manual_seed(0)
    )
    assert set(lv.flatten().tolist()) == {float(i) for i in range(1, 11)}


def test_strong_views_have_the_same_statistics_in_both_implementations() -> None:
    x = _image(5, low=30, high=220)
    n = 300
    per = _per_sample(strong_transform(S), x, n, seed=4).float()
    bat = _batched(BatchAugment(S, strong=True), x, n, seed=4).float()
    for stat in (lambda o: o.mean((1, 2, 3)), lambda o: (o == FILL).all(1).flatten(1).float().mean(1),
                 lambda o: o.std((1, 2, 3))):  # fmt: skip
        a, b = stat(per), stat(bat)
        se = math.sqrt(float(a.var()) / n + float(b.var()) / n)
        assert abs(float(a.mean()) - float(b.mean())) < 4 * se + 1e-6


def test_batched_determinism_under_a_seed() -> None:
    xb = torch.stack([_image(i) for i in range(8)])
    for strong in (False, True):
        aug = BatchAugment(S, strong=strong)
        a = aug(xb, torch.Generator().manual_seed(7))
        b = aug(xb, torch.Generator().manual_seed(7))
        c = aug(xb, torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(9)
    a = BatchAugment(S, strong=True)(xb)
    torch.manual_seed(9)
    assert torch.equal(a, BatchAugment(S, strong=True)(xb)), "default generator must follow torch.manual_seed"


class _Images(torch.utils.data.Dataset):
    def __init__(self, tf) -> None:
        self.tf = tf

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tf(_image(i))


def test_per_sample_determinism_under_a_seed() -> None:
    x = _image(6)
    tf = strong_transform(S)
    a, b, c = (_per_sample(tf, x, 6, seed=s) for s in (11, 11, 12))
    assert torch.equal(a, b) and not torch.equal(a, c)

    def run(seed: int) -> torch.Tensor:
        dl = torch.utils.data.DataLoader(_Images(tf), batch_size=4, num_workers=2,
                                         generator=torch.Generator().manual_seed(seed))  # fmt: skip
        return torch.cat(list(dl))

    r1, r2, r3 = run(5), run(5), run(6)
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)


def test_normalize_values_and_channels_last() -> None:
    x = torch.stack([_image(i) for i in range(2)])
    y = normalize(x)
    assert y.dtype == torch.float32
    want = (x.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        1, 3, 1, 1
    )
    assert torch.allclose(y, want, atol=1e-5)
    cl = normalize(x.contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, want, atol=1e-5)
    assert normalize(x[0]).shape == (3, S, S)


def test_bad_options_and_inputs_raise_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="pad"):
        weak_transform(S, pad=S)
    with pytest.raises(ConfigError, match="magnitude"):
        BatchAugment(S, strong=True, magnitude=11)
    with pytest.raises(ConfigError, match="cutout"):
        strong_transform(S, cutout=-1)
    with pytest.raises(DataError, match=r"\(3, 16, 16\)"):
        weak_transform(S)(torch.zeros(3, 20, 20, dtype=torch.uint8))
    with pytest.raises(DataError, match="uint8"):
        BatchAugment(S, strong=False)(torch.zeros(2, 3, S, S))


def test_autocontrast_is_torchvisions_without_mask_writes() -> None:
    # Our AutoContrast avoids torchvision's boolean-mask writes (a GPU sync each): same bits,
    # including channels of a single grey level (left as they are) and narrow ranges.
    from torchvision.transforms.v2 import functional as tvf

    from dnfer.data.transforms import _autocontrast

    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = torch.randint(0, 256, (8, 3, 9, 9), generator=g, dtype=torch.uint8)
        low = torch.randint(0, 255, (8, 3, 1, 1), generator=g)
        span = torch.randint(0, 4, (8, 3, 1, 1), generator=g)  # 0 = a flat channel
        narrow = (low + x.long() % (span + 1)).clamp(0, 255).to(torch.uint8)
        for img in (x, narrow):
            assert torch.equal(_autocontrast(img), tvf.autocontrast(img))
