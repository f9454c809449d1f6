"""Procedural synthetic facial-expression dataset: dnfer's default, download-free data.

Faces are drawn from action units (AUs): each class is an EMFACS prototype (Friesen & Ekman's
emotion FACS; the units are listed in docs/synthetic.md) whose units are scaled by a per-sample
intensity and jittered per unit, so weak expressions approach neutral and classes that share units
(fear/surprise, anger/disgust, sadness/neutral) genuinely overlap. Identity, pose, lighting,
background clutter, occlusion, blur, sensor noise and JPEG artefacts vary independently of the label
(ranges: docs/synthetic.md).

Pure API (keyword-only options):

- :func:`sample_expression_params` ``(rng, label, ...) -> FaceParams``
- :func:`~dnfer.data.synth_render.render_face` ``(params, *, image_size) -> uint8 (H, W, 3)``
- :func:`generate` ``(n, *, seed, split, image_size, ...) -> (images, labels, params)``
- :func:`labels_for` ``(n, *, seed, split, ...) -> int64 (n,)``
- :func:`generate_identities` ``(n_identities, images_per_identity, *, seed, ...)``: the
  identity mode (people disjoint from the FER splits' people) for ``dnfer pretrain``

Image ``i`` of a split depends only on ``(seed, split, i)`` (its random numbers are a
counter-based hash of ``(seed, split_id, i, draw)``, see :func:`counter_draws`, and its label
comes from a seeded low-discrepancy sequence), so any slice can be generated in any process and
equals the same slice of a longer run. The registered ``synthetic`` dataset loader caches generated arrays.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dnfer.data.base import FERDataset, Split
from dnfer.data.classes import BASIC7, CANONICAL_CLASSES, canonical_name
from dnfer.data.synth_render import AU_INDEX, AUS, FaceParams, face_landmarks, render_face, render_faces
from dnfer.errors import ConfigError
from dnfer.registry import DATASETS

__all__ = [
    "GENERATOR_VERSION",
    "PROTOTYPES",
    "RAF_TRAIN_COUNTS",
    "RAF_TEST_COUNTS",
    "FaceParams",
    "class_probabilities",
    "contact_sheet",
    "face_landmarks",
    "generate",
    "generate_identities",
    "labels_for",
    "load_synthetic",
    "render_face",
    "sample_expression_params",
]

#: Bump whenever the images for given parameters change (invalidates caches).
GENERATOR_VERSION = "5"

SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}

#: RAF-DB basic-expression counts (http://www.whdeng.cn/RAF/model1.html), RAF order.
RAF_TRAIN_COUNTS: dict[str, int] = dict(zip(BASIC7, (1290, 281, 717, 4772, 1982, 705, 2524), strict=True))
RAF_TEST_COUNTS: dict[str, int] = dict(zip(BASIC7, (329, 74, 160, 1185, 478, 162, 680), strict=True))
#: Share of contempt when it is enabled (RAF-DB has none; it is rare in FERPlus/AffectNet too).
CONTEMPT_SHARE = 0.02

#: EMFACS prototypes: class -> variants; a variant is a list of (AU, weight, probability present).
#: Weights < 1 are units that are weaker in the prototype; probabilities < 1 are optional units.
PROTOTYPES: dict[str, list[list[tuple[int, float, float]]]] = {
    "surprise": [[(1, 1.0, 1.0), (2, 1.0, 1.0), (5, 0.9, 1.0), (26, 1.0, 1.0), (25, 1.0, 1.0)]],
    "fear": [[(1, 1.0, 1.0), (2, 0.7, 1.0), (4, 0.7, 1.0), (5, 1.0, 1.0), (7, 0.4, 1.0), (20, 1.0, 1.0),
              (26, 0.55, 1.0), (25, 1.0, 1.0)]],
    "disgust": [
        [(9, 1.0, 1.0), (15, 0.7, 1.0), (16, 0.6, 1.0), (4, 0.35, 0.7), (25, 0.4, 0.5)],
        [(9, 0.7, 1.0), (10, 1.0, 1.0), (15, 0.3, 0.5), (4, 0.35, 0.7), (25, 0.5, 0.5)],
    ],
    "happiness": [[(6, 0.8, 1.0), (12, 1.0, 1.0), (25, 0.9, 0.5), (26, 0.3, 0.2)]],
    "sadness": [[(1, 1.0, 1.0), (4, 0.6, 1.0), (15, 1.0, 1.0), (17, 0.6, 0.6)]],
    "anger": [
        [(4, 1.0, 1.0), (5, 0.6, 1.0), (7, 0.9, 1.0), (23, 1.0, 1.0), (24, 0.8, 0.7)],
        [(4, 1.0, 1.0), (5, 0.7, 1.0), (7, 0.8, 1.0), (23, 0.6, 1.0), (10, 0.5, 1.0), (25, 0.8, 1.0),
         (26, 0.4, 1.0)],
    ],
    "neutral": [[]],
    "contempt": [[(12, 0.6, 1.0), (14, 0.9, 1.0)]],
}

#: Defaults of the generator (and of the loader options of the same name).
DEFAULTS: dict[str, Any] = {
    "n_train": 5000,
    "n_test": 1500,
    "balanced": False,
    "contempt": False,
    "min_intensity": 0.25,
    "max_intensity": 1.0,
    "nuisance": 0.6,
    "supersample": 1,
    "cache": True,
    "workers": 1,
}

_SKIN_LIGHT = (242.0, 208.0, 184.0)
_SKIN_DARK = (92.0, 60.0, 44.0)
_HAIR = ((25.0, 20.0, 18.0), (55.0, 38.0, 28.0), (100.0, 70.0, 45.0), (200.0, 170.0, 110.0), (150.0, 70.0, 35.0),
         (150.0, 150.0, 150.0))
_IRIS = ((70.0, 45.0, 30.0), (40.0, 30.0, 25.0), (70.0, 110.0, 150.0), (80.0, 110.0, 70.0))
_PHI = (math.sqrt(5.0) - 1.0) / 2.0


# --- labels ------------------------------------------------------------------------------------


def class_probabilities(
    class_names: Sequence[str], *, split: str = "train", balanced: bool = False
) -> np.ndarray:
    """float64 ``(K,)`` class frequencies: RAF-DB's (train or test counts) or uniform."""
    names = [canonical_name(c) for c in class_names]
    k = len(names)
    if balanced:
        return np.full(k, 1.0 / k)
    counts = RAF_TEST_COUNTS if split == "test" else RAF_TRAIN_COUNTS
    basic = np.array([counts.get(c, 0) for c in names], dtype=np.float64)
    probs = basic / basic.sum()
    if "contempt" in names:
        probs *= 1.0 - CONTEMPT_SHARE
        probs[names.index("contempt")] = CONTEMPT_SHARE
    return probs


def _split_id(split: str) -> int:
    if split not in SPLIT_IDS:
        raise ConfigError(f"unknown synthetic split {split!r}; valid: {', '.join(SPLIT_IDS)}")
    return SPLIT_IDS[split]


def labels_for(
    n: int, *, seed: int, split: str = "train", class_names: Sequence[str] = BASIC7, balanced: bool = False,
    start: int = 0,
) -> np.ndarray:
    """int64 ``(n,)`` labels of images ``start .. start+n-1``.

    Label ``i`` is the class whose cumulative-frequency interval holds ``frac(o + i * phi)``
    (a golden-ratio sequence with a seeded offset ``o``): it depends only on ``(seed, split, i)``
    and the class frequencies of *every* prefix match the target to within a few samples, unlike
    i.i.d. draws (where fear, 2.3% of RAF-DB, would vary by +-15% at n=5000).
    """
    offset = np.random.default_rng([seed, _split_id(split), 2**31 - 1]).random()
    i = np.arange(start, start + n, dtype=np.float64)
    u = np.mod(offset + i * _PHI, 1.0)
    cdf = np.cumsum(class_probabilities(class_names, split=split, balanced=balanced))
    cdf[-1] = 1.0 + 1e-12
    return np.searchsorted(cdf, u, side="right").astype(np.int64)


# --- parameter sampling ------------------------------------------------------------------------


_N_UNI, _N_NORM, _N_CLUTTER = 96, 48, 54


class _Draws:
    """A fixed block of random numbers consumed in order, so every sample uses the same amount of
    randomness whatever its label (one block instead of ~100 scalar rng calls: speed)."""

    __slots__ = ("_u", "_n", "clutter")

    def __init__(self, u: list[float], n: list[float], clutter: list[float]) -> None:
        self._u = iter(u)
        self._n = iter(n)
        self.clutter = clutter

    @classmethod
    def from_rng(cls, rng: np.random.Generator) -> _Draws:
        return cls(rng.random(_N_UNI).tolist(), rng.standard_normal(_N_NORM).tolist(), rng.random(_N_CLUTTER).tolist())

    def uni(self, lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * next(self._u)

    def norm(self, sd: float = 1.0) -> float:
        return sd * next(self._n)

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[min(int(self.uni() * len(seq)), len(seq) - 1)]


@functools.lru_cache(maxsize=32)
def _canonical_tuple(class_names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(canonical_name(c) for c in class_names)


def _c255(v: float) -> float:
    return min(max(v, 0.0), 255.0)


def _skin_rgb(tone: float) -> tuple[float, float, float]:
    """Skin colour on the light (0) .. dark (1) continuum."""
    (r0, g0, b0), (r1, g1, b1), w = _SKIN_LIGHT, _SKIN_DARK, 1 - tone
    return (r0 * w + r1 * tone, g0 * w + g1 * tone, b0 * w + b1 * tone)


def sample_expression_params(
    rng: np.random.Generator,
    label: int | str,
    *,
    class_names: Sequence[str] = BASIC7,
    intensity: float | None = None,
    min_intensity: float = DEFAULTS["min_intensity"],
    max_intensity: float = DEFAULTS["max_intensity"],
    nuisance: float = DEFAULTS["nuisance"],
) -> FaceParams:
    """Sample identity, expression (AUs), pose and nuisances for one image of class ``label``.

    Args:
        rng: consumed by the same three calls whatever the label (so two classes sampled from
            equal generators share identity, pose and nuisances, which the contact sheet uses).
            :func:`generate` feeds the same sampler from :func:`counter_draws` instead.
        label: index into ``class_names`` or a class name.
        intensity: expression strength in [0, 1]; None draws it uniformly from
            ``[min_intensity, max_intensity]``. Neutral always has intensity 0.
        nuisance: scales every nuisance range and probability (0 = clean frontal studio faces,
            1 = default, 2 = harsh).
    """
    return _sample(_Draws.from_rng(rng), label, class_names=class_names, intensity=intensity,
                   min_intensity=min_intensity, max_intensity=max_intensity, nuisance=nuisance)


def _sample(
    d: _Draws, label: int | str, *, class_names: Sequence[str], intensity: float | None, min_intensity: float,
    max_intensity: float, nuisance: float,
) -> FaceParams:
    names = _canonical_tuple(tuple(class_names))
    if isinstance(label, str):
        label = names.index(canonical_name(label))
    expr = names[int(label)]
    nu = float(nuisance)

    def prob(pr: float) -> bool:
        return d.uni() < min(pr * nu, 1.0)

    p = FaceParams(label=int(label), expression=expr)
    # Identity.
    p.face_w = d.uni(0.82, 0.98)
    p.face_top = d.uni(1.05, 1.2)
    p.face_bot = d.uni(1.12, 1.3)
    p.jaw_taper = d.uni(0.15, 0.4)
    tone = d.uni()
    sk = _skin_rgb(tone)
    p.skin = (_c255(sk[0] + d.norm(6)), _c255(sk[1] + d.norm(5)), _c255(sk[2] + d.norm(5)))
    p.eye_y = d.uni(-0.2, -0.08)
    p.eye_sep = d.uni(0.37, 0.45)
    p.eye_w = d.uni(0.16, 0.21)
    p.eye_open = d.uni(0.065, 0.09)
    p.eye_low = d.uni(0.045, 0.065)
    p.iris_r = d.uni(0.075, 0.095)
    p.iris_color = d.pick(_IRIS)
    hs = d.uni(0.85, 1.15)
    p.hair_color = tuple(_c255(c * hs) for c in d.pick(_HAIR))  # type: ignore[assignment]
    bs = d.uni(0.45, 0.75)
    p.brow_color = tuple(_c255(h * bs + k * 0.15) for h, k in zip(p.hair_color, p.skin, strict=True))  # type: ignore[assignment]
    p.brow_dist = d.uni(0.17, 0.24)
    p.brow_thick = d.uni(0.055, 0.09)
    p.brow_arch = d.uni(0.02, 0.07)
    p.nose_y = d.uni(0.25, 0.35)
    p.nose_w = d.uni(0.11, 0.16)
    p.mouth_y = d.uni(0.56, 0.68)
    p.mouth_w = d.uni(0.28, 0.36)
    p.lip_up = d.uni(0.04, 0.07)
    p.lip_lo = d.uni(0.055, 0.09)
    w = d.uni(0.3, 0.6)
    p.lip_color = tuple(k * (1 - w) + r * w for k, r in zip(p.skin, (190.0, 80.0, 85.0), strict=True))  # type: ignore[assignment]
    r = d.uni()
    p.hair_style = 0 if r < 0.1 else 1 if r < 0.5 else 2 if r < 0.8 else 3
    p.hairline = d.uni(-0.78, -0.58)
    fh_kind, fh_on = 1 + int(d.uni() * 3), d.uni() < 0.15
    p.facial_hair = fh_kind if fh_on else 0
    g = d.uni()
    p.glasses = 2 if g < min(0.03 * nu, 0.2) else 1 if g < min(0.18 * nu, 0.5) else 0
    p.glasses_round = d.uni() < 0.5
    p.glasses_color = d.pick(((20.0, 20.0, 20.0), (90.0, 60.0, 30.0), (150.0, 150.0, 160.0), (120.0, 20.0, 30.0)))
    p.rest_curve = d.norm(0.02)
    p.rest_brow = d.norm(0.02)
    p.age = d.uni() ** 2 * 0.6
    p.clothes_color = (d.uni(20, 235), d.uni(20, 235), d.uni(20, 235))
    p.gaze = (d.norm(0.02), d.norm(0.015))

    # Expression: prototype AUs x intensity x per-unit jitter, plus small resting activity.
    variants = PROTOTYPES[expr]
    variant = variants[min(int(d.uni() * len(variants)), len(variants) - 1)]
    s_draw = d.uni()
    if expr == "neutral":
        s = 0.0
    elif intensity is not None:
        s = float(intensity)
    else:
        s = min_intensity + (max_intensity - min_intensity) * s_draw
    au = [abs(d.norm(0.07)) for _ in range(len(AUS))]  # resting activity of every unit
    jit = [d.norm(0.2) for _ in range(8)]
    present = [d.uni() for _ in range(8)]
    for k, (unit, weight, pr) in enumerate(variant):
        if present[k] < pr:
            au[AU_INDEX[unit]] += s * weight * math.exp(jit[k])
    # Neutral faces are not frozen: one idle unit (a faint smile, a lifted brow...) in a third.
    idle_unit, idle_amount, idle_on = d.pick(AUS), d.uni(0.0, 0.25), d.uni() < 0.35
    if expr == "neutral" and idle_on:
        au[AU_INDEX[idle_unit]] += idle_amount
    p.au = np.clip(np.array(au), 0.0, 1.0)
    p.intensity = s
    side = d.uni()
    if expr == "contempt":
        p.au_side = (1.0, 0.1) if side < 0.5 else (0.1, 1.0)
    else:
        asym = 0.15 * (2 * side - 1)
        p.au_side = (1.0 + asym, 1.0 - asym)

    # Pose.
    p.rot = min(max(d.norm(math.radians(7) * nu), -math.radians(20) * nu), math.radians(20) * nu)
    p.zoom = d.uni(1 - 0.12 * nu, 1 + 0.06 * nu)
    p.tx = d.uni(-0.05, 0.05) * nu
    p.ty = d.uni(-0.05, 0.05) * nu
    p.yaw = d.uni(-0.3, 0.3) * nu
    # Background (corner colours + clutter shapes) and lighting (2x2 gains: direction, cast).
    base = (d.uni(20, 235), d.uni(20, 235), d.uni(20, 235))
    p.bg_corners = tuple(int(min(max(base[j % 3] + d.norm(40), 0), 255)) for j in range(12))
    n_clutter = int(d.uni(0, 6) * min(nu, 2.0))
    p.clutter = tuple(d.clutter[: 9 * n_clutter])
    ang = d.uni(0, 2 * math.pi)
    k = d.uni(0.0, 0.45) * nu
    amb = d.uni(1 - 0.3 * nu, 1 + 0.12 * nu)
    cast = [1 + d.uni(-0.08, 0.08) * nu for _ in range(3)]
    lx, ly = math.cos(ang) / math.sqrt(2), math.sin(ang) / math.sqrt(2)
    gains = [amb * (1 + k * (cx * lx + cy * ly)) for cx, cy in ((-1, -1), (1, -1), (-1, 1), (1, 1))]
    p.light = tuple(int(min(max(g * c * 128, 20), 255)) for g in gains for c in cast)
    # Occlusion.
    occ_on, occ_kind = prob(0.15), d.uni()
    p.occluder = (1 if occ_kind < 0.6 else 2) if occ_on else 0
    p.occ_xy = (d.uni(-0.6, 0.6), d.uni(-0.2, 1.0))
    p.occ_size = d.uni(0.3, 0.6)
    p.occ_angle = d.norm(0.5)
    t2 = min(max(tone + d.norm(0.1), 0.0), 1.0)
    if p.occluder == 1:
        p.occ_color = _skin_rgb(t2)
    else:
        p.occ_color = (d.uni(10, 245), d.uni(10, 245), d.uni(10, 245))
    # Camera.
    blur_on, blur = prob(0.4), d.uni(0.3, 1.1)
    p.blur = blur * min(nu, 1.5) if blur_on else 0.0
    noise_on, noise = prob(0.6), d.uni(1.0, 8.0)
    p.noise = noise * nu if noise_on else 0.0
    jpeg_on, q = prob(0.5), d.uni(30, 92)
    p.jpeg = int(q) if jpeg_on else 0
    p.gray = prob(0.08)
    p.noise_offset = int(d.uni() * 2**30)
    return p


# --- generation --------------------------------------------------------------------------------


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic): a counter-based hash."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_draws(seed: int, split_id: int, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random blocks of images ``indices``: row ``r`` depends only on ``(seed, split_id, indices[r])``.

    Returns uniforms ``(N, 96)``, standard normals ``(N, 48)`` (Box-Muller) and clutter uniforms
    ``(N, 54)``, float64. A vectorised counter-based hash (SplitMix64 of the image key and the
    draw number) replaces one ``np.random.default_rng([seed, split, i])`` per image, whose
    construction alone costs ~18 us, a tenth of the per-image budget.
    """
    idx = np.asarray(indices, dtype=np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(_splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ np.uint64(split_id) << np.uint64(56))
                          ^ idx)
        width = _N_UNI + _N_NORM + _N_CLUTTER
        z = _splitmix64(key[:, None] + np.arange(1, width + 1, dtype=np.uint64) * np.uint64(0xD1B54A32D192ED03))
    u = (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    a, b = u[:, _N_UNI : _N_UNI + _N_NORM // 2], u[:, _N_UNI + _N_NORM // 2 : _N_UNI + _N_NORM]
    r = np.sqrt(-2.0 * np.log1p(-a))  # 1 - a in (0, 1]: finite
    normals = np.concatenate([r * np.cos(2 * np.pi * b), r * np.sin(2 * np.pi * b)], axis=1)
    return u[:, :_N_UNI], normals, u[:, _N_UNI + _N_NORM :]


def _gen_range(
    start: int, stop: int, labels: np.ndarray, *, seed: int, split_id: int, image_size: int,
    class_names: tuple[str, ...], min_intensity: float, max_intensity: float, nuisance: float, supersample: int,
) -> tuple[np.ndarray, list[FaceParams]]:
    images = np.empty((stop - start, image_size, image_size, 3), dtype=np.uint8)
    params: list[FaceParams] = []
    for c0 in range(start, stop, 512):
        c1 = min(c0 + 512, stop)
        uni, nrm, clut = (a.tolist() for a in counter_draws(seed, split_id, np.arange(c0, c1)))
        chunk = [_sample(_Draws(uni[k], nrm[k], clut[k]), int(labels[i - start]), class_names=class_names,
                         intensity=None, min_intensity=min_intensity, max_intensity=max_intensity, nuisance=nuisance)
                 for k, i in enumerate(range(c0, c1))]
        images[c0 - start : c1 - start] = render_faces(chunk, image_size=image_size, supersample=supersample)
        params.extend(chunk)
    return images, params


def generate(
    n: int,
    *,
    seed: int = 0,
    split: str = "train",
    image_size: int = 64,
    class_names: Sequence[str] = BASIC7,
    balanced: bool = False,
    min_intensity: float = DEFAULTS["min_intensity"],
    max_intensity: float = DEFAULTS["max_intensity"],
    nuisance: float = DEFAULTS["nuisance"],
    supersample: int = DEFAULTS["supersample"],
    start: int = 0,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray, list[FaceParams]]:
    """Generate images ``start .. start+n-1`` of a split.

    Returns ``images`` uint8 ``(n, image_size, image_size, 3)`` RGB, ``labels`` int64 ``(n,)``
    (indices into ``class_names``) and the ``n`` :class:`FaceParams` that produced them.
    ``workers`` > 1 splits the range over processes; the result is identical.
    """
    if n < 0 or image_size < 8:
        raise ConfigError(f"synthetic: need n >= 0 and image_size >= 8, got n={n}, image_size={image_size}")
    if not 0.0 <= min_intensity <= max_intensity <= 1.0:
        raise ConfigError(
            f"synthetic: need 0 <= min_intensity <= max_intensity <= 1, got {min_intensity}, {max_intensity}"
        )
    names = tuple(canonical_name(c) for c in class_names)
    labels = labels_for(n, seed=seed, split=split, class_names=names, balanced=balanced, start=start)
    kw = dict(
        seed=seed, split_id=_split_id(split), image_size=image_size, class_names=names,
        min_intensity=min_intensity, max_intensity=max_intensity, nuisance=nuisance, supersample=supersample,
    )
    if workers <= 1 or n < 256:
        images, params = _gen_range(start, start + n, labels, **kw)  # type: ignore[arg-type]
        return images, labels, params
    bounds = np.linspace(0, n, min(workers * 4, n) + 1).astype(int)
    with ProcessPoolExecutor(max_workers=workers) as ex:
        futs = [
            ex.submit(_gen_range, start + a, start + b, labels[a:b], **kw)  # type: ignore[arg-type]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            if b > a
        ]
        parts = [f.result() for f in futs]
    images = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, image_size, image_size, 3), np.uint8)
    params = [q for p in parts for q in p[1]]
    return images, labels, params


# --- identity mode (pretraining) ----------------------------------------------------------------

#: ``counter_draws`` namespaces of the identity mode. The FER splits use their split ids 0-2
#: (:data:`SPLIT_IDS`) as namespace, so identity params here never come from the same random
#: numbers as any FER image's identity (docs/synthetic.md, "Identity mode").
IDENTITY_NAMESPACE = 16  # one row per identity: its face (shape, colours, hair, glasses...)
IDENTITY_IMAGE_NAMESPACE = 17  # one row per image: expression, intensity, pose, nuisances
IDENTITY_EXPRESSION_NAMESPACE = 18  # one row per image: which expression it shows
#: How many uniforms / normals :func:`_sample` spends on the identity block (face_w .. age),
#: which it draws first; tests/test_pretrain.py checks the boundary.
IDENTITY_UNIFORMS, IDENTITY_NORMALS = 33, 5
#: Image ``j`` of identity ``k`` is keyed ``k * IMAGE_KEY_STRIDE + j``: an identity's images do not
#: depend on how many images the other identities have.
IMAGE_KEY_STRIDE = 2**20
#: ``traits="shape"``: the positions in the identity block of the face's geometry (face_w,
#: face_top, face_bot, jaw_taper, eye_y .. iris_r, brow_dist .. lip_lo, hairline, age; and the
#: normals rest_curve, rest_brow). Only these stay fixed per person; the colours (skin, iris,
#: hair, brows, lips, glasses) and accessories (hair style, facial hair, glasses) are drawn per
#: image, so colour and hair cannot tell people apart (tests/test_pretrain.py checks the fields).
SHAPE_UNIFORMS = (0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 15, 16, 17, 18, 19, 20, 21, 22, 23, 26, 32)
SHAPE_NORMALS = (3, 4)
#: What stays fixed per person: every identity trait, or only the face's geometry.
IDENTITY_TRAITS = ("all", "shape")


def identity_image_keys(identities: np.ndarray, images: np.ndarray) -> np.ndarray:
    """uint64 keys ``(N,)`` of images ``images[r]`` of identities ``identities[r]``."""
    return np.asarray(identities, np.uint64) * np.uint64(IMAGE_KEY_STRIDE) + np.asarray(images, np.uint64)


def _gen_identity_range(
    k0: int, k1: int, *, images_per_identity: int, seed: int, image_size: int, class_names: tuple[str, ...],
    min_intensity: float, max_intensity: float, nuisance: float, supersample: int, traits: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[FaceParams]]:
    m = images_per_identity
    ids = np.repeat(np.arange(k0, k1), m)
    keys = identity_image_keys(ids, np.tile(np.arange(m), k1 - k0))
    id_u, id_n, _ = counter_draws(seed, IDENTITY_NAMESPACE, np.arange(k0, k1))
    im_u, im_n, im_c = counter_draws(seed, IDENTITY_IMAGE_NAMESPACE, keys)
    # The identity block of every image reads its identity's numbers; the rest its own.
    cols_u = list(SHAPE_UNIFORMS) if traits == "shape" else list(range(IDENTITY_UNIFORMS))
    cols_n = list(SHAPE_NORMALS) if traits == "shape" else list(range(IDENTITY_NORMALS))
    im_u[:, cols_u] = np.repeat(id_u[:, cols_u], m, axis=0)
    im_n[:, cols_n] = np.repeat(id_n[:, cols_n], m, axis=0)
    u_expr = counter_draws(seed, IDENTITY_EXPRESSION_NAMESPACE, keys)[0][:, 0]
    expressions = np.minimum((u_expr * len(class_names)).astype(np.int64), len(class_names) - 1)
    uni, nrm, clut = im_u.tolist(), im_n.tolist(), im_c.tolist()
    params = [_sample(_Draws(uni[r], nrm[r], clut[r]), int(expressions[r]), class_names=class_names,
                      intensity=None, min_intensity=min_intensity, max_intensity=max_intensity, nuisance=nuisance)
              for r in range(len(ids))]
    images = np.empty((len(ids), image_size, image_size, 3), dtype=np.uint8)
    for c0 in range(0, len(ids), 512):
        images[c0 : c0 + 512] = render_faces(params[c0 : c0 + 512], image_size=image_size, supersample=supersample)
    return images, ids.astype(np.int64), expressions, params


def generate_identities(
    n_identities: int,
    images_per_identity: int,
    *,
    seed: int = 0,
    image_size: int = 64,
    class_names: Sequence[str] = BASIC7,
    min_intensity: float = DEFAULTS["min_intensity"],
    max_intensity: float = DEFAULTS["max_intensity"],
    nuisance: float = DEFAULTS["nuisance"],
    supersample: int = DEFAULTS["supersample"],
    traits: str = "shape",
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[FaceParams]]:
    """``images_per_identity`` images of each of ``n_identities`` synthetic people (the identity mode).

    ``traits="shape"`` (default): only the face's geometry stays fixed per person
    (:data:`SHAPE_UNIFORMS`); colours, hair style, facial hair and glasses are drawn per image, so
    only the face's shape tells people apart. ``traits="all"``: every identity trait named below
    stays fixed; colour and hair then identify a person well enough that the network need not
    learn the face (docs/pretrain.md, "Does it help?").

    Each image keeps its person's face (shape, skin, eyes, hair, brows, nose, mouth, facial hair,
    glasses, resting face, age) and draws its own expression (uniform over ``class_names``),
    intensity, gaze, clothes, pose, background, lighting, occlusion and camera nuisances, so
    telling the people apart needs expression-invariant identity features. Identity ``k`` is
    drawn from namespace :data:`IDENTITY_NAMESPACE`, which no FER split uses: the people here
    are never the people of :func:`generate`'s splits, for any seed.

    Returns ``images`` uint8 ``(N*M, S, S, 3)`` RGB (identity-major: rows ``k*M .. k*M+M-1``
    are identity ``k``), ``identities`` int64 ``(N*M,)``, ``expressions`` int64 ``(N*M,)``
    (indices into ``class_names``) and the ``N*M`` :class:`FaceParams`.
    """
    if n_identities < 1 or not 1 <= images_per_identity < IMAGE_KEY_STRIDE or image_size < 8:
        raise ConfigError(
            f"synthetic identities: need >= 1 identity, 1..{IMAGE_KEY_STRIDE - 1} images per identity and "
            f"image_size >= 8, got {n_identities}, {images_per_identity}, {image_size}")
    if not 0.0 <= min_intensity <= max_intensity <= 1.0:
        raise ConfigError(
            f"synthetic: need 0 <= min_intensity <= max_intensity <= 1, got {min_intensity}, {max_intensity}")
    if traits not in IDENTITY_TRAITS:
        raise ConfigError(f"synthetic identities: traits {traits!r}; valid are {', '.join(IDENTITY_TRAITS)}")
    kw = dict(images_per_identity=images_per_identity, seed=seed, image_size=image_size, traits=traits,
              class_names=tuple(canonical_name(c) for c in class_names), min_intensity=min_intensity,
              max_intensity=max_intensity, nuisance=nuisance, supersample=supersample)
    if workers <= 1 or n_identities * images_per_identity < 256:
        return _gen_identity_range(0, n_identities, **kw)  # type: ignore[arg-type]
    bounds = np.linspace(0, n_identities, min(workers * 4, n_identities) + 1).astype(int)
    with ProcessPoolExecutor(max_workers=workers) as ex:
        futs = [ex.submit(_gen_identity_range, int(a), int(b), **kw)  # type: ignore[arg-type]
                for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
        parts = [f.result() for f in futs]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            np.concatenate([p[2] for p in parts]), [q for p in parts for q in p[3]])


def sample_names(split: str, n: int) -> list[str]:
    """RAF-DB style names: ``train_00001.jpg`` (5 digits) / ``test_0001.jpg`` (4 digits), wider if needed."""
    width = max(5 if split == "train" else 4, len(str(n)))
    return [f"{split}_{i + 1:0{width}d}.jpg" for i in range(n)]


# --- the registered loader ---------------------------------------------------------------------


def _as_bool(key: str, v: str) -> bool:
    t = v.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"--data-option {key}={v!r}: expected true or false")


def _as_num(key: str, v: str, kind: type, lo: float, hi: float) -> Any:
    try:
        x = kind(v.strip())
    except ValueError:
        raise ConfigError(f"--data-option {key}={v!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if not lo <= x <= hi:
        raise ConfigError(f"--data-option {key}={v!r}: must be between {lo} and {hi}")
    return x


_OPTION_PARSERS: dict[str, Any] = {
    "n_train": lambda k, v: _as_num(k, v, int, 1, 10_000_000),
    "n_test": lambda k, v: _as_num(k, v, int, 1, 10_000_000),
    "balanced": _as_bool,
    "contempt": _as_bool,
    "min_intensity": lambda k, v: _as_num(k, v, float, 0.0, 1.0),
    "max_intensity": lambda k, v: _as_num(k, v, float, 0.0, 1.0),
    "nuisance": lambda k, v: _as_num(k, v, float, 0.0, 2.0),
    "supersample": lambda k, v: _as_num(k, v, int, 1, 4),
    "cache": _as_bool,
    "workers": lambda k, v: _as_num(k, v, int, 1, 256),
}


def parse_options(options: dict[str, str]) -> dict[str, Any]:
    """``--data-option`` strings -> typed generator options (defaults filled in).

    Raises ConfigError for an unknown key (listing the valid ones) or a bad value.
    """
    out = dict(DEFAULTS)
    for key, value in options.items():
        k = key.strip().lower().replace("-", "_")
        if k not in _OPTION_PARSERS:
            raise ConfigError(
                f"--data-option {key!r} is not a synthetic-dataset option; valid keys: {', '.join(sorted(_OPTION_PARSERS))}"
            )
        out[k] = _OPTION_PARSERS[k](key, str(value))
    if out["min_intensity"] > out["max_intensity"]:
        raise ConfigError("--data-option min_intensity must not exceed max_intensity")
    return out


def cache_dir() -> Path:
    """``$DNFER_CACHE_DIR/synthetic`` or ``~/.cache/dnfer/synthetic``."""
    root = os.environ.get("DNFER_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "dnfer"
    return base / "synthetic"


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@DATASETS.register("synthetic")
def load_synthetic(
    path: Path | None, *, image_size: int, options: dict[str, str], seed: int, skip_bad: bool
) -> FERDataset:
    """The built-in synthetic FER dataset (clean labels; ``val`` is None).

    ``options`` (``--data-option K=V``; defaults in :data:`DEFAULTS`): ``n_train``, ``n_test``,
    ``balanced``, ``contempt`` (8 classes), ``min_intensity``/``max_intensity`` (expression
    strength range), ``nuisance`` (0..2 scale of all nuisances), ``supersample`` (1..4 drawing
    oversampling), ``cache`` (reuse arrays on disk), ``workers`` (generation processes; does not
    change the data). ``path`` and ``skip_bad`` are unused: nothing is read from disk except the
    cache.
    """
    del path, skip_bad
    opts = parse_options(options)
    class_names = list(CANONICAL_CLASSES if opts["contempt"] else BASIC7)
    gen = {k: opts[k] for k in ("balanced", "min_intensity", "max_intensity", "nuisance", "supersample")}
    key_params = {
        "n_train": opts["n_train"], "n_test": opts["n_test"], "image_size": int(image_size), "seed": int(seed),
        "class_names": class_names, **gen, "generator_version": GENERATOR_VERSION,
    }
    digest = hashlib.sha256(json.dumps(key_params, sort_keys=True).encode()).hexdigest()[:20]
    cache_file = cache_dir() / f"{digest}.npz"
    arrays: dict[str, np.ndarray] | None = None
    hit = False
    if opts["cache"] and cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
            ok = (
                arrays["train_x"].shape == (opts["n_train"], image_size, image_size, 3)
                and arrays["test_x"].shape == (opts["n_test"], image_size, image_size, 3)
                and arrays["train_x"].dtype == np.uint8
            )
            arrays, hit = (arrays, True) if ok else (None, False)
        except (OSError, ValueError, KeyError):
            arrays = None  # unreadable or truncated cache: regenerate and overwrite
    if arrays is None:
        tr_x, tr_y, _ = generate(opts["n_train"], seed=seed, split="train", image_size=image_size,
                                 class_names=class_names, workers=opts["workers"], **gen)
        te_x, te_y, _ = generate(opts["n_test"], seed=seed, split="test", image_size=image_size,
                                 class_names=class_names, workers=opts["workers"], **gen)
        arrays = {"train_x": tr_x, "train_y": tr_y, "test_x": te_x, "test_y": te_y}
        if opts["cache"]:
            try:
                _atomic_savez(cache_file, **arrays)
            except OSError:
                pass  # a read-only cache location must not stop training
    train = Split(arrays["train_x"], arrays["train_y"], sample_names("train", opts["n_train"]))
    test = Split(arrays["test_x"], arrays["test_y"], sample_names("test", opts["n_test"]))
    meta = {
        "generator": "dnfer.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "generator_params": {k: v for k, v in key_params.items() if k != "generator_version"},
        "cache_file": str(cache_file) if opts["cache"] else None,
        "cache_hit": hit,
    }
    return FERDataset(class_names=class_names, train=train, test=test, val=None, meta=meta)


# --- preview -----------------------------------------------------------------------------------


def contact_sheet(
    *,
    seed: int = 0,
    class_names: Sequence[str] = BASIC7,
    intensities: Sequence[float] = (0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0),
    image_size: int = 80,
    nuisance: float = DEFAULTS["nuisance"],
    label_width: int = 78,
) -> np.ndarray:
    """Contact sheet uint8 ``(H, W, 3)`` RGB: rows = classes, columns = identities.

    Column ``j`` is one person (identity, pose and nuisances fixed) at ``intensities[j]``, so
    each column shows one face making every expression and intensity rises to the right.
    """
    names = [canonical_name(c) for c in class_names]
    cols = len(intensities)
    header = 18
    sheet = np.full((header + len(names) * image_size, label_width + cols * image_size, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for j, s in enumerate(intensities):
        cv2.putText(sheet, f"s={s:.1f}", (label_width + j * image_size + 16, 13), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    for r, name in enumerate(names):
        y0 = header + r * image_size
        cv2.putText(sheet, name, (4, y0 + image_size // 2 + 4), font, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        for j, s in enumerate(intensities):
            rng = np.random.default_rng([seed, 99, j])
            p = sample_expression_params(rng, r, class_names=names, intensity=s, nuisance=nuisance)
            x0 = label_width + j * image_size
            sheet[y0 : y0 + image_size, x0 : x0 + image_size] = render_face(p, image_size=image_size, supersample=2)
    return sheet


def params_dict(p: FaceParams) -> dict[str, Any]:
    """A JSON-friendly dict of one sample's parameters (AUs keyed ``AU<n>``)."""
    d = asdict(p)
    au = d.pop("au")
    d["au"] = {f"AU{u}": round(float(v), 4) for u, v in zip(AUS, au, strict=True)}
    return d


# --- writers -----------------------------------------------------------------------------------


def _write_image(path: Path, image: np.ndarray, ext: str) -> None:
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
    if not cv2.imwrite(str(path), np.ascontiguousarray(image[:, :, ::-1]), params):
        raise OSError(f"could not write {path}")


def write_rafdb(
    out: str | Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], *, class_names: Sequence[str]
) -> Path:
    """Write the RAF-DB basic layout; returns the label file's path.

    ``splits`` maps ``train``/``test`` to ``(images uint8 (N, H, W, 3) RGB, labels int64 (N,))``
    (labels index ``class_names``). Writes ``EmoLabel/list_patition_label.txt`` (sic) with lines
    ``train_00001.jpg 4`` (1-based RAF order, contempt = 8) and images
    ``Image/aligned/train_00001_aligned.jpg``.
    """
    from dnfer.data.noise import write_label_file

    out = Path(out)
    img_dir = out / "Image" / "aligned"
    img_dir.mkdir(parents=True, exist_ok=True)
    names_all: list[str] = []
    labels_all: list[np.ndarray] = []
    for split in ("train", "test"):
        if split not in splits:
            continue
        images, labels = splits[split]
        names = sample_names(split, len(labels))
        for name, img in zip(names, images, strict=True):
            _write_image(img_dir / f"{name[:-4]}_aligned.jpg", img, "jpg")
        names_all += names
        labels_all.append(np.asarray(labels, dtype=np.int64))
    label_file = out / "EmoLabel" / "list_patition_label.txt"
    write_label_file(label_file, names_all, np.concatenate(labels_all), class_names=class_names)
    return label_file


def write_folder(
    out: str | Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], *, class_names: Sequence[str],
    ext: str = "png",
) -> None:
    """Write an ImageFolder layout ``out/<split>/<class>/<split>_00001.<ext>`` (``ext`` png or jpg)."""
    if ext not in ("png", "jpg"):
        raise ConfigError(f"image format {ext!r}: valid formats are png, jpg")
    out = Path(out)
    for split, (images, labels) in splits.items():
        for c in class_names:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        names = sample_names(split, len(labels))
        for name, img, y in zip(names, images, labels, strict=True):
            _write_image(out / split / class_names[int(y)] / f"{name[:-4]}.{ext}", img, ext)
