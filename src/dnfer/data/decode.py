"""Robust image decoding: any file or pixel array -> RGB uint8 ``(S, S, 3)`` at the training size.

One function, :func:`decode_image`, is used by every adapter and by the prepared cache, so an
image decoded directly and one read back from the cache are bit-identical.

Rules (documented in docs/datasets.md):

- Any PIL mode becomes RGB: ``L``/``1`` are replicated, ``P`` goes through its palette (and
  its transparency), ``CMYK`` (incl. Adobe's inverted JPEGs, which PIL handles) is converted,
  16-bit (``I;16*``, ``I``) is scaled to 8 bits by value/257 (full range, not clipped), float
  ``F`` in [0, 1] is scaled by 255, alpha (``RGBA``, ``LA``, ``PA``) is composited onto black
  (what the pixels show where alpha is 0 is undefined, black is the premultiplied value).
- The EXIF orientation is applied (as OpenCV's ``imread`` does), so boxes refer to the
  upright image.
- An optional crop box ``(x, y, w, h)`` in pixels is rounded to whole pixels, clipped to the
  image and cropped before resizing; an empty clipped box is an error.
- Resize is a plain stretch to ``(S, S)`` with one resampling filter, :data:`RESAMPLE`
  (bilinear with PIL's antialiasing, the filter torchvision's ``Resize`` uses). Large JPEGs are
  decoded at a reduced DCT scale (``Image.draft``) when that still leaves at least ``2 S`` pixels
  per side of the crop: AffectNet's multi-megapixel photos decode several times faster.
- Truncated files are errors (``LOAD_TRUNCATED_IMAGES`` stays off): nothing is half-decoded.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: The one resampling filter used for every resize.
RESAMPLE = Image.Resampling.BILINEAR

Box = tuple[float, float, float, float]


class DecodeError(Exception):
    """An image could not be read; ``reason`` is a short phrase for messages and skipped.csv."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _to_uint8_gray(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a single-channel high-bit-depth array to uint8 ``(H, W)``."""
    if mode == "F":
        a = np.nan_to_num(arr.astype(np.float64))
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    a = arr.astype(np.int64)
    if mode == "I" and a.size and a.max() <= 255 and a.min() >= 0:
        return a.astype(np.uint8)  # an 8-bit image stored as 32-bit ints
    # 16-bit full range 0..65535 -> 0..255, rounded (x/257 maps 65535 to 255 exactly).
    return np.clip((a * 255 + 32767) // 65535, 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to mode ``RGB`` (see the module rules)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        gray = _to_uint8_gray(np.asarray(img), mode)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "La", "RGBa", "RGBA"):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV: PIL's conversions are exact enough


def _clip_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """``(x, y, w, h)`` -> integer ``(left, top, right, bottom)`` clipped to the image."""
    x, y, w, h = (float(v) for v in box)
    left, top = max(0, int(round(x))), max(0, int(round(y)))
    right, bottom = min(width, int(round(x + w))), min(height, int(round(y + h)))
    if right - left < 1 or bottom - top < 1:
        raise DecodeError(f"crop box {tuple(box)} lies outside the {width}x{height} image")
    return left, top, right, bottom


def file_size(path: str | os.PathLike) -> int:
    """Size in bytes of an image file; DecodeError for missing, unreadable or zero-byte files."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except OSError as e:
        raise DecodeError(f"cannot read file ({e.strerror})") from None
    if size == 0:
        raise DecodeError("zero-byte file")
    return size


def _open(source: str | Path | bytes) -> Image.Image:
    if isinstance(source, bytes):
        if not source:
            raise DecodeError("zero-byte file")
        return Image.open(io.BytesIO(source))
    path = os.fspath(source)
    file_size(path)
    return Image.open(path)


def decode_image(source: str | Path | bytes | np.ndarray, *, size: int, box: Box | None = None) -> np.ndarray:
    """Decode one image to RGB uint8 ``(size, size, 3)``.

    Args:
        source: a file path, the file's bytes, or a pixel array (``(H, W)`` gray or
            ``(H, W, C)``, any integer or float dtype, e.g. FER2013's 48x48 rows).
        size: side of the square output.
        box: optional face box ``(x, y, w, h)`` in (upright) source pixels, clipped to the image.

    Raises:
        DecodeError: missing, empty, truncated, unrecognised or otherwise undecodable input.
    """
    try:
        if isinstance(source, np.ndarray):
            img = _array_to_image(source)
            scale = (1.0, 1.0)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": harmless, not our message
                img = _open(source)
                w0, h0 = img.size
                if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
                    short = min(box[2], box[3]) if box is not None else min(w0, h0)
                    if short >= 4 * size:
                        # The smallest DCT scale that keeps >= 2*size px across the crop (isotropic,
                        # so the EXIF orientation does not matter here); the 2x margin keeps the
                        # sub-pixel rounding of the crop edges below half an output pixel.
                        f = 2 * size / short
                        img.draft(img.mode, (int(np.ceil(w0 * f)), int(np.ceil(h0 * f))))
                drafted = img.size
                img = ImageOps.exif_transpose(img)
                img.load()
                swapped = img.size != drafted
                up_w0, up_h0 = (h0, w0) if swapped else (w0, h0)
                scale = (img.size[0] / up_w0, img.size[1] / up_h0)
        rgb = to_rgb(img)
        if box is not None:
            b = (box[0] * scale[0], box[1] * scale[1], box[2] * scale[0], box[3] * scale[1])
            # Crop first, then resize: resizing with a box would let the filter read pixels
            # just outside the face box.
            rgb = rgb.crop(_clip_box(b, *rgb.size))
        out = rgb.resize((size, size), RESAMPLE)
        arr = np.asarray(out, dtype=np.uint8)
        if arr.shape != (size, size, 3):
            raise DecodeError(f"decoded to unexpected shape {arr.shape}")
        return arr
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image file (format not recognised)") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower() or "broken data stream" in msg.lower():
            msg = "truncated image file"
        raise DecodeError(f"cannot decode image ({msg})") from None


def _array_to_image(arr: np.ndarray) -> Image.Image:
    """A gray ``(H, W)`` / ``(H, W, 1|3|4)`` array of any dtype -> PIL image."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or a.size == 0:
        raise DecodeError(f"pixel array has unsupported shape {a.shape}")
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating):
            af = np.nan_to_num(a.astype(np.float64))
            if af.size and af.max() <= 1.0:
                af = af * 255.0
            a = np.clip(np.rint(af), 0, 255).astype(np.uint8)
        elif a.size and a.max() > 255:
            a = np.clip((a.astype(np.int64) * 255 + 32767) // 65535, 0, 255).astype(np.uint8)
        else:
            a = np.clip(a, 0, 255).astype(np.uint8)
    mode = "L" if a.ndim == 2 else ("RGB" if a.shape[2] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(a), mode)
