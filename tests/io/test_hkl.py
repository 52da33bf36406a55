"""Tests for nbfunc.io.hkl: HKL text files and the Fdump.bin cache."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from nbfunc.io.errors import NbfuncInputError
from nbfunc.io.hkl import HKL_MAX_BYTES, HKLGrid, fdump_bytes, read_fdump, read_hkl, write_fdump

GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "golden"
PU01_HKL = GOLDEN / "pu01_mosflm_hkl_nointerpolate_default_fill_xbeam" / "P1_pu01.hkl"
PU14_HKL = GOLDEN / "pu14_mat_hkl_nearest" / "P1_pu14.hkl"
needs_golden = pytest.mark.skipif(not PU01_HKL.exists(), reason=f"no golden cases at {GOLDEN}")


def write(tmp_path, text, name="in.hkl"):
    path = tmp_path / name
    path.write_text(text)
    return path


class TestReadHkl:
    def test_grid_ranges_default_fill_and_values(self, tmp_path):
        path = write(tmp_path, "-1 0 0 10.5\n\n0 0 0 3\n  1 0 2 7.25\n")
        grid = read_hkl(path, default_F=2.0)
        assert (grid.h_min, grid.k_min, grid.l_min) == (-1, 0, 0)
        assert grid.maxima == (1, 0, 2)
        assert grid.F.shape == (3, 1, 3) and grid.F.dtype == np.float64
        assert grid.count == 3 and grid.warnings == ()
        assert grid.F[0, 0, 0] == 10.5 and grid.F[1, 0, 0] == 3.0 and grid.F[2, 0, 2] == 7.25
        assert grid.F[2, 0, 1] == 2.0 and grid.F[0, 0, 2] == 2.0

    def test_later_duplicate_wins(self, tmp_path):
        grid = read_hkl(write(tmp_path, "0 0 0 1\n0 0 1 5\n0 0 0 9\n"), default_F=0.0)
        assert grid.F[0, 0, 0] == 9.0 and grid.count == 3

    def test_non_integer_index_warns_like_c(self, tmp_path):
        grid = read_hkl(write(tmp_path, "0 0 0 1\n1.5 0 0 2\n0 0.7 0 3\n"), default_F=0.0)
        assert len(grid.warnings) == 2
        assert "line 2: non-integer value for h (1.5)" in grid.warnings[0]
        assert "in.hkl" in grid.warnings[0]
        assert "non-integer value for k (0.7)" in grid.warnings[1]
        # the value is truncated toward zero, as C's double -> int conversion
        assert grid.maxima == (1, 0, 0) and grid.F[1, 0, 0] == 2.0

    def test_non_integer_warnings_in_file_order(self, tmp_path):
        grid = read_hkl(write(tmp_path, "\n-1.5 0 2.7 1\n\n0 -0.7 0 3\n"), default_F=0.0)
        assert [w.split(": ", 3)[3] for w in grid.warnings] == [
            "non-integer value for h (-1.5), stored at index -1",
            "non-integer value for l (2.7), stored at index 2",
            "non-integer value for k (-0.7), stored at index 0"]
        assert [w.split(": ")[2] for w in grid.warnings] == ["line 2", "line 2", "line 4"]

    def test_memory_per_line_is_bounded(self, tmp_path):
        """Entries are held as flat arrays: about 120 bytes a line at the peak, where Python
        tuples took about 360, so a file near HKL_MAX_BYTES (1 GiB) needed some 40 GB."""
        import tracemalloc

        lines = 10_000
        path = write(tmp_path, "".join(f"{i % 7} {i % 5} {i % 3} {i}.5\n" for i in range(lines)))
        tracemalloc.start()
        try:
            read_hkl(path, default_F=0.0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 200 * lines, peak / lines

    @needs_golden
    def test_golden_hkl_file(self):
        grid = read_hkl(PU01_HKL, default_F=12.0)
        assert grid.count == 1779  # the C program printed "1779 initialized hkls"
        assert (grid.h_min, grid.k_min, grid.l_min) == (-6, -6, -6)
        assert grid.F[0, 0, 1] == 5.69  # first line: -6 -6 -5 5.69
        assert (grid.F == 12.0).sum() == grid.F.size - 1779

    @pytest.mark.parametrize(
        "text, expected",
        [
            ("0 0 0 1\n1 2 3\n", "line 2: found 3 values"),
            ("0 0 0 1 5\n", "line 1: found 5 values"),
            ("0 0 0 1\n1 x 3 4\n", "line 2: k is 'x'"),
            ("0 0 0 nan\n", "line 1: F is 'nan'"),
            ("0 0 0 1_0\n", "line 1: F is '1_0'"),
            ("\n\n   \n", "no 'h k l F' lines"),
            ("", "no 'h k l F' lines"),
            ("0 0 0 1\n100000 100000 100000 1\n", "100001x100001x100001 grid"),
            ("\x00\x7f\x03 garbage ;; \n", r"binary data \(a NUL byte at offset 0\)"),
            ("\x7f\x03 garbage ;; \n", "line 1: found 3 values"),
            ("0 0 0 1\n99999999999 0 0 2\n", r"line 2: h is '99999999999', expected a Miller index"),
            ("0 0 0 1\n0 0 -1e20 2\n", "line 2: l is '-1e20', expected a Miller index within"),
        ],
    )
    def test_bad_files(self, tmp_path, text, expected):
        path = write(tmp_path, text)
        with pytest.raises(NbfuncInputError, match=expected) as info:
            read_hkl(path, default_F=0.0)
        assert str(path) in str(info.value)

    def test_missing_file(self, tmp_path):
        with pytest.raises(NbfuncInputError, match="nope.hkl"):
            read_hkl(tmp_path / "nope.hkl", default_F=0.0)

    def test_larger_than_limit_is_refused_before_reading(self, tmp_path):
        path = tmp_path / "huge.hkl"
        with open(path, "wb") as handle:
            handle.truncate(HKL_MAX_BYTES + 1)  # sparse: no data is written or read
        with pytest.raises(NbfuncInputError, match="huge.hkl: holds more than 1 GiB"):
            read_hkl(path, default_F=0.0)

    def test_endless_device_stops_at_once(self):
        with pytest.raises(NbfuncInputError, match="/dev/zero: holds binary data"):
            read_hkl("/dev/zero", default_F=0.0)


class TestFdump:
    def test_round_trip(self, tmp_path):
        F = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4) + 0.5
        grid = HKLGrid(F, -1, 0, 3, 5)
        write_fdump(tmp_path / "Fdump.bin", grid)
        back = read_fdump(tmp_path / "Fdump.bin")
        np.testing.assert_array_equal(back.F, F)
        assert (back.h_min, back.k_min, back.l_min, back.count) == (-1, 0, 3, 24)

    def test_byte_layout(self):
        F = np.array([[[1.0, 2.0]]])  # h 5..5, k -2..-2, l 0..1
        raw = fdump_bytes(HKLGrid(F, 5, -2, 0, 2))
        header = b"5 5 -2 -2 0 1\n\f"
        assert raw.startswith(header)
        body = np.frombuffer(raw[len(header):], "<f8").reshape(2, 2, 3)
        np.testing.assert_array_equal(body[0, 0], [1.0, 2.0, 0.0])
        assert (body[1] == 0).all() and (body[:, 1] == 0).all()

    @needs_golden
    @pytest.mark.parametrize(
        "path, default_F, digest",
        [
            # sha256 of the Fdump.bin the C program wrote after reading these files
            (PU01_HKL, 12.0, "38a3a365d93a88c5f644e5571df7adab56ac58b0437736dcb7574f05a47a65ea"),
            (PU14_HKL, 0.0, "150e3cac7e0eae0ce96e1c257f60019032bdc9b8f666fd6afa84295668fad9b5"),
        ],
    )
    def test_matches_c_program_dump(self, path, default_F, digest):
        assert hashlib.sha256(fdump_bytes(read_hkl(path, default_F))).hexdigest() == digest

    @pytest.mark.parametrize(
        "raw, expected",
        [
            (b"", "is not 'h_min h_max"),
            (b"garbage\x00\x01", "is not 'h_min h_max"),
            (b"0 0 0 0 0\n\f", "is not 'h_min h_max"),
            (b"1 0 0 0 0 0\n\f" + bytes(8), "are empty"),
            (b"0 0 0 0 0 1\n\f" + bytes(8 * 7), "found 56 bytes of data, expected 96"),
            (b"0 0 0 0 0 1\n\f" + bytes(8 * 13), "found more than 96 bytes of data"),
            (b"0 999 0 999 0 999\n\f", "1000x1000x1000 grid, expected at most"),
            (b"0 0 0 0 0 1\n\f" + np.array([1, np.nan] + [0] * 10, "<f8").tobytes(),
             r"holds 1 non-finite amplitude \(the first, nan, at h k l = 0 0 1\)"),
            (b"-1 0 0 0 0 0\n\f" + np.array([np.inf, 2, 3, -np.inf] + [0] * 8, "<f8").tobytes(),
             r"holds 2 non-finite amplitudes \(the first, inf, at h k l = -1 0 0\)"),
        ],
    )
    def test_bad_files(self, tmp_path, raw, expected):
        path = tmp_path / "Fdump.bin"
        path.write_bytes(raw)
        with pytest.raises(NbfuncInputError, match=expected) as info:
            read_fdump(path)
        assert "Fdump.bin" in str(info.value)

    def test_missing_file(self, tmp_path):
        with pytest.raises(NbfuncInputError, match="Fdump.bin"):
            read_fdump(tmp_path / "Fdump.bin")

    def test_folder(self, tmp_path):
        (tmp_path / "Fdump.bin").mkdir()
        with pytest.raises(NbfuncInputError, match="Fdump.bin: is a folder, expected a file"):
            read_fdump(tmp_path / "Fdump.bin")

    def test_endless_device_stops_at_the_header(self):
        with pytest.raises(NbfuncInputError, match="/dev/zero: header"):
            read_fdump("/dev/zero")

    def test_unwritable_path(self, tmp_path):
        grid = HKLGrid(np.zeros((1, 1, 1)), 0, 0, 0, 1)
        with pytest.raises(NbfuncInputError, match="missing_dir"):
            write_fdump(tmp_path / "missing_dir" / "Fdump.bin", grid)


def test_a_file_too_large_for_memory_is_refused_with_the_figure(tmp_path):
    from nbfunc.io.hkl import HKL_MEMORY_PER_BYTE, _check_memory

    _check_memory(tmp_path / "p1.hkl", 1000, memory=1000 * HKL_MEMORY_PER_BYTE)
    with pytest.raises(NbfuncInputError) as info:
        _check_memory(tmp_path / "p1.hkl", 10**9, memory=8 * 10**9)
    assert str(info.value) == (f"{tmp_path / 'p1.hkl'}: 1000 MB of text need about 16.0 GB to "
                               "read, more than the 8.0 GB of memory here; give a smaller file "
                               "(only the reflections the image needs)")
