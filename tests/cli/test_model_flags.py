"""The command-line flags of the diffBragg models: ``-gauss_hkl_xtal``, ``-Ndef``, ``-G``,
``-spectrum``, ``-bandwidth`` and ``-bandwidth_steps`` (docs/cli.md).

They reach the tree's leaves, ``-params_out`` saves them, bad values and conflicting flags are
refused in one line, and without them the tree and the header are what they were. Every run is
a 16 x 16 (or smaller) detector.
"""

import numpy as np
import pytest
import torch

import nbfunc
from _cli_support import refuse, run_cli
from nbfunc import Params
from nbfunc.cli.cflags import CFlags
from nbfunc.cli.derive import BANDWIDTH_STEPS, derive
from nbfunc.cli.flags import parse_flags, triggered
from nbfunc.io.spectrum import gaussian_spectrum, save_spectrum

D = torch.float64
BASE = ("-cell 50 60 70 85 95 100 -misset 10 -20 30 -default_F 100 -N 5 -lambda 1 "
        "-distance 50 -pixel 0.5 -detpixels 8 -oversample 1 -noprogress").split()
SPECTRUM = ([0.98, 1.0, 1.03], [1.0, 3.0, 2.0])
MODEL_FLAGS = ("-gauss_hkl_xtal", "-Ndef", "-G", "-spectrum", "-bandwidth", "-bandwidth_steps")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working directory holding a spectrum file s.lam and a source file s.src."""
    save_spectrum(tmp_path / "s.lam", *SPECTRUM)
    (tmp_path / "s.src").write_text("-10 0 0 1 1e-10\n-10 0 0 1 1.01e-10\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tree(extra: str = "") -> Params:
    return derive(BASE + extra.split())[0]


# --------------------------------------------------------------------------------------------
# parsing and the tree's leaves
# --------------------------------------------------------------------------------------------
class TestParsing:
    def test_flags_set_their_variables(self):
        cf = parse_flags("-gauss_hkl_xtal -Ndef 0.5 -0.25 1e-1 -G 2.5 -spectrum a.lam".split())
        assert (cf.xtal_shape, cf.Ncells_def, cf.G, cf.spectrum_file) == (
            "GAUSS_HKL", (0.5, -0.25, 0.1), 2.5, "a.lam")
        cf = parse_flags("-bandwidth 1.5 -bandwidth_steps 9".split())
        assert (cf.bandwidth, cf.bandwidth_steps) == (0.015, 9)

    def test_defaults_leave_the_c_programs_model(self):
        cf = CFlags()
        assert (cf.Ncells_def, cf.G, cf.spectrum_file, cf.bandwidth) == ((0.0, 0.0, 0.0), 1.0, None, -1.0)

    @pytest.mark.parametrize("flag", MODEL_FLAGS)
    def test_exact_names_that_no_c_flag_matches(self, flag):
        assert [h.name for h in triggered(flag)] == [flag]
        assert triggered(flag + "x") == ()

    def test_ncells_def_would_be_read_as_nc_by_nanobragg(self):
        """Why the flag is -Ndef: nanoBragg runs its -Nc handler for any name containing -Nc."""
        assert [h.name for h in triggered("-Ncells_def")] == ["-Nc"]

    def test_last_shape_flag_wins(self):
        assert parse_flags(["-gauss_hkl_xtal", "-gauss_xtal"]).xtal_shape == "GAUSS"
        assert parse_flags(["-square_xtal", "-gauss_hkl_xtal"]).xtal_shape == "GAUSS_HKL"


class TestTree:
    def test_shape_size_terms_and_scale_reach_the_leaves(self, workdir):
        cr = tree("-gauss_hkl_xtal -Ndef 0.5 -0.3 0.2 -G 2").crystal
        assert cr.shape == "gauss_hkl" and float(cr.G) == 2.0
        assert torch.equal(cr.Ncells_def, torch.tensor([0.5, -0.3, 0.2], dtype=D))
        assert tree("-gauss_xtal -Ndef 0.5 -0.3 0.2").crystal.shape == "gauss"

    def test_size_terms_with_the_c_programs_gaussian_warn(self, workdir):
        hybrid = derive(BASE + "-gauss_xtal -Ndef 0.5 0 0".split())[1].warnings
        assert any("-Ndef with -gauss_xtal" in w and "-gauss_hkl_xtal" in w for w in hybrid)
        for extra in ("-gauss_hkl_xtal -Ndef 0.5 0 0", "-gauss_xtal -Ndef 0 0 0"):
            assert not any("-Ndef" in w for w in derive(BASE + extra.split())[1].warnings), extra

    def test_unit_scale_and_zero_terms_give_the_tree_without_the_flags(self, workdir):
        assert tree("-gauss_xtal -G 1 -Ndef 0 0 0") == tree("-gauss_xtal")

    def test_g_doubles_the_image(self, workdir):
        with torch.compiler.set_stance("force_eager"):
            one = nbfunc.simulate(tree("-gauss_hkl_xtal -Ndef 0.5 -0.3 0.2"))
            two = nbfunc.simulate(tree("-gauss_hkl_xtal -Ndef 0.5 -0.3 0.2 -G 2"))
        assert one.max() > 0 and torch.equal(two, 2.0 * one)

    def test_spectrum_file_gives_one_source_per_channel_along_the_beam(self, workdir):
        sources = tree("-spectrum s.lam").beam.sources
        lam, w = (torch.tensor(x, dtype=D) for x in SPECTRUM)
        assert torch.equal(sources.wavelengths, lam)
        assert torch.allclose(sources.weights, w / w.mean(), rtol=1e-15)
        assert torch.equal(sources.directions, torch.tensor([[-1.0, 0.0, 0.0]] * 3, dtype=D))

    def test_spectrum_follows_the_beam_vector_of_the_convention(self, workdir):
        p = tree("-xds -spectrum s.lam")
        beam = torch.tensor(p.beam.beam_vector, dtype=D)
        assert torch.allclose(p.beam.sources.directions, -beam.expand(3, 3))

    @pytest.mark.parametrize("steps", [None, 5])
    def test_bandwidth_is_the_gaussian_spectrum(self, steps, workdir):
        extra = "-lambda 1.2 -bandwidth 2" + ("" if steps is None else f" -bandwidth_steps {steps}")
        sources = tree(extra).beam.sources
        lam, w = gaussian_spectrum(1.2, steps or BANDWIDTH_STEPS, fwhm=0.02)
        assert torch.allclose(sources.wavelengths, lam, rtol=1e-15)
        assert torch.equal(sources.weights, w)

    def test_zero_bandwidth_is_one_channel(self, workdir):
        sources = tree("-bandwidth 0 -bandwidth_steps 9").beam.sources
        assert sources.n_sources == 1 and float(sources.wavelengths[0]) == 1.0

    def test_header_keeps_the_c_programs_fields(self, workdir):
        plain = derive(BASE)[1].header
        for extra in ("-gauss_hkl_xtal -Ndef 0.5 -0.3 0.2 -G 3", "-spectrum s.lam", "-bandwidth 1"):
            assert derive(BASE + extra.split())[1].header == plain, extra


# --------------------------------------------------------------------------------------------
# the command line: -params_out carries the values, -params refuses the flags
# --------------------------------------------------------------------------------------------
def test_params_out_saves_the_leaves_and_renders_the_same_image(tmp_path):
    save_spectrum(tmp_path / "s.lam", *SPECTRUM)
    argv = BASE + "-gauss_hkl_xtal -Ndef 0.5 -0.3 0.2 -G 2 -spectrum s.lam".split()
    status, _, err = run_cli(argv + ["-floatfile", "a.bin", "-nonoise", "-nopgm",
                                     "-params_out", "t.json"], tmp_path)
    assert status == 0, err
    saved = Params.load(tmp_path / "t.json")
    cr, src = saved.crystal, saved.beam.sources
    assert cr.shape == "gauss_hkl" and float(cr.G) == 2.0
    assert torch.equal(cr.Ncells_def, torch.tensor([0.5, -0.3, 0.2], dtype=D))
    assert torch.equal(src.wavelengths, torch.tensor(SPECTRUM[0], dtype=D)) and src.n_sources == 3
    status, _, err = run_cli(["-params", "t.json", "-floatfile", "b.bin", "-nonoise", "-nopgm",
                              "-noprogress"], tmp_path)
    assert status == 0, err
    a = np.fromfile(tmp_path / "a.bin", dtype="<f4")
    assert a.max() > 0 and (tmp_path / "b.bin").read_bytes() == (tmp_path / "a.bin").read_bytes()


@pytest.mark.parametrize("flag", [["-G", "2"], ["-Ndef", "0", "0", "0"], ["-gauss_hkl_xtal"],
                                  ["-spectrum", "s.lam"], ["-bandwidth", "1"]])
def test_params_refuses_the_model_flags(flag, tmp_path):
    save_spectrum(tmp_path / "s.lam", *SPECTRUM)
    status, _, err = run_cli(BASE + ["-params_out", "t.json", "-nonoise", "-nopgm"], tmp_path)
    assert status == 0, err
    status, _, err = run_cli(["-params", "t.json"] + flag, tmp_path)
    assert status == 2 and err.count("\n") == 1
    assert f"{flag[0]} cannot be given with -params t.json" in err


# --------------------------------------------------------------------------------------------
# bad values and conflicts: status 2, one line naming the flag, nothing written
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needles", [
    ("-Ndef 1 2", ["-Ndef expects 3 numbers in cells (Nd Ne Nf)", "got only 2"]),
    ("-Ndef 1 x 2", ["-Ndef", "'x'"]),
    ("-Ndef 1 nan 2", ["-Ndef", "finite", "'nan'"]),
    ("-G 0", ["-G expects a scale factor greater than 0", "'0'"]),
    ("-G -2", ["-G", "greater than 0", "'-2'"]),
    ("-G inf", ["-G", "finite"]),
    ("-G", ["-G", "nothing follows it"]),
    ("-bandwidth -1", ["-bandwidth", "at least 0", "'-1'"]),
    ("-bandwidth 80", ["-bandwidth 80", "below 78.49 %"]),
    ("-bandwidth 1 -bandwidth_steps 0", ["-bandwidth_steps", "greater than 0"]),
    ("-bandwidth 1 -bandwidth_steps 2.5", ["-bandwidth_steps", "whole number"]),
    ("-spectrum", ["-spectrum", "a file name"]),
    ("-bandwidth 1 -bandwidth_steps 2000000000", ["-bandwidth_steps 2000000000", "of memory here"]),
])
def test_bad_values(extra, needles, workdir, capsys):
    refuse(BASE + extra.split(), workdir, capsys, *needles)


@pytest.mark.parametrize("extra, needles", [
    ("-Ndef 0.5 0 0", ["-Ndef:", "not 'square'", "-gauss_hkl_xtal", "[crystal.Ncells_def"]),
    ("-round_xtal -Ndef 0.5 0 0", ["-Ndef:", "not 'round'"]),
    ("-gauss_hkl_xtal -Ndef 5 0 0", ["-Ndef:", "not positive definite"]),
    ("-gauss_hkl_xtal -Ndef 4.5 4.5 -4.5", ["-Ndef:", "not positive definite"]),
])
def test_size_terms_the_tree_refuses(extra, needles, workdir, capsys):
    refuse(BASE + extra.split(), workdir, capsys, *needles)


@pytest.mark.parametrize("extra, needles", [
    ("-spectrum s.lam -sourcefile s.src", ["-spectrum with -sourcefile"]),
    ("-sourcefile s.src -spectrum s.lam", ["-spectrum with -sourcefile"]),
    ("-spectrum s.lam -dispersion 1", ["-spectrum with -dispersion"]),
    ("-spectrum s.lam -dispsteps 3", ["-spectrum with -dispsteps"]),
    ("-spectrum s.lam -bandwidth 1", ["-spectrum with -bandwidth"]),
    ("-bandwidth 1 -divergence 1", ["-bandwidth with -divergence"]),
    ("-bandwidth 1 -hdivrange 1", ["-bandwidth with -hdivrange"]),
    ("-bandwidth 1 -dispersion 0", ["-bandwidth with -dispersion"]),
    ("-bandwidth_steps 5", ["-bandwidth_steps without -bandwidth"]),
])
def test_conflicting_sources(extra, needles, workdir, capsys):
    refuse(BASE + extra.split(), workdir, capsys, *needles)


@pytest.mark.parametrize("text, needles", [
    (None, ["-spectrum missing.lam", "check the file path"]),
    ("# wavelengths, weights\n1.0,abc\n", ["-spectrum bad.lam", "line 2"]),
    ("# wavelengths, weights\n1.0,0\n", ["-spectrum bad.lam", "every one of the 1 weights is 0"]),
    ("# wavelengths, weights\n-1.0,1\n", ["-spectrum bad.lam", "wavelength -1 Angstrom"]),
])
def test_bad_spectrum_files(text, needles, workdir, capsys):
    name = "missing.lam"
    if text is not None:
        name = "bad.lam"
        (workdir / name).write_text(text)
    refuse(BASE + ["-spectrum", name], workdir, capsys, *needles)
