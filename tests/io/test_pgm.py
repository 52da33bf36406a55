"""Tests for nbfunc.io.pgm."""

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from nbfunc.io.errors import NbfuncInputError
from nbfunc.io.pgm import auto_pgm_scale, pgm_bytes, pgm_header, pgm_pixels, write_pgm

GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "golden"


def test_header_values_and_roi():
    image = np.array([[1.0, 2.9, 1000.0], [-1.0, math.nan, 0.5]], np.float32)
    raw = pgm_bytes(image, 10.0, (0, 2, 0, 1))
    header = b"P5\n3 2\n# pixels scaled by 10\n255\n"
    assert raw.startswith(header)
    assert list(raw[len(header):]) == [10, 29, 255, 246, 0, 5]  # (unsigned char) truncation
    roi = pgm_bytes(image, 10.0, (1, 2, 1, 1))
    assert list(roi[len(header):]) == [0, 0, 0, 0, 0, 5]


def test_header_and_roi_pixels_make_the_file():
    """pgm_bytes is pgm_header, then pgm_pixels inside the ROI and 0 outside it."""
    image = np.random.default_rng(4).exponential(20.0, (4, 5)).astype(np.float32)
    raw = pgm_bytes(image, 3.5, (1, 3, 1, 2))
    header = pgm_header(image.shape, 3.5)
    assert header == b"P5\n5 4\n# pixels scaled by 3.5\n255\n" and raw.startswith(header)
    pixels = np.frombuffer(raw[len(header):], np.uint8).reshape(4, 5)
    np.testing.assert_array_equal(pixels[1:3, 1:4], pgm_pixels(image[1:3, 1:4], 3.5))
    assert pixels.sum() == pixels[1:3, 1:4].sum()


@pytest.mark.skipif(not GOLDEN.exists(), reason="golden cases not found")
@pytest.mark.parametrize(
    "case, roi, digest",
    [
        # sha256 of image.pgm the C program wrote for these cases with -pgmscale 0.7
        ("pu18_water_noise_seed_flux_scale_adc", (0, 64, 0, 64),
         "e0037cfa8f0514ced820379b54afb48ac1e23b26700c8d4d2ac451207a63be3a"),
        ("pu19_roi_dmin_fluence_intfile_autoscale", (5, 40, 12, 58),
         "84dcdd51abdde3b24fcfbf4137e5ee0ff8203a2e540e5d999b49af5be2fbe877"),
    ],
)
def test_matches_c_program(case, roi, digest):
    image = np.fromfile(GOLDEN / case / "float.bin", "<f4").reshape(64, 64)
    assert hashlib.sha256(pgm_bytes(image, 0.7, roi)).hexdigest() == digest


def test_auto_scale():
    assert auto_pgm_scale(3.0, 10.0) == 5.0
    assert auto_pgm_scale(3.0, 0.0) == 3.0


def test_write_and_unwritable(tmp_path):
    image = np.ones((2, 2), np.float32)
    write_pgm(tmp_path / "a.pgm", image, 1.0, (0, 1, 0, 1))
    assert (tmp_path / "a.pgm").read_bytes() == pgm_bytes(image, 1.0, (0, 1, 0, 1))
    with pytest.raises(NbfuncInputError, match="nodir"):
        write_pgm(tmp_path / "nodir" / "a.pgm", image, 1.0, (0, 1, 0, 1))
