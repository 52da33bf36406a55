"""8-bit PGM previews (``-pgmfile``), byte for byte as the C program writes them."""

from __future__ import annotations

import os

import numpy as np

from nbfunc.io.atomic import atomic_write_bytes
from nbfunc.io.smv import c_unsigned_cast, roi_mask


def auto_pgm_scale(int_scale: float, rmsd: float) -> float:
    """The C program's automatic ``-pgmscale``: 250 / (5 rmsd), or ``int_scale`` if rmsd <= 0."""
    return 250.0 / (5.0 * rmsd) if rmsd > 0.0 else int_scale


def pgm_header(shape: tuple[int, int], pgm_scale: float) -> bytes:
    """The C program's PGM header ``"P5\\n<fast> <slow>\\n# pixels scaled by <%g>\\n255\\n"``
    for a (slow, fast) image."""
    slow, fast = shape
    return ("P5\n%d %d\n# pixels scaled by %g\n255\n" % (fast, slow, pgm_scale)).encode("ascii")


def pgm_pixels(float_pixels: np.ndarray, pgm_scale: float) -> np.ndarray:
    """The grey level of each pixel inside the ROI: ``(unsigned char) min(255, float32 pixel *
    pgm_scale)`` (truncation, C's conversion).

    Args:
        float_pixels: photons per pixel, any shape (read as float32).
        pgm_scale: grey levels per photon.

    Returns:
        uint8 grey levels of the same shape.

    Example:
        >>> pgm_pixels(np.array([0.5, 2.0, 99.0]), 10.0).tolist()
        [5, 20, 255]
    """
    test = np.asarray(float_pixels, dtype=np.float32).astype(np.float64) * float(pgm_scale)
    return c_unsigned_cast(np.where(test > 255.0, 255.0, test), 8).astype(np.uint8)


def pgm_bytes(float_image: np.ndarray, pgm_scale: float, roi: tuple) -> bytes:
    """A binary (P5) PGM of a whole (slow, fast) image: `pgm_header`, then `pgm_pixels` inside
    the inclusive ROI (xmin, xmax, ymin, ymax, x fast) and 0 outside it.

    Args:
        float_image: (slow, fast) photons per pixel (read as float32).
        pgm_scale: grey levels per photon.
        roi: (xmin, xmax, ymin, ymax) inclusive, x fast.
    """
    img = np.asarray(float_image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"pgm_bytes needs a 2-D (slow, fast) image, got shape {img.shape}")
    pixels = np.where(roi_mask(img.shape, roi), pgm_pixels(img, pgm_scale), np.uint8(0))
    return pgm_header(img.shape, pgm_scale) + pixels.astype(np.uint8).tobytes()


def write_pgm(
    path: str | os.PathLike, float_image: np.ndarray, pgm_scale: float, roi: tuple
) -> None:
    """Write :func:`pgm_bytes` to ``path`` atomically."""
    atomic_write_bytes(path, pgm_bytes(float_image, pgm_scale, roi))
