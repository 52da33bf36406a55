"""Tests for nbfunc.io.stol."""

import math

import numpy as np
import pytest

from nbfunc.io.errors import NbfuncInputError
from nbfunc.io.stol import FOURSTOL_MULTIPLIER, read_stol


def test_padding_and_missing_values(tmp_path):
    path = tmp_path / "water.stol"
    path.write_text("0.1 2.0\n0.2\n0.3 5.0\n")
    stol, F = read_stol(path, 1e10)
    np.testing.assert_allclose(stol, [-1e99, -1e98, 0.1e10, 0.2e10, 0.3e10, 1e98, 1e99])
    np.testing.assert_array_equal(F, [2.0, 2.0, 2.0, 0.0, 5.0, 5.0, 5.0])


def test_multiplier_and_all_missing(tmp_path):
    path = tmp_path / "a.stol"
    path.write_text("0.4\n")
    stol, F = read_stol(path, FOURSTOL_MULTIPLIER)
    assert stol[2] == pytest.approx(0.1e10)
    assert F[2] == 0.0 and math.isnan(F[0]) and math.isnan(F[-1])


@pytest.mark.parametrize("text", ["", "\n\n", "q F\n"])
def test_bad_files(tmp_path, text):
    path = tmp_path / "bad.stol"
    path.write_text(text)
    with pytest.raises(NbfuncInputError, match="bad.stol"):
        read_stol(path, 1e10)


def test_missing_file(tmp_path):
    with pytest.raises(NbfuncInputError, match="none.stol"):
        read_stol(tmp_path / "none.stol", 1e10)
