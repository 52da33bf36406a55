"""Tests for nbfunc.io.matrix: MOSFLM A matrix files."""

from pathlib import Path

import numpy as np
import pytest

from nbfunc.io.errors import NbfuncInputError
from nbfunc.io.matrix import MATRIX_MAX_BYTES, c_atof, read_mosflm_matrix, scan_c_doubles

GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "golden"
PU14 = GOLDEN / "pu14_mat_hkl_nearest"


def write(tmp_path, text):
    path = tmp_path / "A.mat"
    path.write_text(text)
    return path


def test_rows_are_reciprocal_vectors(tmp_path):
    path = write(tmp_path, "1 2 3\n4 5 6\n7 8 10\n")
    m = read_mosflm_matrix(path)
    np.testing.assert_array_equal(m, [[1, 4, 7], [2, 5, 8], [3, 6, 10]])


@pytest.mark.skipif(not PU14.exists(), reason="golden cases not found")
def test_golden_matrix_matches_c_reciprocal_vectors():
    m = read_mosflm_matrix(PU14 / "A_pu.mat") / 1.2  # -lambda 1.2
    # reciprocal-space cell vectors the C program printed (columns a*, b*, c*)
    printed = np.array(
        [
            [0.01420479, -0.02088987, -0.00713202],
            [0.02460342, 0.00822925, 0.00986921],
            [-0.00761233, -0.01238367, 0.01858925],
        ]
    )
    np.testing.assert_allclose(m.T, printed, atol=6e-9)


def test_numbers_running_together_and_trailing_text(tmp_path):
    text = " -0.01234567-0.00123456 0.02\n0.1 0.2 0.3\n1e-2 .5 +7\n U matrix follows\n"
    m = read_mosflm_matrix(write(tmp_path, text))
    np.testing.assert_allclose(m[:, 0], [-0.01234567, -0.00123456, 0.02])
    np.testing.assert_allclose(m[2], [0.02, 0.3, 7.0])


def test_c_atof():
    assert c_atof("  -1.5e2xyz") == (-150.0, 8)
    assert c_atof("abc") == (0.0, 0)
    assert c_atof("0x10 ")[0] == 16.0
    assert c_atof("1.e1,")[0] == 10.0
    assert scan_c_doubles("1 2\n x", 3) == ([1.0, 2.0], (2, "x"))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "found 0 numbers, expected 9"),
        ("1 2 3\n4 5 6\n", "found 6 numbers, expected 9"),
        ("1 2 3\n4 five 6\n7 8 9\n", "line 2: found 'five'"),
        ("1 2 3\n4 5 6\n5 7 9\n", "singular"),
        ("0 0 0\n0 0 0\n0 0 0\n", "singular"),
        ("1 2 3\n4 inf 6\n7 8 9\n", "non-finite"),
        ("1e308 0 0\n0 1e308 0\n0 0 1e308\n", "determinant inf is outside 1e-60 to 1e.60"),
        ("1e-100 0 0\n0 1e-100 0\n0 0 1e-100\n", "determinant 1e-300 is outside"),
        ("1 2 3\n4 5\x00 6\n7 8 9\n", r"binary data \(a NUL byte at offset 9\)"),
        ("1 0 0\n0 1 0\n0 0 1\n" + " " * MATRIX_MAX_BYTES, "holds more than 1 MiB"),
    ],
)
def test_bad_files(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(NbfuncInputError, match=expected) as info:
        read_mosflm_matrix(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(NbfuncInputError, match="none.mat"):
        read_mosflm_matrix(tmp_path / "none.mat")


def test_folder_is_refused(tmp_path):
    with pytest.raises(NbfuncInputError, match="is a folder, expected a file"):
        read_mosflm_matrix(tmp_path)
