"""8-bit PGM previews (``-pgmfile``), byte for byte as the C program writes them."""

from __future__ import annotations

import os

import numpy as np

from nbfunc.io.atomic import atomic_write_bytes
from nbfunc.io.smv import c_unsigned_cast, roi_mask


def auto_pgm_scale(int_scale: float, rmsd: float) -> float:
    """The C program's automatic ``-pgmscale``: 250 / (5 rmsd), or ``int_scale`` if rmsd <= 0."""
    return 250.0 / (5.0 * rmsd) if rmsd > 0.0 else int_scale


def pgm_bytes(float_image: np.ndarray, pgm_scale: float, roi: tuple) -> bytes:
    """A binary (P5) PGM of ``float_image``.

    Header ``"P5\\n<fast> <slow>\\n# pixels scaled by <scale %g>\\n255\\n"``; each pixel is
    ``(unsigned char) min(255, float32 pixel * pgm_scale)`` (truncation); pixels outside the
    inclusive ROI (xmin, xmax, ymin, ymax) are 0.

    Args:
        float_image: (slow, fast) photons per pixel (read as float32).
        pgm_scale: grey levels per photon.
        roi: (xmin, xmax, ymin, ymax) inclusive, x fast.
    """
    img = np.asarray(float_image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"pgm_bytes needs a 2-D (slow, fast) image, got shape {img.shape}")
    test = img.astype(np.float64) * float(pgm_scale)
    test = np.where(test > 255.0, 255.0, test)
    pixels = np.where(roi_mask(img.shape, roi), c_unsigned_cast(test, 8), 0).astype(np.uint8)
    slow, fast = img.shape
    header = "P5\n%d %d\n# pixels scaled by %g\n255\n" % (fast, slow, pgm_scale)
    return header.encode("ascii") + pixels.tobytes()


def write_pgm(
    path: str | os.PathLike, float_image: np.ndarray, pgm_scale: float, roi: tuple
) -> None:
    """Write :func:`pgm_bytes` to ``path`` atomically."""
    atomic_write_bytes(path, pgm_bytes(float_image, pgm_scale, roi))
