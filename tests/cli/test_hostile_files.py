"""Hostile input to the command line: extreme flag values, huge, binary or endless input files,
devices and FIFOs, and an unusable Fdump.bin.

Each refusal is one line ``nbfunc: error: ...`` under 300 characters on stderr that names the
flag or file, with status 2, no traceback, no numpy warning and no file written. Reads from
devices and FIFOs run under an alarm, so a read without limit fails the test instead of
hanging it.
"""
import contextlib
import os
import re
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest

from nbfunc.cli import main
from nbfunc.cli.derive import derive
from nbfunc.cli.flags import HANDLERS, Attenuation, Cell, FlagError, Misset, Numbers
from nbfunc.io.errors import NbfuncInputError

CELL = ["-cell", "50", "50", "50", "90", "90", "90"]
BASE = ["-default_F", "100", "-N", "2", "-detpixels", "4", "-oversample", "1", "-seed", "1",
        "-noprogress"]


def refuse(argv, folder, capsys, *needles):
    """Run ``argv`` in ``folder``; assert status 2, one short stderr line holding every needle,
    no numpy warning and nothing written."""
    before = set(os.listdir(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would fail the run
        status = main.run(list(argv))
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert status == 2, captured.err
    assert len(lines) == 1 and len(lines[0]) < 300, captured.err
    assert lines[0].startswith("nbfunc: error: ") and "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert set(os.listdir(folder)) == before
    return lines[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------------------------
# extreme values: the message names the flag that caused them
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["-cell", "1e308", "50", "50", "90", "90", "90"] + BASE, ["-cell", "1e+308", "Angstrom"]),
    (["-cell", "1e-120", "50", "50", "90", "90", "90"] + BASE, ["-cell", "a*b*c"]),
    (CELL + BASE + ["-pixel", "1e308"], ["-pixel", "mm wide"]),
    (CELL + ["-default_F", "100", "-detsize", "1e308"], ["-detsize", "mm wide"]),
    (CELL + BASE + ["-samplesize", "1e308"], ["-samplesize", "unit cells along x"]),
    (CELL + BASE + ["-xtal_thick", "1e300"], ["-xtal_x", "unit cells along x"]),
    (CELL + BASE + ["-flux", "1e308"], ["-flux", "overflows"]),
    (CELL + BASE + ["-divergence", "1e308"], ["-divergence", "mrad"]),
    (CELL + ["-default_F", "100", "-detsize", "1e100", "-pixel", "1e-100"],
     ["-detpixels/-detsize", "C int"]),
    (CELL + BASE + ["-detector_abs", "1e-308"], ["-detector_abs", "overflows"]),
    (CELL + BASE + ["-detector_thick", "1e-308"], ["-detector_thick", "overflows"]),
    (CELL + BASE + ["-beam_vector", "0", "1", "1"], ["-beam_vector", "never reaches"]),
    (CELL + BASE + ["-distance", "1e-308"], ["-distance", "1e-308 mm from the sample"]),
    (CELL + BASE + ["-distance", "1e-150", "-oversample", "0"], ["-oversample", "-distance"]),
])
def test_extreme_values_name_the_flag(argv, needles, workdir, capsys):
    refuse(argv, workdir, capsys, *needles)


# --------------------------------------------------------------------------------------------
# every numeric flag with extreme values: a derivation or a one-line error
# --------------------------------------------------------------------------------------------
EXTREMES = ("0", "-0", "nan", "inf", "-inf", "1e308", "-1e308", "1e-308",
            "99999999999999999999")


def _numeric_flags():
    for h in HANDLERS:
        if isinstance(h.values, Numbers):
            yield h.name, h.values.count
        elif isinstance(h.values, Cell):
            yield h.name, 6
        elif isinstance(h.values, Misset):
            yield h.name, 3
        elif isinstance(h.values, Attenuation):
            yield h.name, 1


@pytest.mark.parametrize("flag, count", list(_numeric_flags()))
def test_every_numeric_flag_with_extreme_values(flag, count, tmp_path):
    for value in EXTREMES:
        for values in ([value] * count, [value] + ["1"] * (count - 1)):
            argv = CELL + BASE + [flag] + values
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                try:
                    derive(argv, cwd=str(tmp_path))
                except (FlagError, NbfuncInputError) as err:
                    line = str(err)
                    assert "\n" not in line and len(line) < 280, (argv, line)
                    assert re.search(r"(^|[\s/(])-[A-Za-z]", line), line  # names a flag


# --------------------------------------------------------------------------------------------
# files: huge indices, damaged Fdump.bin, a folder where Fdump.bin would be read
# --------------------------------------------------------------------------------------------
def test_huge_hkl_index_names_the_file(workdir, capsys):
    (workdir / "big.hkl").write_text("1 2 3 100\n100000000000000000000 0 0 5\n")
    refuse(CELL + BASE + ["-hkl", "big.hkl"], workdir, capsys,
           "-hkl big.hkl: line 2: h is '100000000000000000000'", "Miller index")


@pytest.mark.parametrize("name, text, flag, needles", [
    ("big.mat", "1e308 0 0\n0 1e308 0\n0 0 1e308\n", "-mat", ["-mat big.mat", "determinant"]),
    ("tiny.mat", "1e-100 0 0\n0 1e-100 0\n0 0 1e-100\n", "-mat", ["-mat tiny.mat"]),
    ("src.txt", "-10 0 0 1 1e308\n", "-sourcefile", ["-sourcefile src.txt", "column 5"]),
    ("src.txt", "1e308 0 0 1 1e-10\n", "-sourcefile", ["-sourcefile src.txt", "column 1"]),
    ("F.hkl", "0 0 0 1\n1 1 1 1e308\n", "-hkl", ["F^2"]),
])
def test_extreme_file_values(name, text, flag, needles, workdir, capsys):
    (workdir / name).write_text(text)
    argv = (CELL if flag != "-mat" else []) + BASE + [flag, name]
    refuse(argv, workdir, capsys, *needles)


def _fdump(folder: Path, values) -> None:
    data = np.asarray(values, "<f8")  # a 1x1x1 grid and its padding: 2x2x2 doubles
    (folder / "Fdump.bin").write_bytes(b"0 0 0 0 0 0\n\f" + data.tobytes())


def test_nan_in_fdump_names_the_file(workdir, capsys):
    _fdump(workdir, [np.nan] + [0.0] * 7)
    line = refuse(CELL + BASE, workdir, capsys, "Fdump.bin", "non-finite", "h k l = 0 0 0",
                  "-hkl")
    assert "-cell" not in line


def test_large_fdump_with_nan_gives_a_short_line(workdir, capsys):
    F = np.full((40, 40, 40), 7.0)
    F[3, 4, 5] = np.nan
    (workdir / "Fdump.bin").write_bytes(b"0 39 0 39 0 39\n\f" + np.pad(F, (0, 1)).astype("<f8")
                                        .tobytes())
    refuse(CELL + BASE, workdir, capsys, "Fdump.bin", "h k l = 3 4 5")


def test_fdump_folder_warns_and_uses_default_F(workdir, capsys):
    (workdir / "Fdump.bin").mkdir()
    status = main.run(CELL + BASE + ["-floatfile", "f.bin", "-nonoise", "-nopgm"])
    out = capsys.readouterr().out
    assert status == 0
    assert "WARNING: Fdump.bin is a folder: ignoring it and using -default_F 100" in out
    image = np.fromfile(workdir / "f.bin", "<f4")
    assert image.size == 16 and np.isfinite(image).all() and (image > 0).all()


def test_fdump_folder_without_default_F_is_refused(workdir, capsys):
    (workdir / "Fdump.bin").mkdir()
    argv = CELL + ["-N", "2", "-detpixels", "4", "-noprogress"]
    refuse(argv, workdir, capsys, "Fdump.bin", "is a folder", "-default_F")


def test_fdump_broken_link_counts_as_unreadable(workdir, capsys):
    (workdir / "Fdump.bin").symlink_to(workdir / "gone")
    refuse(CELL + ["-N", "2", "-detpixels", "4"], workdir, capsys, "Fdump.bin in the working directory is a broken link")


# --------------------------------------------------------------------------------------------
# devices and FIFOs: the read stops at once (an alarm fails the test instead of a hang)
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def stops_within(seconds: int):
    """Fail the test when the block runs longer than ``seconds`` (SIGALRM, main thread)."""
    def expire(signum, frame):
        raise AssertionError(f"still reading after {seconds} s: the input has no limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("flag, needles", [
    ("-hkl", ["-hkl /dev/zero", "binary data"]),
    ("-mat", ["-mat /dev/zero", "binary data"]),
    ("-sourcefile", ["-sourcefile /dev/zero", "binary data"]),
    ("-img", ["-img /dev/zero", "expected an SMV header"]),
])
def test_dev_zero_input_stops_at_once(flag, needles, workdir, capsys):
    with stops_within(30):
        refuse(CELL + BASE + [flag, "/dev/zero"], workdir, capsys, *needles)


def test_dev_zero_as_fdump_stops_at_once(workdir, capsys):
    (workdir / "Fdump.bin").symlink_to("/dev/zero")
    with stops_within(30):
        refuse(CELL + BASE, workdir, capsys, "Fdump.bin: header")


def test_fifo_without_writer_as_hkl_does_not_wait(workdir, capsys):
    os.mkfifo(workdir / "in.hkl")
    with stops_within(30):
        refuse(CELL + BASE + ["-hkl", "in.hkl"], workdir, capsys, "-hkl in.hkl", "no 'h k l F' lines")
