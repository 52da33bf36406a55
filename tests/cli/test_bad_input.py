"""Bad input to the command line: status 2, one line ``nbfunc: error: ...`` on stderr that names
the flag or file, what was received and what is expected, and no file written.

Each case runs `nbfunc.cli.main.run` in an empty working directory holding only the input files
the case names; afterwards that directory must hold nothing else (none of the C program's
default output names, no temporary file).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from nbfunc.cli import main
from nbfunc.cli.checks import tree_error
from nbfunc.cli.derive import derive
from nbfunc.params import Beam, Crystal, Detector, Params, Sampling, SourceGrid, SourceList

CELL = ["-cell", "50", "50", "50", "90", "90", "90"]
BASE = CELL + ["-default_F", "100", "-N", "2", "-detpixels", "4", "-oversample", "1",
               "-seed", "1", "-noprogress"]

INPUTS = {
    "good.hkl": "1 2 3 100\n-1 0 2 50\n",
    "empty.hkl": "",
    "garbage.hkl": "this is not an hkl file\n",
    "short.hkl": "1 2 3\n",
    "empty.mat": "",
    "garbage.mat": "x y z\n",
    "short.mat": "0.02 0 0\n0 0.02 0\n",
    "singular.mat": "0.02 0 0\n0.02 0 0\n0 0 0.02\n",
    "empty.src": "",
    "garbage.src": "a b c\n",
    "empty.img": "",
    "garbage.img": "garbage " * 20,
    "short.img": "{\nHEADER_BYTES=512;\nSIZE1=10;\nSIZE2=10;\n}",
}


def smv_bytes(extra: str, size: int = 4) -> bytes:
    """A small SMV image whose header holds ``extra`` (``KEY=VALUE;`` lines)."""
    head = ("{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=little_endian;\nTYPE=unsigned_short;\n"
            f"SIZE1={size};\nSIZE2={size};\n{extra}}}\f").encode().ljust(512, b" ")
    return head + np.ones(size * size, "<u2").tobytes()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory holding the input files above."""
    for name, text in INPUTS.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "zero_pixel.img").write_bytes(smv_bytes("PIXEL_SIZE=0;\n"))
    (tmp_path / "zero_wave.img").write_bytes(smv_bytes("WAVELENGTH=0;\n"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def refuse(argv, workdir, capsys, *needles):
    """Run ``argv``; assert status 2, one stderr line with every needle, nothing written."""
    before = set(os.listdir(workdir))
    status = main.run(list(argv))
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert status == 2
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("nbfunc: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in captured.err and "validation error" not in lines[0]
    assert set(os.listdir(workdir)) == before
    return lines[0]


# --------------------------------------------------------------------------------------------
# flags: unknown names, missing values, values that are not numbers
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needles", [
    (["-bogus", "1"], ["unknown flag '-bogus'"]),
    (["-distnace", "100"], ["unknown flag '-distnace'", "did you mean '-distance'"]),
    (["-distance"], ["-distance", "nothing follows it"]),
    (["-misset", "1", "2"], ["-misset", "got only 2"]),
    (["-hkl"], ["-hkl", "a file name"]),
    (["-distance", "abc"], ["-distance", "a length in mm", "'abc'"]),
    (["-lambda", "nan"], ["-lambda", "finite", "'nan'"]),
    (["-pixel", "inf"], ["-pixel", "finite", "'inf'"]),
    (["-N", "2.5"], ["-N", "whole number", "'2.5'"]),
    (["-roi", "0", "1", "x", "3"], ["-roi", "'x'"]),
    (["-N", "5", "6"], ["unexpected argument '6'"]),
])
def test_flag_errors(extra, needles, workdir, capsys):
    refuse(BASE + extra, workdir, capsys, *needles)


# --------------------------------------------------------------------------------------------
# values without physical meaning
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needles", [
    (["-distance", "0"], ["-distance", "greater than 0", "'0'"]),
    (["-distance", "-5"], ["-distance", "greater than 0", "'-5'"]),
    (["-close_distance", "-5"], ["-close_distance", "greater than 0"]),
    (["-pixel", "0"], ["-pixel", "greater than 0", "'0'"]),
    (["-pixel", "-0.1"], ["-pixel", "greater than 0"]),
    (["-lambda", "0"], ["-lambda", "a wavelength in Angstrom greater than 0", "'0'"]),
    (["-lambda", "-1"], ["-lambda", "greater than 0", "'-1'"]),
    (["-wave", "-1"], ["-wave", "greater than 0"]),
    (["-energy", "0"], ["-energy", "a photon energy in eV greater than 0"]),
    (["-energy", "-5"], ["-energy", "greater than 0", "'-5'"]),
    (["-detpixels", "0"], ["-detpixels", "pixel count greater than 0", "'0'"]),
    (["-detpixels", "-5"], ["-detpixels", "greater than 0", "'-5'"]),
    (["-detpixels_s", "0"], ["-detpixels_s", "greater than 0"]),
    (["-detsize", "0"], ["-detsize", "greater than 0"]),
    (["-dispersion", "-1"], ["-dispersion", "at least 0", "'-1'"]),
    (["-fluence", "-1"], ["-fluence", "at least 0"]),
    (["-flux", "-1e12"], ["-flux", "at least 0"]),
    (["-exposure", "-1"], ["-exposure", "at least 0"]),
    (["-beamsize", "-0.1"], ["-beamsize", "at least 0"]),
    (["-flux", "1e12", "-beamsize", "0"], ["-beamsize 0 with -flux", "infinite"]),
    (["-water", "-1"], ["-water", "at least 0"]),
    (["-mosaic", "-1"], ["-mosaic", "at least 0"]),
    (["-N", "-1"], ["-N", "at least 0", "'-1'"]),
    (["-Na", "-2"], ["-Na", "at least 0"]),
    (["-samplesize", "-1"], ["-samplesize", "at least 0"]),
    (["-detector_thick", "-10"], ["-detector_thick", "at least 0"]),
    (["-detector_abs", "-10"], ["-detector_abs", "negative"]),
    (["-divergence", "-1"], ["-divergence", "at least 0"]),
    (["-hdivstep", "-1"], ["-hdivstep", "at least 0"]),
    (["-osc", "-1"], ["-osc", "at least 0"]),
    (["-dmin", "-1"], ["-dmin", "at least 0"]),
    (["-fudge", "0"], ["-fudge", "greater than 0"]),
    (["-roi", "3", "1", "0", "3"], ["-roi 3 1 0 3", "xmin <= xmax"]),
])
def test_non_physical_values(extra, needles, workdir, capsys):
    refuse(BASE + extra, workdir, capsys, *needles)


@pytest.mark.parametrize("cell, needles", [
    (["50", "50", "50", "90", "90", "200"], ["-cell", "90 90 200", "enclose no volume"]),
    (["50", "50", "50", "10", "10", "170"], ["-cell", "10 10 170", "enclose no volume"]),
    (["10", "10", "10", "170", "10", "10"], ["-cell", "170 10 10"]),
    (["0", "50", "50", "90", "90", "90"], ["-cell", "edge a greater than 0", "got 0"]),
    (["-50", "50", "50", "90", "90", "90"], ["-cell", "'-50'"]),
])
def test_impossible_cells(cell, needles, workdir, capsys):
    refuse(["-cell", *cell, "-default_F", "100", "-detpixels", "4"], workdir, capsys, *needles)


@pytest.mark.parametrize("flag", ["-fdet_vector", "-sdet_vector", "-beam_vector", "-polar_vector",
                                  "-spindle_axis", "-twotheta_axis"])
def test_zero_length_axes(flag, workdir, capsys):
    refuse(BASE + [flag, "0", "0", "0"], workdir, capsys, f"{flag} 0 0 0", "zero-length")


def test_parallel_detector_axes(workdir, capsys):
    refuse(BASE + ["-fdet_vector", "0", "0", "1", "-sdet_vector", "0", "0", "2"], workdir, capsys,
           "-fdet_vector and -sdet_vector are parallel")


def test_zero_vector_replaced_by_a_named_convention_is_fine(workdir, capsys):
    """A named convention given later replaces every vector, as in C (a warning says so)."""
    assert main.run(BASE + ["-beam_vector", "0", "0", "0", "-mosflm"]) == 0
    assert "replaced by the MOSFLM convention" in capsys.readouterr().out


@pytest.mark.parametrize("c_meaning, same_as", [
    (["-oversample", "0"], ["-oversample", "-1"]),          # <= 0: automatic
    (["-N", "0"], ["-N", "1"]),                             # clamped to 1
    (["-cell", "50", "0", "50"], ["-cell", "50", "50", "50"]),  # b <= 0: b = a
    (["-cell", "50", "50", "50", "0", "0", "0"], ["-cell", "50", "50", "50", "90", "90", "90"]),
    (["-odet_vector", "0", "0", "0"], ["-odet_vector", "1", "0", "0"]),  # fdet x sdet
    (["-mosaic_dom", "-3"], ["-mosaic_dom", "0"]),          # auto
    (["-phisteps", "0"], ["-phisteps", "1"]),              # 0 steps: 1
])
def test_values_with_a_c_meaning_are_kept(c_meaning, same_as, workdir):
    """Where the C program gives a value a meaning (auto, clamp, default), nbfunc keeps it."""
    base = CELL + ["-default_F", "100", "-detpixels", "4"]
    assert derive(base + c_meaning)[0] == derive(base + same_as)[0]


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (BASE + ["-hkl", "missing.hkl"], ["-hkl missing.hkl", "No such file"]),
    (BASE + ["-hkl", "empty.hkl"], ["-hkl empty.hkl", "the file is empty"]),
    (BASE + ["-hkl", "garbage.hkl"], ["-hkl garbage.hkl", "line 1", "expected 4 numbers"]),
    (BASE + ["-hkl", "short.hkl"], ["-hkl short.hkl", "line 1", "found 3 values"]),
    (["-mat", "missing.mat", "-default_F", "1", "-detpixels", "4"], ["-mat missing.mat", "No such file"]),
    (["-mat", "empty.mat", "-default_F", "1", "-detpixels", "4"], ["-mat empty.mat", "expected 9"]),
    (["-mat", "garbage.mat", "-default_F", "1", "-detpixels", "4"], ["-mat garbage.mat", "'x'"]),
    (["-mat", "short.mat", "-default_F", "1", "-detpixels", "4"], ["-mat short.mat", "found 6 numbers"]),
    (["-mat", "singular.mat", "-default_F", "1", "-detpixels", "4"], ["-mat singular.mat", "singular"]),
    (BASE + ["-sourcefile", "missing.src"], ["-sourcefile missing.src", "No such file"]),
    (BASE + ["-sourcefile", "empty.src"], ["-sourcefile empty.src", "no data lines"]),
    (BASE + ["-sourcefile", "garbage.src"], ["-sourcefile garbage.src", "'a'"]),
    (BASE + ["-img", "missing.img"], ["-img missing.img", "No such file"]),
    (BASE + ["-img", "empty.img"], ["-img empty.img", "SMV header"]),
    (BASE + ["-img", "garbage.img"], ["-img garbage.img", "SMV header"]),
    (BASE + ["-img", "short.img"], ["-img short.img", "SMV header"]),
    (BASE + ["-mask", "missing.img"], ["-mask missing.img", "No such file"]),
    (BASE + ["-mask", "garbage.img"], ["-mask garbage.img", "SMV header"]),
    (CELL + ["-default_F", "1", "-img", "zero_pixel.img"], ["-img zero_pixel.img", "pixel size is 0 mm", "-pixel"]),
    (CELL + ["-default_F", "1", "-mask", "zero_wave.img"], ["-mask zero_wave.img", "wavelength is 0"]),
    (CELL + ["-detpixels", "4"], ["no structure factors", "-hkl", "-default_F"]),
    (["-default_F", "1", "-detpixels", "4"], ["no unit cell", "-cell", "-mat"]),
])
def test_bad_files(argv, needles, workdir, capsys):
    refuse(argv, workdir, capsys, *needles)


def test_garbage_fdump_left_in_the_working_directory(workdir, capsys):
    (workdir / "Fdump.bin").write_bytes(b"not a dump")
    refuse(CELL + ["-detpixels", "4", "-default_F", "1"], workdir, capsys, "Fdump.bin")


@pytest.mark.parametrize("flag", ["-floatfile", "-intfile", "-noisefile", "-pgmfile"])
def test_output_in_a_missing_folder(flag, workdir, capsys):
    refuse(BASE + [flag, "/nonexistent/dir/x.bin"], workdir, capsys, flag, "/nonexistent/dir",
           "does not exist")


def test_output_named_like_a_folder(workdir, capsys):
    (workdir / "sub").mkdir()
    refuse(BASE + ["-floatfile", "sub"], workdir, capsys, "-floatfile sub", "is a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_output_in_a_read_only_folder(workdir, capsys):
    (workdir / "ro").mkdir(mode=0o500)
    refuse(BASE + ["-intfile", "ro/x.img"], workdir, capsys, "-intfile ro/x.img", "not writable")


def test_no_flags_prints_usage_and_fails(workdir, capsys):
    assert main.run([]) == 2
    captured = capsys.readouterr()
    assert "usage: nbfunc" in captured.out
    assert captured.err.count("\n") == 1 and captured.err.startswith("nbfunc: error: no flags")


# --------------------------------------------------------------------------------------------
# validation errors of the parameter tree, as one line naming the flag
# --------------------------------------------------------------------------------------------
def test_tree_validation_error_names_the_flag(workdir, capsys):
    line = refuse(BASE + ["-polar", "2"], workdir, capsys, "-polar:", "got 2")
    assert "beam.kahn_factor" in line


def _validation_error(build) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        build()
    return caught.value


@pytest.mark.parametrize("build, flag, where", [
    (lambda: Detector(distance=100, beam_center_f=1, beam_center_s=1, pixel_size=-1, fpixels=4,
                      spixels=4), "-pixel:", "detector.pixel_size"),
    (lambda: Detector(distance=0, beam_center_f=1, beam_center_s=1, pixel_size=0.1, fpixels=4,
                      spixels=4), "-distance/-close_distance:", "detector.distance"),
    (lambda: Detector(distance=1, beam_center_f=1, beam_center_s=1, pixel_size=0.1, fpixels=0,
                      spixels=4), "-detpixels_f:", "detector.fpixels"),
    (lambda: Beam(wavelength=-1.0), "-lambda/-energy:", "beam.wavelength"),
    (lambda: Beam(wavelength=1.0, fluence=-1.0), "-fluence/-flux:", "beam.fluence"),
    (lambda: Crystal(cell_a=-5, cell_b=5, cell_c=5), "-cell:", "crystal.cell_a"),
    (lambda: Crystal(cell_a=5, cell_b=5, cell_c=5, cell_gamma=200), "-cell:", "crystal.cell_gamma"),
    (lambda: Crystal(cell_a=5, cell_b=5, cell_c=5, cell_alpha=10, cell_beta=10, cell_gamma=170),
     "-cell:", "[crystal in"),
    (lambda: Crystal(cell_a=5, cell_b=5, cell_c=5, water_size=-1.0), "-water:", "crystal.water_size"),
    (lambda: SourceGrid(hdiv_fracs=(0.0, 0.1), vdiv_fracs=(0.0,), disp_fracs=(0.0,)),
     "-divergence/-dispersion:", "[beam.sources.hdiv_fracs in"),
    (lambda: SourceList(directions=[[0.0, 0.0, 0.0]], wavelengths=[1.0]), "-sourcefile:",
     "[beam.sources.directions in"),
    (lambda: Params(beam=Beam(wavelength=1.0), crystal=Crystal(cell_a=5, cell_b=5, cell_c=5),
                    detector=Detector(distance=1, beam_center_f=1, beam_center_s=1,
                                      pixel_size=0.1, fpixels=4, spixels=4),
                    sampling=Sampling(roi=(3, 1, 0, 3))), "-roi:", "[sampling.roi in"),
])
def test_tree_error_maps_fields_to_flags(build, flag, where):
    line = str(tree_error(_validation_error(build), "-cell"))
    assert line.startswith(flag) and where in line, line
    assert "\n" not in line and "validation error" not in line and "Value error" not in line


def test_tree_error_names_the_matrix_file_for_the_cell():
    err = _validation_error(lambda: Crystal(cell_a=torch.tensor(-5.0), cell_b=5, cell_c=5))
    assert str(tree_error(err, "-mat A.mat")).startswith("-mat A.mat:")


# --------------------------------------------------------------------------------------------
# the installed command
# --------------------------------------------------------------------------------------------
def test_python_m_nbfunc_prints_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nbfunc", *BASE, "-distance", "abc"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(main.__file__).parents[2])})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["nbfunc: error: -distance expects a length in mm, got 'abc'"]
    assert proc.stdout == "" and os.listdir(tmp_path) == []


def test_out_of_memory_is_one_line(workdir, capsys, monkeypatch):
    def exhausted(params, info):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 1e15 bytes")

    monkeypatch.setattr(main, "_render", exhausted)
    refuse(BASE, workdir, capsys, "out of memory while rendering", "-chunk")


def test_other_runtime_errors_are_not_hidden(workdir, monkeypatch):
    """A failure that is not about the input is a bug: it keeps its traceback."""
    def broken(params, info):
        raise RuntimeError("a bug")

    monkeypatch.setattr(main, "_render", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main.run(BASE)


def test_empty_output_name(workdir, capsys):
    refuse(BASE + ["-intfile", ""], workdir, capsys, "-intfile ''", "expected a file name")


def test_detector_larger_than_a_c_int(workdir, capsys):
    refuse(BASE + ["-detpixels", "50000"], workdir, capsys, "50000x50000", "C int")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_torch_cannot_use(workdir, capsys):
    refuse(BASE + ["-device", "cuda"], workdir, capsys, "-device cuda", "use -device cpu")


def test_meta_device_is_refused_before_rendering(workdir, capsys):
    refuse(BASE + ["-device", "meta"], workdir, capsys, "-device meta", "meta device")


@pytest.mark.parametrize("flag", ["-floatfile", "-intfile", "-noisefile", "-pgmfile"])
def test_output_name_ending_in_a_slash(flag, workdir, capsys):
    """``new/`` names a folder (C's fopen fails); it must not become a file named ``new``."""
    refuse(BASE + [flag, "new/"], workdir, capsys, f"{flag} new/", "ends with '/'")


@pytest.mark.parametrize("flag", ["-stol", "-4stol", "-Q"])
@pytest.mark.parametrize("name, needles", [("missing.stol", ["No such file"]),
                                           ("empty.hkl", ["no data lines"]), (".", ["is a folder"])])
def test_unusable_amorphous_table_is_refused(flag, name, needles, workdir, capsys):
    """The table is unused, but C reads it and stops (exit 9) when it is missing or empty."""
    refuse(BASE + [flag, name], workdir, capsys, f"{flag} {name}", *needles)


def test_readable_amorphous_table_is_read_and_unused(workdir, capsys):
    (workdir / "water.stol").write_text("0.1 2.5\n0.2 nan\n")
    assert main.run(BASE + ["-stol", "water.stol", "-floatfile", "a.bin", "-nopgm",
                            "-nonoise"]) == 0
    assert "water.stol: nanoBragg reads this file but does not use it" in capsys.readouterr().out


@pytest.mark.parametrize("extra, needles", [
    (["-pixel", "1e-320"], ["SMV header", "543 bytes", "DIALS_ORIGIN="]),
    (["-pixel", "2147483648"], ["SMV header", "532 bytes"]),
])
def test_smv_header_beyond_its_512_bytes_is_refused_before_rendering(extra, needles, workdir,
                                                                      capsys):
    refuse(BASE + extra, workdir, capsys, *needles)


@pytest.mark.parametrize("extra", [["-default_F", "1e30"], ["-water", "1e30"],
                                   ["-fluence", "1e300"], ["-default_F", "1e23"]])
def test_pixels_beyond_the_float32_float_image_are_refused(extra, workdir, capsys):
    """Every pixel would be inf in C's float image (and numpy warned on stderr); nbfunc
    refuses before rendering, naming the bound."""
    refuse(BASE + extra, workdir, capsys, "photons", "float32 float image")


def test_a_sharp_lattice_peak_beyond_float32_is_not_refused(workdir):
    """-N 1e7 could put 1e40 photons on an exact Bragg peak, but C renders it (a peak pixel,
    if hit, becomes inf): only a bound off the peaks refuses a run."""
    assert main.run(BASE + ["-N", "10000000", "-floatfile", "a.bin"]) == 0


@pytest.mark.parametrize("argv, needles", [
    (["-hkl", "x" * 400], ["-hkl xxxxxxxx", "(401 characters)", "File name too long"]),
    (["-hkl", "long.hkl"], ["-hkl long.hkl: line 1: F is '1111", "(100003 characters)"]),
    (["-sourcefile", "long.src"], ["column 3 is 'zzzz", "(5003 characters)"]),
])
def test_long_names_and_values_are_clipped_in_messages(argv, needles, workdir, capsys):
    (workdir / "long.hkl").write_text("1 2 3 " + "1" * 100000 + "\n")
    (workdir / "long.src").write_text("0 0 " + "z" * 5000 + "\n")
    line = refuse(BASE + argv, workdir, capsys, *needles)
    assert len(line) < 300, len(line)


# --------------------------------------------------------------------------------------------
# sampling counts beyond memory: refused before any source or domain is generated
# --------------------------------------------------------------------------------------------
BILLIONS = "2000000000"  # a C int; 2e9 sources (about 1 TB) or orientations exceed any machine here


@pytest.mark.parametrize("extra, needles", [
    (["-hdivrange", "1", "-hdivsteps", BILLIONS], [f"-hdivsteps/-vdivsteps/-dispsteps {BILLIONS} x 1 x 1 = "]),
    (["-vdivrange", "1", "-vdivsteps", BILLIONS], [f"{BILLIONS} x 1 = {BILLIONS} sources need"]),
    (["-divergence", "1", "-divsteps", BILLIONS], [f"{BILLIONS} x {BILLIONS} x 1 = 4.00e+18 sources"]),
    (["-dispersion", "0.1", "-dispsteps", BILLIONS], [f"1 x 1 x {BILLIONS} = "]),
    (["-osc", "1", "-phisteps", BILLIONS], [f"-mosaic_dom 1 -phisteps {BILLIONS} needs", "fewer phi steps"]),
    (["-mosaic", "1", "-mosaic_dom", BILLIONS, "-osc", "1", "-phisteps", "3"],
     [f"-mosaic_dom {BILLIONS} -phisteps 3 needs", "fewer domains"]),
])
def test_sampling_counts_beyond_memory_are_refused_up_front(extra, needles, workdir, capsys):
    """Each count family names its flags, the memory it needs and what is here, and the
    largest count that fits; nothing is generated (the refusal takes no time)."""
    line = refuse(BASE + extra, workdir, capsys, *needles, " GB ", "GB of memory here", "at most about")
    assert len(line) < 300


@pytest.mark.parametrize("extra, flags", [
    (["-hdivrange", "1", "-hdivstep", "1e-320"], "-hdivrange/-hdivstep"),
    (["-vdivrange", "1", "-vdivstep", "1e-320"], "-vdivrange/-vdivstep"),
    (["-osc", "1", "-phistep", "1e-320"], "-osc/-phistep"),
])
def test_a_step_too_small_for_its_range(extra, flags, workdir, capsys):
    refuse(BASE + extra, workdir, capsys, f"{flags}: the range over the step overflows")


def test_mosaic_memory_is_checked_once_per_run(workdir, monkeypatch):
    """derive checks the mosaic's memory up front and hands the draws to the tree, whose
    validation checks only draws it makes itself (a Crystal built in Python)."""
    import nbfunc.cli.checks
    import nbfunc.crystal

    calls = []
    original = nbfunc.crystal.check_mosaic_memory
    counting = lambda *args: calls.append(args) or original(*args)
    monkeypatch.setattr(nbfunc.crystal, "check_mosaic_memory", counting)
    monkeypatch.setattr(nbfunc.cli.checks, "check_mosaic_memory", counting)
    p, _ = derive(BASE + ["-mosaic", "1", "-mosaic_dom", "7", "-phisteps", "2", "-osc", "1"])
    assert len(p.crystal.mosaic_axes) == 7 and calls == [(7, 2, 8, calls[0][3])]
    Crystal(cell_a=50, cell_b=50, cell_c=50, mosaic_spread=1, mosaic_domains=7, phisteps=2)
    assert len(calls) == 2 and calls[1][:3] == (7, 2, 8)
    with pytest.raises(ValidationError, match="-mosaic_dom 1000000000000 -phisteps 2 needs"):
        Crystal(cell_a=50, cell_b=50, cell_c=50, mosaic_spread=1, mosaic_domains=10**12, phisteps=2)


@pytest.mark.parametrize("extra, negative", [
    (["-twotheta", "180"], True),   # MOSFLM: pivot about the beam spot turns the detector over
    (["-twotheta", "120"], True),
    (["-twotheta", "60"], False),
    (["-twotheta", "180", "-xds"], False),  # pivot about the sample: a back-scattering detector
])
def test_a_detector_facing_away_renders_negative_with_a_warning(extra, negative):
    """As the C program does (the solid angle takes the sign of the close distance), pixels
    come out negative when the detector's normal points back at the sample; the run warns."""
    import nbfunc

    p, info = derive(BASE + ["-distance", "100", "-pixel", "0.1", "-lambda", "1"] + extra)
    image = nbfunc.simulate(p)
    facing = [w for w in info.warnings if "faces away from the sample" in w]
    assert bool((image < 0).all()) is negative and bool((image > 0).all()) is not negative
    assert len(facing) == int(negative)
    if negative:
        assert "close distance -" in facing[0] and "as in nanoBragg" in facing[0]
        assert len(facing[0]) < 300
