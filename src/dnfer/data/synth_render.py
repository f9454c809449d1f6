"""Renderer of the synthetic face generator: :class:`FaceParams` -> uint8 RGB image.

Everything geometric lives in *face units*: origin at the face centre, x to the image right,
y **down**, the face half-width is about 0.9. Action-unit (AU) intensities (0..1) move the
landmarks (:func:`face_landmarks`), and the renderer draws those landmarks, so a label's geometry
can be checked from the parameters alone (e.g. the mouth corners of a smile sit above the lip
centre: negative ``corner_lift`` sign convention, see :func:`face_landmarks`).

Drawing uses OpenCV primitives (``fillPoly``/``polylines`` with ``LINE_AA`` and 4 bits of
sub-pixel precision) because they are ~100x faster per image than matplotlib/PIL paths and
need no extra dependency. All polygons of one face are collected first and projected to pixels
in one vectorised numpy step (yaw, rotation, scale, translation), then drawn back to front.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

#: Action units the generator models (FACS numbers), in the order of ``FaceParams.au``.
AUS: tuple[int, ...] = (1, 2, 4, 5, 6, 7, 9, 10, 12, 14, 15, 16, 17, 20, 23, 24, 25, 26)
AU_INDEX: dict[int, int] = {a: i for i, a in enumerate(AUS)}

#: Half the side of the image in face units at zoom 1 (the face, chin to hair, spans ~2.5).
VIEW_HALF = 1.4

_SHIFT = 4  # cv2 sub-pixel bits
_ONE = float(1 << _SHIFT)

# Point grids reused by every face (never written to).
_T11 = np.linspace(-1.0, 1.0, 11)
_T9 = np.linspace(-1.0, 1.0, 9)
_ANG16 = np.linspace(0.0, 2 * np.pi, 16, endpoint=False)
_UNIT16 = np.stack([np.cos(_ANG16), np.sin(_ANG16)], axis=1)
_ANG10 = np.linspace(0.0, 2 * np.pi, 10, endpoint=False)
_UNIT10 = np.stack([np.cos(_ANG10), np.sin(_ANG10)], axis=1)
_ANG28 = np.linspace(0.0, 2 * np.pi, 28, endpoint=False)
_HALF_ARC = np.linspace(-np.pi / 2, np.pi / 2, 6)  # right-facing half circle


Color = tuple[float, float, float]


@dataclass
class FaceParams:
    """Everything that determines one synthetic image (identity, expression, pose, nuisances).

    Colours are RGB floats 0..255; lengths are face units (see the module doc). ``au`` is float
    ``(len(AUS),)`` in ``[0, 1]``; ``au_side`` multiplies AU12/AU14 on the (image) left and right
    side, which makes contempt unilateral.
    """

    label: int = 0
    expression: str = "neutral"
    intensity: float = 0.0
    au: np.ndarray = field(default_factory=lambda: np.zeros(len(AUS)))
    au_side: tuple[float, float] = (1.0, 1.0)
    gaze: tuple[float, float] = (0.0, 0.0)
    # identity
    face_w: float = 0.9
    face_top: float = 1.15
    face_bot: float = 1.2
    jaw_taper: float = 0.25
    skin: Color = (210.0, 170.0, 140.0)
    eye_y: float = -0.15
    eye_sep: float = 0.4
    eye_w: float = 0.17
    eye_open: float = 0.075
    eye_low: float = 0.05
    iris_r: float = 0.08
    iris_color: Color = (90.0, 60.0, 40.0)
    brow_dist: float = 0.2
    brow_thick: float = 0.06
    brow_arch: float = 0.05
    brow_color: Color = (60.0, 45.0, 35.0)
    nose_y: float = 0.3
    nose_w: float = 0.13
    mouth_y: float = 0.62
    mouth_w: float = 0.3
    lip_up: float = 0.055
    lip_lo: float = 0.07
    lip_color: Color = (180.0, 90.0, 90.0)
    hair_style: int = 1  # 0 bald, 1 short, 2 long, 3 bangs
    hair_color: Color = (50.0, 35.0, 25.0)
    hairline: float = -0.62
    facial_hair: int = 0  # 0 none, 1 moustache, 2 beard, 3 both
    glasses: int = 0  # 0 none, 1 clear, 2 sunglasses
    glasses_round: bool = False
    glasses_color: Color = (30.0, 30.0, 30.0)
    rest_curve: float = 0.0  # resting mouth-corner offset (+ = down), identity trait
    rest_brow: float = 0.0  # resting inner-brow offset (+ = down), identity trait
    age: float = 0.0  # 0..1, darkens folds regardless of expression
    clothes_color: Color = (60.0, 80.0, 120.0)
    # pose
    rot: float = 0.0  # radians, in-plane
    zoom: float = 1.0
    tx: float = 0.0  # fraction of the image side
    ty: float = 0.0
    yaw: float = 0.0  # radians
    # nuisances
    bg_corners: tuple[int, ...] = (128,) * 12  # 2x2 RGB corner colours of the background (0..255)
    clutter: tuple[float, ...] = ()  # background shapes, 9 numbers in [0, 1) each
    light: tuple[int, ...] = (128,) * 12  # 2x2 RGB corner gains x128 (lighting gradient + colour cast)
    occluder: int = 0  # 0 none, 1 hand, 2 object
    occ_xy: tuple[float, float] = (0.0, 0.6)
    occ_size: float = 0.4
    occ_angle: float = 0.0
    occ_color: Color = (200.0, 160.0, 130.0)
    blur: float = 0.0  # Gaussian sigma in pixels at 64 px (scaled with the image size)
    noise: float = 0.0  # sensor-noise sigma in uint8 levels
    jpeg: int = 0  # JPEG quality, 0 = no re-encoding
    gray: bool = False
    noise_offset: int = 0  # where this image's sensor noise starts in the shared noise bank

    def a(self, unit: int) -> float:
        """Intensity of one action unit (FACS number)."""
        return float(self.au[AU_INDEX[unit]])


def _dark(c: Color, d: float) -> Color:
    d = 1.0 - min(max(d, 0.0), 0.9)
    return (c[0] * d, c[1] * d, c[2] * d)


def _xy(x: np.ndarray | float, y: np.ndarray | float, n: int) -> np.ndarray:
    """``(n, 2)`` points from x and y (arrays or scalars); faster than np.stack for tiny arrays."""
    out = np.empty((n, 2))
    out[:, 0] = x
    out[:, 1] = y
    return out


def _pts(*xy: float) -> np.ndarray:
    """``(k, 2)`` from a flat list ``x0, y0, x1, y1, ...``."""
    return np.array(xy).reshape(-1, 2)


# Quadratic Bezier basis through p0 (t=0), mid (t=0.5), p2 (t=1): rows of weights for
# (p0, mid, p2) after substituting the control point c = 2*mid - (p0 + p2)/2.
_TQ = np.linspace(0.0, 1.0, 7)
_QB = np.stack([(1 - _TQ) ** 2 - (1 - _TQ) * _TQ, 4 * (1 - _TQ) * _TQ, _TQ**2 - (1 - _TQ) * _TQ], axis=1)
_QB4 = _QB[::2].copy()


def _ellipse(cx: float, cy: float, rx: float, ry: float, unit: np.ndarray = _UNIT16) -> np.ndarray:
    return _xy(unit[:, 0] * rx + cx, unit[:, 1] * ry + cy, len(unit))


# --- landmarks ---------------------------------------------------------------------------------


def mouth_geometry(p: FaceParams) -> dict[str, np.ndarray | float]:
    """Mouth curves in face units (before pose).

    Returns ``top``/``bottom`` (11, 2): the upper and lower edge of the lip opening from the image
    left corner to the right corner (identical when the mouth is closed); ``upper``/``lower``
    (11, 2): the outer lip edges; ``open``: the opening height at the centre; ``corners`` (2, 2).
    """
    m = _mouth_batch(p.au[None], np.array([p.au_side], dtype=np.float64), np.array([p.mouth_y]),
                     np.array([p.mouth_w]), np.array([p.rest_curve]), np.array([p.lip_up]), np.array([p.lip_lo]))
    return {k: (float(v[0]) if k == "open" else v[0]) for k, v in m.items()}


def face_landmarks(p: FaceParams) -> dict[str, np.ndarray | float]:
    """Key landmarks in face units (y down) before pose, for tests and analysis.

    Keys: ``mouth_corners`` (2, 2) left/right; ``mouth_centre`` (2,) centre of the lip line;
    ``corner_lift``: mean height of the corners above the lip centre (positive = smile, negative
    = down-turned); ``mouth_open``; ``brow_inner``/``brow_outer`` (2, 2) left/right brow ends;
    ``eye_aperture`` (2,) upper + lower lid opening per eye.
    """
    m = mouth_geometry(p)
    top = m["top"]
    corners = m["corners"]
    assert isinstance(top, np.ndarray) and isinstance(corners, np.ndarray)
    centre = top[len(top) // 2]
    brows = [_brow_points(p, s) for s in (-1.0, 1.0)]
    up, lo = _lid_heights(p)
    return {
        "mouth_corners": corners,
        "mouth_centre": centre,
        "corner_lift": float(centre[1] - corners[:, 1].mean()),
        "mouth_open": float(m["open"]),  # type: ignore[arg-type]
        "brow_inner": np.array([b[0:2] for b in brows]),
        "brow_outer": np.array([b[4:6] for b in brows]),
        "eye_aperture": np.array([up + lo, up + lo]),
    }


def _brow_points(p: FaceParams, s: float) -> tuple[float, float, float, float, float, float]:
    """Inner, middle and outer point ``(x0, y0, xm, ym, x2, y2)`` of the brow on side ``s``."""
    ctrl = _brow_ctrl(p.au[None], np.array([p.eye_y]), np.array([p.brow_dist]), np.array([p.eye_sep]),
                      np.array([p.eye_w]), np.array([p.rest_brow]), np.array([p.brow_arch]))
    return tuple(ctrl[0, 0 if s < 0 else 1].ravel().tolist())  # type: ignore[return-value]


def _lid_heights(p: FaceParams) -> tuple[float, float]:
    up, lo = _lid_batch(p.au[None], np.array([p.eye_open]), np.array([p.eye_low]))
    return float(up[0]), float(lo[0])


def _brow_ctrl(au: np.ndarray, ey: np.ndarray, brow_dist: np.ndarray, eye_sep: np.ndarray, ew: np.ndarray,
               rest_brow: np.ndarray, brow_arch: np.ndarray) -> np.ndarray:
    """Brow control points (inner, middle, outer) of N faces, image-left brow first: (N, 2, 3, 2)."""
    a1, a2, a4, a9 = au[:, 0], au[:, 1], au[:, 2], au[:, 6]
    base = ey - brow_dist
    iy = base - 0.16 * a1 + 0.1 * a4 + 0.03 * a9 + rest_brow
    oy = base + 0.03 - 0.16 * a2 + 0.02 * a4
    my = 0.5 * (iy + oy) - brow_arch - 0.04 * a2 - 0.025 * a1 + 0.02 * a4
    ctrl = np.empty((len(au), 2, 3, 2))
    for k, s in enumerate((-1.0, 1.0)):
        ctrl[:, k, 0, 0] = s * (0.1 - 0.045 * a4)
        ctrl[:, k, 1, 0] = s * eye_sep * 0.9
        ctrl[:, k, 2, 0] = s * (eye_sep + ew + 0.06)
        ctrl[:, k, :, 1] = np.stack([iy, my, oy], 1)
    return ctrl


def _lid_batch(au: np.ndarray, eye_open: np.ndarray, eye_low: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper and lower lid opening of N faces (AU5 raises, AU6/AU7 tighten): two (N,) arrays."""
    a4, a5, a6, a7 = au[:, 2], au[:, 3], au[:, 4], au[:, 5]
    up = eye_open * (1 + 0.95 * a5 - 0.5 * a7 - 0.2 * a6 - 0.1 * a4)
    lo = eye_low * (1 - 0.6 * a6 - 0.5 * a7)
    return np.maximum(up, 0.012), np.maximum(lo, 0.008)


_LEFT11 = _T11 < 0
_T11SQ = _T11 * _T11
_W11 = 1 - _T11SQ
_PROF11 = np.sqrt(_W11)
_BOW11 = 0.3 * np.exp(-((_T11 / 0.22) ** 2))
_W9 = 1 - _T9 * _T9
_CA28, _SA28 = np.cos(_ANG28), np.sin(_ANG28)
_LOW28 = _SA28 > 0
_SA28SQ = _SA28 * _SA28
_JAW = _SA28 > 0.05
_CAP_ANG = np.linspace(0.05, np.pi - 0.05, 12)
_CAP_C, _CAP_S = np.cos(_CAP_ANG), np.sin(_CAP_ANG)
_T9P4 = _T9**4
_ARC_C, _ARC_S = np.cos(_HALF_ARC) * 0.045, np.sin(_HALF_ARC) * 0.045
_BROW_TAPER = 0.5 * (1 - 0.45 * _TQ)
_SIDES = np.array([[-1.0], [1.0]])


# --- display list ------------------------------------------------------------------------------


class _Ops:
    """Collects polygons in face units; projected to pixels all at once.

    An op may hold several non-overlapping segments of the same colour (both brows, both
    nostrils...): one cv2 call draws them all, which halves the per-call overhead.
    """

    __slots__ = ("pts", "z", "ops")

    def __init__(self) -> None:
        self.pts: list[np.ndarray] = []
        self.z: list[float] = []
        self.ops: list[tuple[bool, Color, float, bool, int]] = []  # is_fill, colour, thick, closed, n_seg

    def fill(self, pts: np.ndarray | list[np.ndarray], z: float, color: Color) -> None:
        segs = pts if isinstance(pts, list) else [pts]
        self.pts.extend(segs)
        self.z.extend([z] * len(segs))
        self.ops.append((True, color, 0.0, True, len(segs)))

    def line(self, pts: np.ndarray | list[np.ndarray], z: float, color: Color, thick: float,
             closed: bool = False) -> None:
        segs = pts if isinstance(pts, list) else [pts]
        self.pts.extend(segs)
        self.z.extend([z] * len(segs))
        self.ops.append((False, color, thick, closed, len(segs)))

    def draw(self, img: np.ndarray, p: FaceParams, res: int) -> None:
        """Project (yaw -> rotate/scale -> translate) and draw every op in order on ``img``."""
        lens = [len(a) for a in self.pts]
        allp = np.concatenate(self.pts)
        z = np.repeat(np.asarray(self.z), lens)
        cy, sy = math.cos(p.yaw), math.sin(p.yaw)
        x = allp[:, 0] * cy + z * sy
        y = allp[:, 1]
        scale = res / (2 * VIEW_HALF) * p.zoom
        c, s = math.cos(p.rot) * scale * _ONE, math.sin(p.rot) * scale * _ONE
        ox = (res / 2 + p.tx * res) * _ONE
        oy = (res / 2 + p.ty * res) * _ONE
        ipx = np.empty((len(x), 2), dtype=np.int32)
        ipx[:, 0] = c * x - s * y + ox
        ipx[:, 1] = s * x + c * y + oy
        bounds = np.cumsum([0, *lens]).tolist()
        segs = [ipx[bounds[k] : bounds[k + 1]] for k in range(len(lens))]
        j = 0
        fill, poly, aa = cv2.fillPoly, cv2.polylines, cv2.LINE_AA
        for is_fill, color, thick, closed, nseg in self.ops:
            group = segs[j : j + nseg]
            j += nseg
            if is_fill:
                fill(img, group, color, aa, _SHIFT)
            else:
                poly(img, group, closed, color, max(1, int(thick * scale + 0.5)), aa, _SHIFT)


def _add_beard(ops: _Ops, p: FaceParams, chin_drop: float) -> None:
    fw = p.face_w
    sel = _ANG28[_JAW]
    sn = np.sin(sel)
    beard = _xy(fw * np.cos(sel) * (1 - p.jaw_taper * sn * sn), (p.face_bot + chin_drop) * sn, len(sel))
    ops.fill(np.concatenate([beard, _pts(-fw * 0.92, p.nose_y + 0.12, fw * 0.92, p.nose_y + 0.12)]), 0.3,
             _dark(p.hair_color, 0.05))


def _add_glasses(ops: _Ops, p: FaceParams) -> None:
    ey, ew, fw = p.eye_y, p.eye_w, p.face_w
    col = p.glasses_color
    lenses, arms = [], []
    for s in (-1.0, 1.0):
        ex = s * p.eye_sep
        if p.glasses_round:
            lenses.append(_ellipse(ex, ey + 0.01, ew + 0.07, 0.14))
        else:
            rw, rh = ew + 0.08, 0.12
            lenses.append(_pts(ex - rw, ey - rh, ex + rw, ey - rh, ex + rw * 0.9, ey + rh, ex - rw * 0.9, ey + rh))
        arms.append(_pts(s * (p.eye_sep + ew + 0.07), ey - 0.05, s * fw * 1.02, ey - 0.02))
    if p.glasses == 2:
        ops.fill(lenses, 0.6, (20.0, 22.0, 25.0))
    ops.line(lenses, 0.6, col, 0.03, closed=True)
    inner = p.eye_sep - ew - 0.06
    ops.line([*arms, _pts(-inner, ey - 0.03, 0.0, ey - 0.06, inner, ey - 0.03)], 0.5, col, 0.03)


def _add_occluder(ops: _Ops, p: FaceParams) -> None:
    """A hand (palm + fingers) or an object in front of the face."""
    cx, cy = p.occ_xy
    r = p.occ_size
    ca_, sa_ = math.cos(p.occ_angle), math.sin(p.occ_angle)
    rotm = np.array([[ca_, sa_], [-sa_, ca_]])
    shift = np.array([cx, cy])
    if p.occluder == 1:
        ops.fill(_ellipse(0.0, 0.35 * r, 0.42 * r, 0.5 * r) @ rotm + shift, 1.0, p.occ_color)
        fingers = [
            _pts(fx0, 0.1 * r, fx0 * 1.1, -0.55 * r + 0.1 * abs(k - 1.5) * r) @ rotm + shift
            for k, fx0 in enumerate((-0.3 * r, -0.1 * r, 0.1 * r, 0.3 * r))
        ]
        ops.line(fingers, 1.0, p.occ_color, 0.2 * r)
        ops.line(_pts(-0.1 * r, 0.1 * r, -0.1 * r, -0.3 * r) @ rotm + shift, 1.0, _dark(p.occ_color, 0.3), 0.02)
    else:
        box = _pts(-0.8, -0.5, 0.8, -0.5, 0.8, 0.5, -0.8, 0.5) * r @ rotm + shift
        ops.fill(box, 1.0, p.occ_color)
        ops.line(box, 1.0, _dark(p.occ_color, 0.35), 0.03, closed=True)


# --- batched geometry ----------------------------------------------------------------------------
# _build_faces computes every element that most faces have for a whole chunk of faces with one
# numpy operation each (a face's geometry is ~130 tiny-array operations, whose per-call overhead
# was the largest cost of generation), then assembles each face's display list in drawing order.
# The arithmetic is the per-face formulas', operation for operation, so the images are identical.

_NECK = _pts(-0.42, 0.6, 0.42, 0.6, 0.48, 1.6, -0.48, 1.6)
_LONG_HAIR_X = np.array([-1.15, -1.05, 0.0, 1.05, 1.15, 1.3, -1.3])
_LONG_HAIR_Y = np.array([-0.4, -1.15, -1.42, -1.15, -0.4, 1.6, 1.6])
_CLOTHES_X = np.array([-0.5, 0.5, 1.6, 1.6, -1.6, -1.6])
_ARC9 = 0.04 * _T9 * _T9
_T9_INNER = _T9[2:-2]
_FRONT_BANGS, _FRONT_PLAIN = 0.12 * _T9P4, 0.35 * _T9P4
_LIP_UP_PROFILE = _PROF11 - _BOW11


def _col(ps: Sequence[FaceParams], name: str) -> np.ndarray:
    return np.array([getattr(p, name) for p in ps], dtype=np.float64)


def _mouth_batch(au: np.ndarray, side: np.ndarray, mouth_y: np.ndarray, mouth_w: np.ndarray, rest_curve: np.ndarray,
                 lip_up: np.ndarray, lip_lo: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`mouth_geometry` for N faces: ``top``/``bottom``/``upper``/``lower`` (N, 11, 2),
    ``open`` (N,), ``corners`` (N, 2, 2). ``au`` (N, 18), ``side`` (N, 2); the rest (N,)."""
    a10, a12, a14, a15, a16, a17 = au[:, 7], au[:, 8], au[:, 9], au[:, 10], au[:, 11], au[:, 12]
    a20, a23, a24, a25, a26 = au[:, 13], au[:, 14], au[:, 15], au[:, 16], au[:, 17]
    m_l, m_r = side[:, 0], side[:, 1]
    open_ = (0.04 * a25 + 0.2 * a26 + 0.05 * a16 + 0.035 * a10) * (1.0 - 0.9 * a24) * (1.0 - 0.6 * a23)
    open_ = np.maximum(open_ - 0.012, 0.0)  # small values keep the lips sealed
    y_top = mouth_y - 0.05 * a10 - 0.025 * a17
    y_bot = y_top + open_
    base_w = mouth_w * (1 + 0.3 * a20 - 0.15 * a23 - 0.1 * a24)
    base_dy = rest_curve + 0.16 * a15 + 0.04 * a20 + 0.01 * a17
    pull_w = mouth_w * (0.2 * a12 - 0.1 * a14)
    wl, wr = base_w + pull_w * m_l, base_w + pull_w * m_r
    lift = 0.19 * a12 + 0.03 * a14
    yl, yr = mouth_y + base_dy - lift * m_l, mouth_y + base_dy - lift * m_r
    x = _T11 * np.where(_LEFT11, wl[:, None], wr[:, None])
    cy_t2 = np.where(_LEFT11, yl[:, None], yr[:, None]) * _T11SQ
    n = len(au)
    top, bottom, upper, lower = (np.empty((n, 11, 2)) for _ in range(4))
    top[:, :, 0] = bottom[:, :, 0] = upper[:, :, 0] = lower[:, :, 0] = x
    top[:, :, 1] = y_top[:, None] * _W11 + cy_t2
    bottom[:, :, 1] = y_bot[:, None] * _W11 + cy_t2
    ut = lip_up * np.maximum(1 - 0.55 * a23 - 0.45 * a24 - 0.25 * a20 - 0.2 * a12, 0.2)
    lt = lip_lo * np.maximum(1 - 0.5 * a23 - 0.45 * a24 - 0.2 * a20 - 0.15 * a12 + 0.2 * a17, 0.2)
    upper[:, :, 1] = top[:, :, 1] - ut[:, None] * _LIP_UP_PROFILE
    lower[:, :, 1] = bottom[:, :, 1] + lt[:, None] * _PROF11
    corners = np.stack([np.stack([-wl, yl], axis=1), np.stack([wr, yr], axis=1)], axis=1)
    return {"top": top, "bottom": bottom, "upper": upper, "lower": lower, "open": open_, "corners": corners}


def _mirrored_batch(cx: np.ndarray, cy: np.ndarray, rx: float, ry: float, unit: np.ndarray) -> np.ndarray:
    """Ellipses at ``(-cx, cy)`` and ``(cx, cy)`` (a pair of ears, nostrils) of N faces: (N, 2, len(unit), 2)."""
    out = np.empty((len(cx), 2, len(unit), 2))
    out[..., 0] = unit[:, 0] * rx + _SIDES * cx[:, None, None]
    out[..., 1] = (unit[:, 1] * ry + cy[:, None])[:, None, :]
    return out


def _build_faces(ps: Sequence[FaceParams]) -> list[_Ops]:
    """Display lists of N faces, back to front, in face units; face i depends only on ``ps[i]``."""
    n = len(ps)
    au = np.stack([p.au for p in ps])
    a1, a2, a4, a6, a9, a10, a12 = (au[:, i] for i in (0, 1, 2, 4, 6, 7, 8))
    side = np.array([p.au_side for p in ps], dtype=np.float64)
    fw, ey, age = _col(ps, "face_w"), _col(ps, "eye_y"), _col(ps, "age")
    eye_sep, ew, brow_dist = _col(ps, "eye_sep"), _col(ps, "eye_w"), _col(ps, "brow_dist")
    nose_y, nose_w = _col(ps, "nose_y"), _col(ps, "nose_w")
    face_top, face_bot, jaw_taper = _col(ps, "face_top"), _col(ps, "face_bot"), _col(ps, "jaw_taper")
    gaze = np.array([p.gaze for p in ps], dtype=np.float64)
    gx, gy = gaze[:, 0], gaze[:, 1]
    m = _mouth_batch(au, side, _col(ps, "mouth_y"), _col(ps, "mouth_w"), _col(ps, "rest_curve"),
                     _col(ps, "lip_up"), _col(ps, "lip_lo"))
    chin_drop = 0.12 * au[:, 17]

    long_hair = np.empty((n, 7, 2))
    long_hair[:, :, 0] = fw[:, None] * _LONG_HAIR_X
    long_hair[:, :, 1] = _LONG_HAIR_Y
    clothes = np.empty((n, 6, 2))
    clothes[:, :, 0] = _CLOTHES_X
    cd = 1.3 + chin_drop * 0.3
    clothes[:, :, 1] = np.stack([cd, cd, np.full(n, 1.75), np.full(n, 2.6), np.full(n, 2.6), np.full(n, 1.75)], 1)
    ears = _mirrored_batch(fw * 0.98, ey + 0.12, 0.1, 0.2, _UNIT10)
    outline = np.empty((n, 28, 2))
    outline[:, :, 0] = fw[:, None] * _CA28 * np.where(_LOW28, 1 - jaw_taper[:, None] * _SA28SQ, 1.0)
    outline[:, :, 1] = np.where(_LOW28, (face_bot + chin_drop)[:, None], face_top[:, None]) * _SA28
    # forehead wrinkles and glabella furrows (drawn only where their units are active)
    aw = np.maximum(a1, a2)
    arc = (ey - brow_dist - 0.2)[:, None] + _ARC9
    wrinkles = np.empty((n, 2, 9, 2))
    wrinkles[..., 0] = (_T9 * (0.2 + 0.2 * a2)[:, None])[:, None, :]
    wrinkles[:, 0, :, 1] = arc
    wrinkles[:, 1, :, 1] = arc - 0.09
    yb = ey - brow_dist + 0.085 * a4
    furrows = np.empty((n, 2, 2, 2))
    furrows[:, :, :, 0] = np.array([[-0.035, -0.045], [0.035, 0.045]])
    furrows[:, :, 0, 1] = (yb - 0.08)[:, None]
    furrows[:, :, 1, 1] = (yb + 0.07)[:, None]
    # eyes
    up, lo = _lid_batch(au, _col(ps, "eye_open"), _col(ps, "eye_low"))
    uy = ey[:, None] - up[:, None] * _W9
    ly = ey[:, None] + lo[:, None] * _W9
    exs = _SIDES * eye_sep[:, None, None]  # (N, 2, 1)
    lids = np.empty((n, 2, 18, 2))
    lids[:, :, :9, 0] = exs + (ew[:, None] * _T9)[:, None, :]
    lids[:, :, 9:, 0] = lids[:, :, 8::-1, 0]
    lids[:, :, :9, 1] = uy[:, None, :]
    lids[:, :, 9:, 1] = ly[:, None, ::-1]
    irises = []
    iris_r = _col(ps, "iris_r")
    for rad, unit in ((iris_r, _UNIT16), (0.42 * iris_r, _UNIT10)):
        ix = unit[:, 0] * rad[:, None] + gx[:, None]
        u = np.minimum(np.abs(ix) / ew[:, None], 1.0)
        w = 1.0 - u * u
        pts = np.empty((n, 2, len(unit), 2))
        pts[..., 0] = ix[:, None, :] + exs
        pts[..., 1] = np.minimum(np.maximum(unit[:, 1] * rad[:, None] + (ey + gy)[:, None], ey[:, None] - up[:, None] * w),
                                 ey[:, None] + lo[:, None] * w)[:, None, :]
        irises.append(pts)
    feet = np.empty((n, 2, 3, 2))
    bags = np.empty((n, 2, 5, 2))
    for k, s in enumerate((-1.0, 1.0)):
        ox = s * (eye_sep + ew + 0.03)
        feet[:, k, :, 0] = np.stack([ox + s * 0.1, ox, ox + s * 0.1], 1)
        feet[:, k, :, 1] = np.stack([ey - 0.05, ey, ey + 0.05], 1)
        bags[:, k, :, 0] = (s * eye_sep)[:, None] + ew[:, None] * _T9_INNER
        bags[:, k, :, 1] = ly[:, 2:-2] + 0.045
    # brows
    ctrl = _brow_ctrl(au, ey, brow_dist, eye_sep, ew, _col(ps, "rest_brow"), _col(ps, "brow_arch"))
    c = _QB @ ctrl  # (N, 2, 7, 2)
    th = (_col(ps, "brow_thick")[:, None] * _BROW_TAPER)[:, None, :]
    brows = np.empty((n, 2, 14, 2))
    brows[:, :, :7, 0] = c[..., 0]
    brows[:, :, :7, 1] = c[..., 1] - th
    brows[:, :, 7:, 0] = c[:, :, ::-1, 0]
    brows[:, :, 7:, 1] = c[:, :, ::-1, 1] + th[:, :, ::-1]
    # nose
    ny = nose_y - 0.035 * a9 - 0.02 * a10
    bridge = np.empty((n, 2, 2))
    bridge[:, :, 0] = (0.07, 0.08)
    bridge[:, 0, 1] = ey + 0.08
    bridge[:, 1, 1] = ny - 0.08
    nostrils = _mirrored_batch(0.055 * (1 + 0.3 * a9), ny + 0.02, 0.035, 0.017, _UNIT10)
    wx = nose_w - 0.035
    wings = np.empty((n, 2, 6, 2))
    wings[:, 0, :, 0] = -_ARC_C - wx[:, None]
    wings[:, 1, :, 0] = _ARC_C + wx[:, None]
    wings[:, :, :, 1] = (_ARC_S + ny[:, None] - 0.005)[:, None, :]
    nose_lines = np.empty((n, 3, 3, 2))
    nose_lines[:, :, :, 0] = (-0.06, 0.0, 0.06)
    for k, off in enumerate((0.02, 0.055, 0.09)):
        y = ey + off
        nose_lines[:, k, :, 1] = np.stack([y, y - 0.01, y], 1)
    # nasolabial folds
    corners = m["corners"]
    folds = np.empty((n, 2, 3, 2))
    fold_dark = np.empty((n, 2))
    for k, s in enumerate((-1.0, 1.0)):
        ms = side[:, k]
        fold_dark[:, k] = 0.08 + 0.45 * np.maximum(np.maximum(np.maximum(a12 * ms, a10), 0.8 * a9), 0.6 * a6) + 0.15 * age
        sx, sy = s * (nose_w + 0.02), ny - 0.02
        ex_, ey_ = corners[:, k, 0] + s * 0.06, corners[:, k, 1] + 0.03
        folds[:, k, 0, 0], folds[:, k, 0, 1] = sx, sy
        folds[:, k, 1, 0] = 0.5 * (sx + ex_) + s * (0.04 + 0.05 * a12 * ms)
        folds[:, k, 1, 1] = 0.5 * (sy + ey_)
        folds[:, k, 2, 0], folds[:, k, 2, 1] = ex_, ey_
    fold_curves = _QB4 @ folds  # (N, 2, 4, 2)
    # mouth
    lips = np.concatenate([m["upper"], m["lower"][:, ::-1]], axis=1)
    opening = np.concatenate([m["top"], m["bottom"][:, ::-1]], axis=1)
    teeth = np.empty((n, 22, 2))
    teeth[:, :11] = m["top"]
    teeth[:, 11:, 0] = m["top"][:, ::-1, 0]
    teeth[:, 11:, 1] = m["top"][:, ::-1, 1] + np.minimum(0.45 * m["open"], 0.045)[:, None] * _PROF11
    # hair cap
    bangs = np.array([p.hair_style == 3 for p in ps])
    hairline = _col(ps, "hairline")
    hl = np.where(bangs, np.maximum(hairline + 0.3, -0.42), hairline)
    cap = np.empty((n, 23, 2))
    cap[:, :12, 0] = fw[:, None] * 1.06 * _CAP_C
    cap[:, :12, 1] = (-(face_top + 0.08))[:, None] * _CAP_S
    cap[:, 12] = np.stack([-fw * 1.03, np.full(n, -0.15)], 1)
    cap[:, 13:22, 0] = _T9 * fw[:, None] * 0.95
    cap[:, 13:22, 1] = hl[:, None] + np.where(bangs[:, None], _FRONT_BANGS, _FRONT_PLAIN)
    cap[:, 22] = np.stack([fw * 1.03, np.full(n, -0.15)], 1)

    # Per-face scalars for the conditions and colours, as Python floats.
    aw_l, age_l, a4_l, a6_l, a9_l = aw.tolist(), age.tolist(), a4.tolist(), a6.tolist(), a9.tolist()
    a14_l, a17_l, fold_l = au[:, 9].tolist(), au[:, 12].tolist(), fold_dark.tolist()
    open_l, corners_l = m["open"].tolist(), corners.tolist()
    out = []
    for i, p in enumerate(ps):
        ops = _Ops()
        fill, line = ops.fill, ops.line
        skin, hair = p.skin, p.hair_color
        # Long hair behind the head, neck, clothes, ears, face outline.
        if p.hair_style == 2:
            fill(long_hair[i], 0.0, _dark(hair, 0.15))
        fill(_NECK, 0.0, _dark(skin, 0.25))
        fill(clothes[i], 0.0, p.clothes_color)
        fill([ears[i, 0], ears[i, 1]], -0.3, _dark(skin, 0.08))
        fill(outline[i], 0.0, skin)
        # Forehead wrinkles (AU1/AU2) and the glabella furrows (AU4).
        if aw_l[i] + age_l[i] > 0.15:
            line([wrinkles[i, 0], wrinkles[i, 1]], 0.5, _dark(skin, 0.3 * aw_l[i] + 0.1 * age_l[i]), 0.022)
        if a4_l[i] > 0.1:
            line([furrows[i, 0], furrows[i, 1]], 0.6, _dark(skin, 0.45 * a4_l[i]), 0.022)
        # Eyes: sclera, iris and pupil clipped to the lid opening, lid lines (sunglasses hide them).
        if p.glasses != 2:
            fill([lids[i, 0], lids[i, 1]], 0.55, (235.0, 232.0, 225.0))
            fill([irises[0][i, 0], irises[0][i, 1]], 0.58, p.iris_color)
            fill([irises[1][i, 0], irises[1][i, 1]], 0.58, (15.0, 12.0, 12.0))
            line([lids[i, 0, :9], lids[i, 1, :9]], 0.56, (25.0, 18.0, 15.0), 0.03)
            line([lids[i, 0, 9:], lids[i, 1, 9:]], 0.56, _dark(skin, 0.3), 0.015)
        if a6_l[i] + age_l[i] > 0.15:  # crow's feet and the raised lower-lid bulge of AU6
            line([feet[i, 0], feet[i, 1]], 0.5, _dark(skin, 0.5 * a6_l[i] + 0.1 * age_l[i]), 0.018)
            line([bags[i, 0], bags[i, 1]], 0.55, _dark(skin, 0.4 * a6_l[i]), 0.018)
        fill([brows[i, 0], brows[i, 1]], 0.6, p.brow_color)
        # Nose: bridge shade, nostrils, wings, wrinkles (AU9).
        line(bridge[i], 0.8, _dark(skin, 0.12), 0.02)
        fill([nostrils[i, 0], nostrils[i, 1]], 0.85, _dark(skin, 0.55))
        line([wings[i, 0], wings[i, 1]], 0.8, _dark(skin, 0.3), 0.018)
        if a9_l[i] > 0.1:
            line([nose_lines[i, 0], nose_lines[i, 1], nose_lines[i, 2]], 0.75, _dark(skin, 0.5 * a9_l[i]), 0.018)
        # Nasolabial folds: deeper with smiles (AU12), upper-lip raise (AU10), nose wrinkle (AU9).
        line(fold_curves[i, 0], 0.65, _dark(skin, fold_l[i][0]), 0.022)
        line(fold_curves[i, 1], 0.65, _dark(skin, fold_l[i][1]), 0.022)
        if p.facial_hair >= 2:
            _add_beard(ops, p, float(chin_drop[i]))
        # Mouth: lips, opening, teeth, lip line; dimple (AU14) and chin boss (AU17).
        top = m["top"][i]
        fill(lips[i], 0.7, p.lip_color)
        if open_l[i] > 0.0:
            fill(opening[i], 0.7, (55.0, 20.0, 25.0))
            fill(teeth[i], 0.7, (232.0, 228.0, 212.0))
        line(top, 0.7, _dark(p.lip_color, 0.6), 0.03)
        for k, s in enumerate((-1.0, 1.0)):
            d14 = a14_l[i] * p.au_side[k]
            if d14 > 0.12:
                cx, cy = corners_l[i][k]
                line(_pts(cx + s * 0.035, cy - 0.045, cx + s * 0.055, cy, cx + s * 0.035, cy + 0.045), 0.65,
                     _dark(skin, 0.55 * d14), 0.022)
        if a17_l[i] > 0.15:
            yb_i = float(m["lower"][i, 5, 1]) + 0.07
            line(_pts(-0.1, yb_i + 0.02, 0.0, yb_i, 0.1, yb_i + 0.02), 0.65, _dark(skin, 0.4 * a17_l[i]), 0.022)
        if p.facial_hair in (1, 3):
            mo = m["upper"][i, 1:-1]
            fill(np.concatenate([mo, _xy(mo[::-1, 0], mo[::-1, 1] - 0.065, len(mo))]), 0.72, _dark(hair, 0.05))
        if p.hair_style != 0:
            fill(cap[i], 0.2, hair)
        if p.glasses:
            _add_glasses(ops, p)
        if p.occluder:
            _add_occluder(ops, p)
        out.append(ops)
    return out


def _background(p: FaceParams, res: int) -> np.ndarray:
    """Colour gradient (2x2 corners, bilinear) plus clutter shapes; uint8 ``(res, res, 3)``."""
    corners = np.array(p.bg_corners, dtype=np.uint8).reshape(2, 2, 3)
    img = cv2.resize(corners, (res, res), interpolation=cv2.INTER_LINEAR)
    u = p.clutter
    one = res * _ONE
    for j in range(0, len(u) - 8, 9):
        kind, x0, y0, x1, y1, r, g, b, th = u[j : j + 9]
        col = (r * 255, g * 255, b * 255)
        pt0 = (int(x0 * one), int(y0 * one))
        if kind < 0.4:
            cv2.rectangle(img, pt0, (int(x1 * one), int(y1 * one)), col, -1, cv2.LINE_AA, _SHIFT)
        elif kind < 0.7:
            cv2.circle(img, pt0, int((0.05 + 0.25 * x1) * one), col, -1, cv2.LINE_AA, _SHIFT)
        else:
            cv2.line(img, pt0, (int(x1 * one), int(y1 * one)), col, 1 + int(th * res / 20), cv2.LINE_AA, _SHIFT)
    return img


_NOISE_BANK: np.ndarray | None = None
NOISE_BANK_SIZE = 1 << 20


def _noise_bank() -> np.ndarray:
    """A fixed bank of standard-normal float32 values; an image takes a slice at its own offset.

    Drawing 12k normals per image costs ~150 us (a third of the time budget); slicing a constant
    bank is free and keeps the image a function of its parameters only.
    """
    global _NOISE_BANK
    if _NOISE_BANK is None:
        _NOISE_BANK = np.random.default_rng(20240607).standard_normal(NOISE_BANK_SIZE, dtype=np.float32)
    return _NOISE_BANK


def render_faces(params: Sequence[FaceParams], *, image_size: int = 64, supersample: int = 1) -> np.ndarray:
    """Render N faces; uint8 ``(N, image_size, image_size, 3)`` RGB. Image i is a pure function of
    ``params[i]`` (the same as :func:`render_face` gives for it alone): the batch only shares the
    geometry's numpy calls.
    """
    out = np.empty((len(params), image_size, image_size, 3), dtype=np.uint8)
    for i, (p, ops) in enumerate(zip(params, _build_faces(params), strict=True)):
        out[i] = _render(p, ops, image_size, supersample)
    return out


def render_face(params: FaceParams, *, image_size: int = 64, supersample: int = 1) -> np.ndarray:
    """Render one face; uint8 ``(image_size, image_size, 3)`` RGB, a pure function of ``params``.

    ``supersample`` > 1 draws at that multiple of the size and downsizes with ``INTER_AREA``
    (smoother edges, slower).
    """
    return render_faces([params], image_size=image_size, supersample=supersample)[0]


def _render(p: FaceParams, ops: _Ops, image_size: int, supersample: int) -> np.ndarray:
    res = image_size * supersample
    img = _background(p, res)
    ops.draw(img, p, res)
    if supersample > 1:
        img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_AREA)
    # Lighting: bilinear 2x2 gain field (direction + colour cast); gain 128 = 1.0.
    gain = cv2.resize(np.array(p.light, dtype=np.uint8).reshape(2, 2, 3), (image_size, image_size),
                      interpolation=cv2.INTER_LINEAR)
    img = cv2.multiply(img, gain, scale=1.0 / 128.0)
    if p.blur > 0.05:
        img = cv2.GaussianBlur(img, (0, 0), p.blur * image_size / 64.0)
    if p.gray:
        img = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    if p.noise > 0.5:
        bank = _noise_bank()
        size = img.size
        if size < len(bank):
            off = p.noise_offset % (len(bank) - size)
            noise = bank[off : off + size].reshape(img.shape) * np.float32(p.noise)
        else:
            noise = np.resize(bank, img.shape) * np.float32(p.noise)
        img = cv2.add(img, noise, dtype=cv2.CV_8U)
    if p.jpeg:
        # The RGB buffer goes through the codec as is (cv2 assumes BGR): red and blue swap roles
        # in the luma weights, which changes nothing that matters for blocking/ringing artefacts
        # and saves two channel flips.
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(p.jpeg)])
        if ok:
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return img
