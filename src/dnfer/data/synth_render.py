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
_T7 = np.linspace(0.0, 1.0, 7)
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


def _quad(p0x: float, p0y: float, mx: float, my: float, p2x: float, p2y: float, basis: np.ndarray = _QB) -> np.ndarray:
    """Quadratic Bezier through three points; ``(len(basis), 2)``."""
    return basis @ np.array([[p0x, p0y], [mx, my], [p2x, p2y]])


def _ellipse(cx: float, cy: float, rx: float, ry: float, unit: np.ndarray = _UNIT16) -> np.ndarray:
    return _xy(unit[:, 0] * rx + cx, unit[:, 1] * ry + cy, len(unit))


def _mirrored_ellipses(cx: float, cy: float, rx: float, ry: float, unit: np.ndarray) -> list[np.ndarray]:
    """The ellipses at ``(-cx, cy)`` and ``(cx, cy)`` (same points as two :func:`_ellipse` calls)."""
    out = np.empty((2, len(unit), 2))
    out[:, :, 0] = unit[:, 0] * rx + _SIDES * cx
    out[:, :, 1] = unit[:, 1] * ry + cy
    return [out[0], out[1]]


# --- landmarks ---------------------------------------------------------------------------------


def mouth_geometry(p: FaceParams) -> dict[str, np.ndarray | float]:
    """Mouth curves in face units (before pose).

    Returns ``top``/``bottom`` (11, 2): the upper and lower edge of the lip opening from the image
    left corner to the right corner (identical when the mouth is closed); ``upper``/``lower``
    (11, 2): the outer lip edges; ``open``: the opening height at the centre; ``corners`` (2, 2).
    """
    au = p.au.tolist()
    a10, a12, a14, a15, a16, a17 = au[7], au[8], au[9], au[10], au[11], au[12]
    a20, a23, a24, a25, a26 = au[13], au[14], au[15], au[16], au[17]
    mL, mR = p.au_side
    open_ = (0.04 * a25 + 0.2 * a26 + 0.05 * a16 + 0.035 * a10) * (1.0 - 0.9 * a24) * (1.0 - 0.6 * a23)
    open_ = max(open_ - 0.012, 0.0)  # small values keep the lips sealed
    y_top = p.mouth_y - 0.05 * a10 - 0.025 * a17
    y_bot = y_top + open_
    base_w = p.mouth_w * (1 + 0.3 * a20 - 0.15 * a23 - 0.1 * a24)
    base_dy = p.rest_curve + 0.16 * a15 + 0.04 * a20 + 0.01 * a17
    wl = base_w + p.mouth_w * (0.2 * a12 - 0.1 * a14) * mL
    wr = base_w + p.mouth_w * (0.2 * a12 - 0.1 * a14) * mR
    yl = p.mouth_y + base_dy - (0.19 * a12 + 0.03 * a14) * mL
    yr = p.mouth_y + base_dy - (0.19 * a12 + 0.03 * a14) * mR
    x = _T11 * np.where(_LEFT11, wl, wr)
    cy_t2 = np.where(_LEFT11, yl, yr) * _T11SQ
    top = _xy(x, y_top * _W11 + cy_t2, 11)
    bottom = _xy(x, y_bot * _W11 + cy_t2, 11)
    ut = p.lip_up * max(1 - 0.55 * a23 - 0.45 * a24 - 0.25 * a20 - 0.2 * a12, 0.2)
    lt = p.lip_lo * max(1 - 0.5 * a23 - 0.45 * a24 - 0.2 * a20 - 0.15 * a12 + 0.2 * a17, 0.2)
    upper = _xy(x, top[:, 1] - ut * (_PROF11 - _BOW11), 11)
    lower = _xy(x, bottom[:, 1] + lt * _PROF11, 11)
    return {"top": top, "bottom": bottom, "upper": upper, "lower": lower, "open": open_,
            "corners": _pts(-wl, yl, wr, yr)}


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
    au = p.au
    a1, a2, a4, a9 = float(au[0]), float(au[1]), float(au[2]), float(au[6])
    base = p.eye_y - p.brow_dist
    iy = base - 0.16 * a1 + 0.1 * a4 + 0.03 * a9 + p.rest_brow
    oy = base + 0.03 - 0.16 * a2 + 0.02 * a4
    my = 0.5 * (iy + oy) - p.brow_arch - 0.04 * a2 - 0.025 * a1 + 0.02 * a4
    return (s * (0.1 - 0.045 * a4), iy, s * p.eye_sep * 0.9, my, s * (p.eye_sep + p.eye_w + 0.06), oy)


def _lid_heights(p: FaceParams) -> tuple[float, float]:
    au = p.au
    a4, a5, a6, a7 = float(au[2]), float(au[3]), float(au[4]), float(au[5])
    up = p.eye_open * (1 + 0.95 * a5 - 0.5 * a7 - 0.2 * a6 - 0.1 * a4)
    lo = p.eye_low * (1 - 0.6 * a6 - 0.5 * a7)
    return max(up, 0.012), max(lo, 0.008)


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


def _build_face(p: FaceParams) -> _Ops:
    """All face elements, back to front, in face units."""
    ops = _Ops()
    fill, line = ops.fill, ops.line
    skin = p.skin
    hair = p.hair_color
    fw = p.face_w
    au = p.au.tolist()
    a1, a2, a4, a6, a9, a10, a12, a14, a17, a26 = (au[0], au[1], au[2], au[4], au[6], au[7], au[8], au[9],
                                                   au[12], au[17])
    m = mouth_geometry(p)
    chin_drop = 0.12 * a26
    ey = p.eye_y
    age = p.age

    # Long hair behind the head, neck, clothes, ears.
    if p.hair_style == 2:
        fill(_pts(-fw * 1.15, -0.4, -fw * 1.05, -1.15, 0.0, -1.42, fw * 1.05, -1.15, fw * 1.15, -0.4,
                  fw * 1.3, 1.6, -fw * 1.3, 1.6), 0.0, _dark(hair, 0.15))
    fill(_pts(-0.42, 0.6, 0.42, 0.6, 0.48, 1.6, -0.48, 1.6), 0.0, _dark(skin, 0.25))
    cd = 1.3 + chin_drop * 0.3
    fill(_pts(-0.5, cd, 0.5, cd, 1.6, 1.75, 1.6, 2.6, -1.6, 2.6, -1.6, 1.75), 0.0, p.clothes_color)
    fill(_mirrored_ellipses(fw * 0.98, ey + 0.12, 0.1, 0.2, _UNIT10), -0.3, _dark(skin, 0.08))
    # Face outline: upper half an ellipse, lower half tapered towards the (possibly dropped) chin.
    fx = fw * _CA28 * np.where(_LOW28, 1 - p.jaw_taper * _SA28SQ, 1.0)
    fy = np.where(_LOW28, p.face_bot + chin_drop, p.face_top) * _SA28
    fill(_xy(fx, fy, 28), 0.0, skin)

    # Forehead wrinkles (AU1/AU2) and the glabella furrows (AU4).
    aw = max(a1, a2)
    if aw + age > 0.15:
        ybase = ey - p.brow_dist - 0.2
        half = 0.2 + 0.2 * a2
        arc = ybase + 0.04 * _T9 * _T9
        line([_xy(_T9 * half, arc, 9), _xy(_T9 * half, arc - 0.09, 9)], 0.5, _dark(skin, 0.3 * aw + 0.1 * age),
             0.022)
    if a4 > 0.1:
        yb = ey - p.brow_dist + 0.085 * a4
        line([_pts(-0.035, yb - 0.08, -0.045, yb + 0.07), _pts(0.035, yb - 0.08, 0.045, yb + 0.07)], 0.6,
             _dark(skin, 0.45 * a4), 0.022)

    # Eyes: sclera, then iris and pupil clipped to the lid opening by clamping their outline onto
    # the lid curves (cheaper than painting skin-coloured masks over them), lid lines.
    up, lo = _lid_heights(p)
    gx, gy = p.gaze
    ew = p.eye_w
    uy = ey - up * _W9
    ly = ey + lo * _W9
    if p.glasses != 2:  # sunglasses hide the eyes; they are drawn later
        # Both eyes at once: row 0 = image left, row 1 = right.
        exs = _SIDES * p.eye_sep  # (2, 1)
        lids = np.empty((2, 18, 2))  # upper lid left->right, then lower lid right->left
        lids[:, :9, 0] = exs + ew * _T9
        lids[:, 9:, 0] = lids[:, 8::-1, 0]
        lids[:, :9, 1] = uy
        lids[:, 9:, 1] = ly[::-1]
        fill(list(lids), 0.55, (235.0, 232.0, 225.0))
        for rad, unit, col in ((p.iris_r, _UNIT16, p.iris_color), (0.42 * p.iris_r, _UNIT10, (15.0, 12.0, 12.0))):
            pts = np.empty((2, len(unit), 2))
            ix = pts[:, :, 0]
            ix[:] = unit[:, 0] * rad + gx
            u = np.minimum(np.abs(ix) / ew, 1.0)
            w = 1.0 - u * u
            ix += exs
            # np.minimum/np.maximum: same values as np.clip with array bounds, at a third of its overhead
            pts[:, :, 1] = np.minimum(np.maximum(unit[:, 1] * rad + (ey + gy), ey - up * w), ey + lo * w)
            fill(list(pts), 0.58, col)
        line(list(lids[:, :9]), 0.56, (25.0, 18.0, 15.0), 0.03)
        line(list(lids[:, 9:]), 0.56, _dark(skin, 0.3), 0.015)
    if a6 + age > 0.15:  # crow's feet and the raised lower-lid bulge of AU6
        feet, bags = [], []
        for s in (-1.0, 1.0):
            ox = s * (p.eye_sep + ew + 0.03)
            feet.append(_pts(ox + s * 0.1, ey - 0.05, ox, ey, ox + s * 0.1, ey + 0.05))
            bags.append(_xy(s * p.eye_sep + ew * _T9[2:-2], ly[2:-2] + 0.045, 5))
        line(feet, 0.5, _dark(skin, 0.5 * a6 + 0.1 * age), 0.018)
        line(bags, 0.55, _dark(skin, 0.4 * a6), 0.018)

    # Brows: tapered filled band along a quadratic through inner, middle and outer point.
    ctrl = np.array([_brow_points(p, -1.0), _brow_points(p, 1.0)]).reshape(2, 3, 2)
    c = _QB @ ctrl  # (2, 7, 2)
    th = p.brow_thick * _BROW_TAPER
    band = np.empty((2, 14, 2))
    band[:, :7, 0] = c[:, :, 0]
    band[:, :7, 1] = c[:, :, 1] - th
    band[:, 7:, 0] = c[:, ::-1, 0]
    band[:, 7:, 1] = c[:, ::-1, 1] + th[::-1]
    brows = list(band)
    fill(brows, 0.6, p.brow_color)

    # Nose: bridge shade, nostrils (raised by AU9/AU10), wings, wrinkles (AU9).
    ny = p.nose_y - 0.035 * a9 - 0.02 * a10
    line(_pts(0.07, ey + 0.08, 0.08, ny - 0.08), 0.8, _dark(skin, 0.12), 0.02)
    nx = 0.055 * (1 + 0.3 * a9)
    fill(_mirrored_ellipses(nx, ny + 0.02, 0.035, 0.017, _UNIT10), 0.85, _dark(skin, 0.55))
    wx = p.nose_w - 0.035
    line([_xy(-_ARC_C - wx, _ARC_S + ny - 0.005, 6), _xy(_ARC_C + wx, _ARC_S + ny - 0.005, 6)], 0.8,
         _dark(skin, 0.3), 0.018)
    if a9 > 0.1:
        line([_pts(-0.06, y, 0.0, y - 0.01, 0.06, y) for y in (ey + 0.02, ey + 0.055, ey + 0.09)], 0.75,
             _dark(skin, 0.5 * a9), 0.018)

    # Nasolabial folds: deeper with smiles (AU12), upper-lip raise (AU10), nose wrinkle (AU9).
    corners = m["corners"]
    assert isinstance(corners, np.ndarray)
    cl = corners.tolist()
    for i, s in enumerate((-1.0, 1.0)):
        ms = p.au_side[i]
        d = 0.08 + 0.45 * max(a12 * ms, a10, 0.8 * a9, 0.6 * a6) + 0.15 * age
        sx, sy = s * (p.nose_w + 0.02), ny - 0.02
        ex_, ey_ = cl[i][0] + s * 0.06, cl[i][1] + 0.03
        mx, my = 0.5 * (sx + ex_) + s * (0.04 + 0.05 * a12 * ms), 0.5 * (sy + ey_)
        line(_quad(sx, sy, mx, my, ex_, ey_, _QB4), 0.65, _dark(skin, d), 0.022)

    # Beard (before the mouth so the lips stay visible).
    if p.facial_hair >= 2:
        sel = _ANG28[_JAW]
        sn = np.sin(sel)
        beard = _xy(fw * np.cos(sel) * (1 - p.jaw_taper * sn * sn), (p.face_bot + chin_drop) * sn, len(sel))
        fill(np.concatenate([beard, _pts(-fw * 0.92, p.nose_y + 0.12, fw * 0.92, p.nose_y + 0.12)]), 0.3,
             _dark(hair, 0.05))

    # Mouth: lips, opening, teeth, lip line; dimple (AU14) and chin boss (AU17).
    lip = p.lip_color
    top, bottom, upper_lip, lower_lip = m["top"], m["bottom"], m["upper"], m["lower"]
    assert isinstance(top, np.ndarray) and isinstance(bottom, np.ndarray)
    assert isinstance(upper_lip, np.ndarray) and isinstance(lower_lip, np.ndarray)
    open_ = float(m["open"])  # type: ignore[arg-type]
    fill(np.concatenate([upper_lip, lower_lip[::-1]]), 0.7, lip)
    if open_ > 0.0:
        fill(np.concatenate([top, bottom[::-1]]), 0.7, (55.0, 20.0, 25.0))
        teeth = _xy(top[::-1, 0], top[::-1, 1] + min(0.45 * open_, 0.045) * _PROF11, 11)
        fill(np.concatenate([top, teeth]), 0.7, (232.0, 228.0, 212.0))
    line(top, 0.7, _dark(lip, 0.6), 0.03)
    for i, s in enumerate((-1.0, 1.0)):
        d14 = a14 * p.au_side[i]
        if d14 > 0.12:
            cx, cy = cl[i]
            line(_pts(cx + s * 0.035, cy - 0.045, cx + s * 0.055, cy, cx + s * 0.035, cy + 0.045), 0.65,
                 _dark(skin, 0.55 * d14), 0.022)
    if a17 > 0.15:
        yb = float(lower_lip[5, 1]) + 0.07
        line(_pts(-0.1, yb + 0.02, 0.0, yb, 0.1, yb + 0.02), 0.65, _dark(skin, 0.4 * a17), 0.022)
    if p.facial_hair in (1, 3):
        mo = upper_lip[1:-1]
        fill(np.concatenate([mo, _xy(mo[::-1, 0], mo[::-1, 1] - 0.065, len(mo))]), 0.72, _dark(hair, 0.05))

    # Hair cap with a hairline across the forehead (bangs hang lower).
    if p.hair_style != 0:
        cap = _xy(fw * 1.06 * _CAP_C, -(p.face_top + 0.08) * _CAP_S, 12)
        bangs = p.hair_style == 3
        hl = max(p.hairline + 0.3, -0.42) if bangs else p.hairline
        front = _xy(_T9 * fw * 0.95, hl + (0.12 if bangs else 0.35) * _T9P4, 9)
        fill(np.concatenate([cap, _pts(-fw * 1.03, -0.15), front, _pts(fw * 1.03, -0.15)]), 0.2, hair)

    # Glasses.
    if p.glasses:
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
            fill(lenses, 0.6, (20.0, 22.0, 25.0))
        line(lenses, 0.6, col, 0.03, closed=True)
        inner = p.eye_sep - ew - 0.06
        line([*arms, _pts(-inner, ey - 0.03, 0.0, ey - 0.06, inner, ey - 0.03)], 0.5, col, 0.03)

    # Occluder in front of the face: a hand (palm + fingers) or an object.
    if p.occluder:
        cx, cy = p.occ_xy
        r = p.occ_size
        ca_, sa_ = math.cos(p.occ_angle), math.sin(p.occ_angle)
        rotm = np.array([[ca_, sa_], [-sa_, ca_]])
        shift = np.array([cx, cy])
        if p.occluder == 1:
            fill(_ellipse(0.0, 0.35 * r, 0.42 * r, 0.5 * r) @ rotm + shift, 1.0, p.occ_color)
            fingers = [
                _pts(fx0, 0.1 * r, fx0 * 1.1, -0.55 * r + 0.1 * abs(k - 1.5) * r) @ rotm + shift
                for k, fx0 in enumerate((-0.3 * r, -0.1 * r, 0.1 * r, 0.3 * r))
            ]
            line(fingers, 1.0, p.occ_color, 0.2 * r)
            line(_pts(-0.1 * r, 0.1 * r, -0.1 * r, -0.3 * r) @ rotm + shift, 1.0, _dark(p.occ_color, 0.3), 0.02)
        else:
            box = _pts(-0.8, -0.5, 0.8, -0.5, 0.8, 0.5, -0.8, 0.5) * r @ rotm + shift
            fill(box, 1.0, p.occ_color)
            line(box, 1.0, _dark(p.occ_color, 0.35), 0.03, closed=True)
    return ops


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


def render_face(params: FaceParams, *, image_size: int = 64, supersample: int = 1) -> np.ndarray:
    """Render one face; uint8 ``(image_size, image_size, 3)`` RGB, a pure function of ``params``.

    ``supersample`` > 1 draws at that multiple of the size and downsizes with ``INTER_AREA``
    (smoother edges, slower).
    """
    p = params
    res = image_size * supersample
    img = _background(p, res)
    _build_face(p).draw(img, p, res)
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
