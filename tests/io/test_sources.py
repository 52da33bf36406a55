"""Tests for nbfunc.io.sources: the C column reader and source files."""

import math
from pathlib import Path

import numpy as np
import pytest

from nbfunc.io.errors import NbfuncInputError
from nbfunc.io.sources import COLUMNS_MAX_BYTES, COLUMNS_MAX_LINES, apply_source_defaults, read_columns, read_source_file, source_defaults

GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "golden"
PU11 = GOLDEN / "pu11_sourcefile_4_mixed_columns"


def write(tmp_path, text, name="sources.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def nan_equal(a, b):
    np.testing.assert_array_equal(np.asarray(a, float), np.asarray(b, float))


class TestReadColumns:
    def test_delimiters_blank_lines_and_missing_columns(self, tmp_path):
        path = write(tmp_path, "1,2;3\n\n \t ,\n4:5!6 7 8 9\n10\n")
        expected = [[1, 2, 3, np.nan, np.nan], [4, 5, 6, 7, 8], [10] + [np.nan] * 4]
        nan_equal(read_columns(path, 5), expected)

    def test_atof_prefix_and_numberstuff_skipping(self, tmp_path):
        # "1-2" is one token for the C reader (value 1); "3abc" reads 3
        nan_equal(read_columns(write(tmp_path, "1-2 3abc 4\n"), 3), [[1, 3, 4]])

    def test_last_line_without_newline_fills_zeros_like_c(self, tmp_path):
        nan_equal(read_columns(write(tmp_path, "1 2\n3 4"), 3), [[1, 2, np.nan], [3, 4, 0]])

    def test_explicit_nan_is_missing(self, tmp_path):
        nan_equal(read_columns(write(tmp_path, "nan 2\n"), 2), [[np.nan, 2]])


class TestSourceFile:
    @pytest.mark.skipif(not PU11.exists(), reason="golden cases not found")
    def test_golden_sources_match_c_printout(self):
        cols = read_source_file(PU11 / "sources.txt")
        assert cols.shape == (4, 5)
        full = source_defaults(cols, np.array([1.0, 0.0, 0.0]), 1e-10)  # -mosflm beam, -lambda 1
        printed = [
            line.split()
            for line in (PU11 / "stdout.txt").read_text().splitlines()
            if line.startswith("-10 ")
        ]
        assert len(printed) == 4
        for row, text in zip(full, printed):
            assert ["%g" % v for v in row] == text

    def test_defaults_and_unit_directions(self, tmp_path):
        cols = read_source_file(write(tmp_path, "-10 0 0 2.0 1.1e-10\n0 3 4\n\n"))
        beam = np.array([0.0, 0.0, 1.0])
        directions, weights, wavelengths = apply_source_defaults(cols, beam, 1e-10, 10.0)
        np.testing.assert_allclose(directions, [[-1, 0, 0], [0, 0.6, 0.8]])
        np.testing.assert_array_equal(weights, [2.0, 1.0])
        np.testing.assert_array_equal(wavelengths, [1.1e-10, 1e-10])
        only_lambda = np.array([[np.nan, np.nan, np.nan, np.nan, 2e-10]])
        d, w, lam = apply_source_defaults(only_lambda, beam, 1e-10)
        np.testing.assert_array_equal(d, [[0.0, 0.0, -1.0]])  # from the sample towards the source
        assert w[0] == 1.0 and lam[0] == 2e-10

    def test_zero_vector_stays_zero(self):
        cols = np.array([[0.0, 0.0, 0.0, 1.0, 1e-10]])
        d, _, _ = apply_source_defaults(cols, np.array([1.0, 0, 0]), 1e-10)
        np.testing.assert_array_equal(d, [[0.0, 0.0, 0.0]])
        assert not math.isnan(d.sum())

    @pytest.mark.parametrize(
        "text, expected",
        [
            ("", "no data lines"),
            ("\n \n,,\n", "no data lines"),
            ("-10 0 0\nfoo 1 2\n", "line 2: column 1 is 'foo'"),
            ("\x00\x01\x02binary\n", r"binary data \(a NUL byte at offset 0\)"),
            ("\x01\x02binary\n", "line 1: column 1"),
            ("-10 0 0 1 -1e-10\n", "wavelength -1e-10"),
            ("-10 0 0 1 1e308\n", "source 1 has 1e.308 in column 5, expected a finite value"),
            ("-10 0 0\n1e300 0 0\n", "source 2 has 1e.300 in column 1"),
            ("-10 inf 0\n", "source 1 has inf in column 2"),
            ("-10 0 0", "wavelength 0"),
            ("-10 0 0\r\n", "wavelength 0"),
        ],
    )
    def test_bad_files(self, tmp_path, text, expected):
        path = write(tmp_path, text)
        with pytest.raises(NbfuncInputError, match=expected) as info:
            read_source_file(path)
        assert str(path) in str(info.value)

    def test_missing_file(self, tmp_path):
        with pytest.raises(NbfuncInputError, match="gone.txt"):
            read_source_file(tmp_path / "gone.txt")

    def test_more_lines_than_the_limit_are_refused_before_parsing(self, tmp_path):
        path = tmp_path / "many.txt"
        path.write_bytes(b"1\n" * (COLUMNS_MAX_LINES + 1))
        with pytest.raises(NbfuncInputError) as info:
            read_columns(path, 5, "source file")
        assert str(info.value) == (f"{path}: has {COLUMNS_MAX_LINES + 1} lines, more than the "
                                   f"{COLUMNS_MAX_LINES} a source file may have; give fewer lines")

    def test_larger_than_limit_is_refused_before_reading(self, tmp_path):
        path = tmp_path / "huge.txt"
        with open(path, "wb") as handle:
            handle.truncate(COLUMNS_MAX_BYTES + 1)  # sparse: no data is written or read
        with pytest.raises(NbfuncInputError, match="holds more than 64 MiB") as info:
            read_source_file(path)
        assert str(path) in str(info.value) and "source file" in str(info.value)
