"""Tests for nbfunc.cli.flags: nanoBragg's argument loop, its quirks, and nbfunc's errors.

The golden cases (the C program's runs) check that every case's arguments parse and that the
values nbfunc reads agree with what the C program printed in its stdout.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from nbfunc.cli.cflags import CFlags, RTD
from nbfunc.cli.flags import (
    HANDLERS,
    FlagError,
    HelpRequested,
    c_atof,
    c_atoi,
    find_header_files,
    known_flags,
    parse_flags,
    triggered,
    usage,
)

GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "golden"
CASES = sorted(p for p in GOLDEN.glob("pu*") if (p / "args.json").exists())
needs_golden = pytest.mark.skipif(not CASES, reason=f"golden cases not found at {GOLDEN}")


def close(a, b, rel=2e-5, abs_=1e-12):
    return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=abs_)


# ---------------------------------------------------------------------------------------------
# golden cases


def _case_args(case: Path) -> dict:
    return json.loads((case / "args.json").read_text())


def _stdout_facts(text: str) -> dict:
    """The values the C program reports, from its stdout."""
    patterns = {
        "convention": r"^(\w+) convention selected\.",
        "pivot": r"^pivoting detector around (sample|direct beam spot)",
        "wave": r"wave=(\S+) meters \+/- (\S+)% in (\d+) steps",
        "kahn": r"Kahn polarization factor: (\S+)",
        "nopolar": r"(polarization effect disabled)",
        "curved": r"(curved detector:)",
        "point": r"(pixel obliquity effect disabled)",
        "fluence": r"incident fluence: (\S+) photons",
        "det": r"distance=(\S+) detsize=(\S+)x(\S+)  pixel=(\S+) meters \((\d+)x(\d+) pixels\)",
        "sensor": r"sensor is (\S+) m thick in (\d+) layers with mu= (\S+)",
        "xbeam": r"Xbeam=(\S+) Ybeam=(\S+)",
        "roi": r"roi: (-?\d+) < x < (-?\d+) && (-?\d+) < y < (-?\d+)",
        "hdiv": r"hdivrange=(\S+) hdivstep=(\S+)",
        "vdiv": r"vdivrange=(\S+) vdivstep=(\S+)",
        "mosaic": r"(\d+) mosaic domains over mosaic spread of (\S+) degrees",
        "phi": r"(\d+) phi steps from (\S+) to (\S+) degrees",
        "oversample": r"(\d+)x\d+ pixel oversample steps(.*)$",
        "seed": r"seed: (-?\d+)",
        "water": r"water droplet size: (\S+) m",
        "shape": r"(ellipsoidal|parallelpiped|gaussian|tophat-spot) xtal: (\d+)x(\d+)x(\d+) cells",
        "default_F": r"initialized hkls \(all others =(\S+)\)",
        "cell": r"^Unit Cell: (\S+) (\S+) (\S+) (\S+) (\S+) (\S+)",
        "mask": r"skipping zero-flagged pixels in (\S+)",
        "intfile_scale": r"^intfile_scale = (\S+)",
    }
    facts = {}
    for key, pat in patterns.items():
        m = re.search(pat, text, re.MULTILINE)
        if m:
            facts[key] = m.groups()
    return facts


def _effective_pivot(cf: CFlags) -> str:
    """The pivot the C program uses: named conventions force theirs after the argument loop."""
    if cf.beam_convention in ("MOSFLM", "DENZO", "ADXV"):
        return "BEAM"
    if cf.beam_convention in ("XDS", "DIALS"):
        return "SAMPLE"
    return cf.detector_pivot


def _check_against_stdout(cf: CFlags, facts: dict) -> None:
    assert facts["convention"][0] == cf.beam_convention.lower()
    assert {"sample": "SAMPLE", "direct beam spot": "BEAM"}[facts["pivot"][0]] == _effective_pivot(cf)

    wave, pct, steps = facts["wave"]
    assert close(wave, cf.lambda0)
    assert close(pct, cf.dispersion * 100)
    if cf.dispersion > 0 and cf.dispsteps > 0:
        assert int(steps) == cf.dispsteps

    if cf.nopolar:
        assert "nopolar" in facts
    else:
        assert close(facts["kahn"][0], cf.polarization, abs_=1e-6)
    assert ("curved" in facts) == cf.curved_detector
    assert ("point" in facts) == cf.point_pixel

    expected_fluence = cf.fluence
    if cf.flux != 0 and cf.exposure > 0 and cf.beamsize >= 0:
        expected_fluence = cf.flux * cf.exposure / cf.beamsize / cf.beamsize
    assert close(facts["fluence"][0], expected_fluence)

    distance, _, _, pixel, fpix, spix = facts["det"]
    assert close(pixel, cf.pixel_size)
    if cf.fpixels > 0:
        assert (int(fpix), int(spix)) == (cf.fpixels, cf.spixels)
    unrotated = cf.detector_rotx == cf.detector_roty == cf.detector_rotz == cf.detector_twotheta == 0
    if unrotated:
        assert close(distance, cf.distance if math.isnan(cf.close_distance) else cf.close_distance)

    thick, layers, mu = facts["sensor"]
    assert close(mu, cf.detector_mu)
    if cf.detector_thick > 0 and cf.detector_thicksteps > 0:
        assert close(thick, cf.detector_thick) and int(layers) == cf.detector_thicksteps

    if cf.beam_convention in ("MOSFLM", "DENZO", "ADXV") and not math.isnan(cf.Xbeam):
        assert close(facts["xbeam"][0], cf.Xbeam) and close(facts["xbeam"][1], cf.Ybeam)
    if cf.roi != (-1, -1, -1, -1):
        assert tuple(int(x) for x in facts["roi"]) == cf.roi
    if cf.hdivrange > 0:
        assert close(facts["hdiv"][0], cf.hdivrange)
    if cf.vdivrange > 0:
        assert close(facts["vdiv"][0], cf.vdivrange)
    if cf.mosaic_domains > 0 and cf.mosaic_spread > 0:
        assert int(facts["mosaic"][0]) == cf.mosaic_domains
        assert close(facts["mosaic"][1], cf.mosaic_spread * RTD)
    if cf.phisteps > 0:
        n, start, end = facts["phi"]
        assert int(n) == cf.phisteps and close(start, cf.phi0 * RTD, abs_=1e-9)
        assert close(end, (cf.phi0 + cf.osc) * RTD, abs_=1e-9)
    n, extra = facts["oversample"]
    if cf.oversample > 0:
        assert int(n) == cf.oversample
    assert ("+thick" in extra, "+polar" in extra, "+omega" in extra) == (
        cf.oversample_thick, cf.oversample_polar, cf.oversample_omega)
    if "seed" in facts:
        assert int(facts["seed"][0]) == cf.seed
    if "water" in facts:
        assert close(facts["water"][0], cf.water_size)

    shape, na, nb, nc = facts["shape"]
    assert {"ellipsoidal": "ROUND", "parallelpiped": "SQUARE", "gaussian": "GAUSS",
            "tophat-spot": "TOPHAT"}[shape] == cf.xtal_shape
    if cf.sample_x == cf.sample_y == cf.sample_z == 0:
        assert (int(na), int(nb), int(nc)) == (cf.Na, cf.Nb, cf.Nc)
    assert close(facts["default_F"][0], cf.default_F)
    if cf.user_cell and cf.alpha == cf.beta == cf.gamma == 90 / RTD:
        a, b, c = (float(x) for x in facts["cell"][:3])
        assert (a, b, c) == (cf.cell_a, cf.cell_b, cf.cell_c)
    if cf.mask_file is not None:
        assert facts["mask"][0] == cf.mask_file
    if cf.intfile_scale > 0:
        assert close(facts["intfile_scale"][0], cf.intfile_scale)


@needs_golden
@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name[:4])
def test_golden_args_parse_and_match_stdout(case):
    spec = _case_args(case)
    cf = parse_flags(spec["args"])
    _check_against_stdout(cf, _stdout_facts((case / "stdout.txt").read_text()))


@needs_golden
@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name[:4])
def test_golden_full_command_sets_outputs(case):
    spec = _case_args(case)
    tokens = spec["c_command"].split()
    argv = tokens[tokens.index("nanoBragg") + 1:]
    cf = parse_flags(argv)
    assert cf.float_file_given and cf.float_file == spec["outputs"]["floatfile"]
    assert cf.int_file_given == (spec["outputs"]["intfile"] is not None)
    assert cf.noise_file_given == (spec["outputs"]["noisefile"] is not None)
    assert cf.calculate_noise == ("-nonoise" not in argv)
    assert cf.write_pgm is False


@needs_golden
def test_golden_warnings_are_the_known_ignored_flags():
    by_case = {p.name[:4]: parse_flags(_case_args(p)["args"]).warnings for p in CASES}
    assert any("-pix0_vector" in w for w in by_case["pu06"])
    assert any(w.startswith("-pivot beam has no effect") for w in by_case["pu21"])
    # -twotheta given after -twotheta_axis: no warning about the axis setting the angle
    assert by_case["pu07"] == []
    quiet = [k for k, w in by_case.items() if k not in ("pu06", "pu21")]
    assert all(by_case[k] == [] for k in quiet)


@needs_golden
def test_find_header_files_golden_mask():
    spec = _case_args(GOLDEN / "pu03_adxv_energy_nopolar_mask")
    assert find_header_files(spec["args"]) == (None, "mask.img")


# ---------------------------------------------------------------------------------------------
# reading values like the C program


class TestValues:
    def test_defaults_are_c_defaults(self):
        cf = parse_flags([])
        assert cf == CFlags()
        assert cf.beam_vector == (1.0, 0.0, 0.0)  # C beam_vector[4] = {0,1,0,0}, index 0 unused
        assert cf.odet_vector == (1.0, 0.0, 0.0)
        assert cf.twotheta_axis == (0.0, 1.0, 0.0)

    def test_units_follow_c(self):
        cf = parse_flags([
            "-distance", "120", "-pixel", "0.172", "-lambda", "1.5", "-mosaic", "0.5", "-divergence", "2",
            "-dispersion", "3", "-water", "50", "-density", "1.2", "-detector_thick", "300", "-dmin", "2.5",
            "-Xbeam", "10", "-phi", "30", "-osc", "0.1", "-beamsize", "0.05", "-samplesize", "0.01",
        ])
        assert cf.distance == 120 / 1000.0 and cf.pixel_size == 0.172 / 1000.0
        assert cf.lambda0 == 1.5 / 1e10 and cf.mosaic_spread == 0.5 / RTD
        assert cf.hdivrange == cf.vdivrange == 2 / 1000.0 and cf.dispersion == 3 / 100.0
        assert cf.water_size == 50 / 1e6 and cf.density == 1.2 * 1e6
        assert cf.detector_thick == 300 * 1e-6 and cf.dmin == 2.5 * 1e-10
        assert cf.Xbeam == 0.01 and cf.phi0 == 30 / RTD and cf.osc == 0.1 / RTD
        assert cf.beamsize == 0.05 / 1000 and cf.sample_x == cf.sample_y == cf.sample_z == 0.01 / 1000

    def test_energy_converts_to_wavelength(self):
        assert parse_flags(["-energy", "12398.42"]).lambda0 == 1e-10
        assert parse_flags(["-energy", "8000"]).lambda0 == (12398.42 / 8000) / 1e10

    def test_negative_numbers_are_values(self):
        cf = parse_flags(["-detector_roty", "-5", "-misset", "-6", "9", "14", "-phi", "-10"])
        assert cf.detector_roty == -5 / RTD and cf.phi0 == -10 / RTD
        assert cf.misset_mode == 1.0 and cf.misset == (-6 / RTD, 9 / RTD, 14 / RTD)

    def test_misset_random(self):
        cf = parse_flags(["-misset", "random", "-N", "3"])
        assert cf.misset_mode == -1.0 and cf.Na == 3

    def test_seeds_are_stored_negated(self):
        cf = parse_flags(["-seed", "2468", "-mosaic_seed", "99", "-misset_seed", "7"])
        assert (cf.seed, cf.mosaic_seed, cf.misset_seed) == (-2468, -99, -7)

    def test_output_flags_record_names_and_switches(self):
        cf = parse_flags(["-floatimage", "f.bin", "-intfile", "i.img", "-noisefile", "n.img", "-nopgm"])
        assert (cf.float_file, cf.int_file, cf.noise_file) == ("f.bin", "i.img", "n.img")
        assert cf.float_file_given and cf.int_file_given and cf.noise_file_given and not cf.pgm_file_given
        assert cf.calculate_noise and not cf.write_pgm
        assert parse_flags(["-nopgm", "-pgmscale", "3"]).write_pgm
        assert not parse_flags(["-noisefile", "n.img", "-nonoise"]).calculate_noise

    def test_stol_multipliers(self):
        assert parse_flags(["-stol", "s"]).stol_file_mult == 1e10
        assert parse_flags(["-4stol", "s"]).stol_file_mult == 1e10 / 4
        assert parse_flags(["-Q", "s"]).stol_file_mult == 1e10 / math.pi / 4

    def test_nbfunc_extensions(self):
        cf = parse_flags(["-dtype", "float32", "-chunk", "4096", "-device", "cuda:0"])
        assert (cf.dtype, cf.chunk, cf.device) == ("float32", 4096, "cuda:0")
        assert (CFlags().dtype, CFlags().chunk, CFlags().device) == ("float64", 0, "cpu")

    def test_start_is_copied_not_changed(self):
        start = CFlags(distance=0.2, fpixels=100, warnings=["from header"])
        cf = parse_flags(["-pixel", "0.2", "-pix0_vector", "0", "0", "0"], start)
        assert cf.distance == 0.2 and cf.fpixels == 100 and cf.pixel_size == 0.0002
        assert cf.warnings[0] == "from header" and len(cf.warnings) == 2
        assert start.warnings == ["from header"] and start.pixel_size == 0.1e-3

    def test_find_header_files_last_wins(self):
        argv = ["-img", "a.img", "-mask", "m.img", "-img", "b.img", "-distance", "100"]
        assert find_header_files(argv) == ("b.img", "m.img")
        assert find_header_files(["-N", "1"]) == (None, None)
        cf = parse_flags(argv)
        assert (cf.img_file, cf.mask_file) == ("b.img", "m.img")

    def test_c_atof_atoi(self):
        assert c_atof("12.5mm") == 12.5 and c_atof("abc") == 0.0 and c_atof(" -3e2") == -300.0
        assert c_atof("0x10") == 16.0 and math.isinf(c_atof("inf"))
        assert c_atoi("2.5") == 2 and c_atoi("-7x") == -7 and c_atoi("x") == 0


# ---------------------------------------------------------------------------------------------
# the C parser's quirks, reproduced


class TestQuirks:
    def test_twotheta_axis_also_sets_twotheta_and_sample_pivot(self):
        cf = parse_flags(["-twotheta_axis", "0.6", "0", "-0.8"])
        assert cf.beam_convention == "CUSTOM" and cf.twotheta_axis == (0.6, 0.0, -0.8)
        assert cf.detector_twotheta == 0.6 / RTD and cf.detector_pivot == "SAMPLE"
        assert any("also sets the two-theta angle to 0.6 deg" in w for w in cf.warnings)

    def test_twotheta_after_twotheta_axis_wins_without_warning(self):
        cf = parse_flags(["-twotheta_axis", "0.6", "0", "-0.8", "-twotheta", "-8", "-pivot", "beam"])
        assert cf.detector_twotheta == -8 / RTD and cf.detector_pivot == "BEAM" and cf.warnings == []

    def test_misset_seed_is_also_read_as_misset(self):
        cf = parse_flags(["-misset_seed", "5", "-N", "2"])
        assert cf.misset_seed == -5 and cf.Na == cf.Nb == cf.Nc == 2
        # C: atof("5"), atof("-N") = 0, atof("2")
        assert cf.misset_mode == 1.0 and cf.misset == (5 / RTD, 0.0, 2 / RTD)
        assert any(w.startswith("-misset_seed also sets the crystal misset") for w in cf.warnings)
        alone = parse_flags(["-misset_seed", "5"])  # C's argc guard for the angles fails
        assert alone.misset_mode == 0.0 and alone.warnings == []

    def test_cell_stops_at_an_argument_starting_with_dash(self):
        cf = parse_flags(["-cell", "50", "60", "70", "-N", "3"])
        assert cf.user_cell and (cf.cell_a, cf.cell_b, cf.cell_c) == (50, 60, 70)
        assert (cf.alpha, cf.beta, cf.gamma) == (0.0, 0.0, 0.0) and cf.Na == 3
        with pytest.raises(FlagError, match="-cell stops reading values"):
            parse_flags(["-cell", "50", "60", "-70", "90", "90", "90"])

    def test_N_is_an_exact_match(self):
        cf = parse_flags(["-N", "4", "-Nb", "7"])
        assert (cf.Na, cf.Nb, cf.Nc) == (4, 7, 4)
        with pytest.raises(FlagError, match="unknown flag '-Nx'"):
            parse_flags(["-Nx", "4"])

    def test_length_conditions(self):
        # -phi (4), -phistep (8), -polar (6), -detsize (8), -detpixels (10), -detector_thick (15)
        cf = parse_flags(["-phistep", "0.5", "-phisteps", "4", "-polar_vector", "0", "1", "0", "-polar", "0.8",
                          "-detsize_f", "30", "-detpixels_x", "100", "-detector_thicksteps", "5"])
        assert cf.phistep == 0.5 / RTD and cf.phisteps == 4 and cf.phi0 == 0.0
        assert cf.polarization == 0.8 and cf.polar_vector == (0.0, 1.0, 0.0)
        assert cf.detsize_f == 0.03 and cf.detsize_s == CFlags().detsize_s
        assert cf.fpixels == 100 and cf.spixels == 0
        assert cf.detector_thicksteps == 5 and cf.detector_thick == 0.0

    def test_detector_abs_inf_and_zero_disable_absorption(self):
        for value in ("inf", "0"):
            cf = parse_flags(["-detector_thick", "300", "-detector_abs", value])
            assert cf.detector_mu == 0.0 and cf.detector_thick == 0.0
        assert parse_flags(["-detector_absorb", "150"]).detector_mu == 1.0 / (150 * 1e-6)

    def test_conventions_and_vectors_set_pivot_and_custom(self):
        assert parse_flags(["-xds"]).detector_pivot == "SAMPLE"
        assert parse_flags(["-dials"]).detector_pivot == "BEAM"  # the C handler's value; DIALS forces SAMPLE later
        cf = parse_flags(["-pix0_vector", "0.1", "0.2", "0.3"])
        assert cf.beam_convention == "CUSTOM" and cf.pix0_given and cf.pix0_vector == (0.1, 0.2, 0.3)
        assert parse_flags(["-Xclose", "3"]).detector_pivot == "SAMPLE"
        assert parse_flags(["-close_distance", "3", "-distance", "4"]).detector_pivot == "BEAM"

    def test_oversample_switches_do_not_read_a_count(self):
        cf = parse_flags(["-oversample_thick", "-oversample", "3"])
        assert cf.oversample_thick and cf.oversample == 3

    def test_printout_pixel_also_turns_on_printout(self):
        cf = parse_flags(["-printout_pixel", "3", "4"])
        assert cf.printout and cf.printout_pixel == (3, 4) and cf.warnings == []

    def test_curved_det_needs_a_following_argument(self):
        assert parse_flags(["-curved_det", "-nopgm"]).curved_detector
        cf = parse_flags(["-curved_det"])
        assert not cf.curved_detector and "-curved_det is ignored" in cf.warnings[0]

    def test_substring_spellings_warn(self):
        cf = parse_flags(["-pixels", "512"])
        assert cf.pixel_size == 0.512
        assert cf.warnings == ["'-pixels' is not a nanoBragg flag name; nanoBragg matches by substring and reads"
                               " it as -pixel"]
        assert parse_flags(["--distance", "50"]).warnings == []


class TestWarnings:
    def test_pivot_under_named_convention(self):
        cf = parse_flags(["-mosflm", "-pivot", "sample"])
        assert cf.detector_pivot == "SAMPLE"  # kept as C's variable; MOSFLM forces BEAM later
        assert cf.warnings[0].startswith("-pivot sample has no effect: the MOSFLM convention")
        assert parse_flags(["-xds", "-pivot", "sample"]).warnings == []

    def test_pivot_overridden_by_a_later_flag(self):
        cf = parse_flags(["-fdet_vector", "1", "0", "0", "-pivot", "sample", "-distance", "100"])
        assert cf.detector_pivot == "BEAM"
        assert cf.warnings == ["-pivot sample is overridden by the later -distance, which sets the BEAM pivot;"
                               " put -pivot after it"]

    def test_beam_centre_flags_ignored_by_convention(self):
        assert "-Xbeam/-Ybeam has no effect under the XDS" in parse_flags(
            ["-xds", "-Xbeam", "3", "-Ybeam", "4"]).warnings[0]
        assert "-Xclose has no effect under the MOSFLM" in parse_flags(["-Xclose", "3"]).warnings[0]
        assert "-ORGX has no effect under the MOSFLM" in parse_flags(["-ORGX", "3"]).warnings[0]
        assert parse_flags(["-dials", "-ORGX", "3", "-ORGY", "4"]).warnings == []

    def test_vectors_replaced_by_a_later_convention(self):
        cf = parse_flags(["-fdet_vector", "1", "0", "0", "-mosflm"])
        assert cf.beam_convention == "MOSFLM"
        assert "-fdet_vector replaced by the MOSFLM convention's vectors" in cf.warnings[0]

    def test_unused_files_and_conflicting_switches(self):
        cf = parse_flags(["-stol", "a.stol", "-nopgm", "-pgmscale", "2", "-nopolar", "-polar", "0.5"])
        assert cf.write_pgm and not cf.nopolar
        assert len(cf.warnings) == 3


# ---------------------------------------------------------------------------------------------
# errors nbfunc raises where the C program ignores, reads 0, or crashes


class TestErrors:
    def test_unknown_flag_suggests_the_closest(self):
        with pytest.raises(FlagError, match=r"unknown flag '-distnace'; did you mean '-distance'\?"):
            parse_flags(["-distnace", "100"])
        for bad, good in (("-hdiv", "-hdivrange"), ("-vdiv", "-vdivrange"), ("-dispstep", "-dispsteps")):
            with pytest.raises(FlagError, match=f"did you mean '{good}'"):
                parse_flags([bad, "2"])

    def test_stray_argument(self):
        with pytest.raises(FlagError, match="unexpected argument '6' after -N, which takes 1 value"):
            parse_flags(["-N", "5", "6"])
        with pytest.raises(FlagError, match="unexpected argument 'foo'"):
            parse_flags(["foo"])

    def test_missing_value_at_end(self):
        with pytest.raises(FlagError, match="-distance expects a length in mm, but nothing follows it"):
            parse_flags(["-N", "2", "-distance"])
        with pytest.raises(FlagError, match=r"-misset expects 3 angles .* got only 2: '1' '2'"):
            parse_flags(["-misset", "1", "2"])

    def test_non_numeric(self):
        with pytest.raises(FlagError, match="-distance expects a length in mm, got 'abc'"):
            parse_flags(["-distance", "abc"])
        with pytest.raises(FlagError, match=r"-N expects a count \(a whole number\), got '2.5'"):
            parse_flags(["-N", "2.5"])
        with pytest.raises(FlagError, match="-hkl expects a file name, got the flag '-N'"):
            parse_flags(["-hkl", "-N", "5"])

    def test_nan(self):
        with pytest.raises(FlagError, match=r"-lambda expects a wavelength in Angstrom \(a finite value\), got 'nan'"):
            parse_flags(["-lambda", "nan"])

    def test_inf(self):
        with pytest.raises(FlagError, match=r"-detector_roty expects .*finite value.*'-inf'"):
            parse_flags(["-detector_roty", "-inf"])
        with pytest.raises(FlagError, match="finite"):
            parse_flags(["-distance", "1e999"])

    def test_bad_words(self):
        for argv in (["-pivot", "middle"], ["-dtype", "float16"], ["-chunk", "-1"], ["-energy", "0"]):
            with pytest.raises(FlagError, match=argv[0]):
                parse_flags(argv)

    def test_errors_are_one_line(self):
        with pytest.raises(FlagError) as info:
            parse_flags(["-detpixles", "100"])
        assert "\n" not in str(info.value)

    @pytest.mark.parametrize("flag", ["-h", "-help", "--help"])
    def test_help(self, flag):
        with pytest.raises(HelpRequested):
            parse_flags(["-distance", "100", flag])
        assert "-distance <mm>" in usage()


# ---------------------------------------------------------------------------------------------
# the handler table


class TestTable:
    def test_documented_spellings_trigger_only_known_handler_pairs(self):
        extra = {}
        for name in known_flags():
            names = [h.name for h in triggered(name)]
            assert any(name in h.names for h in triggered(name))
            if len(names) > 1:
                extra[name] = names
        assert extra == {
            "-width": ["-sample_width", "-xtal_width"],
            "-height": ["-sample_height", "-xtal_height"],
            "-twotheta_axis": ["-twotheta_axis", "-twotheta"],
            "-oversample_thick": ["-oversample_thick", "-oversample"],  # C continue: -oversample never runs
            "-oversample_polar": ["-oversample_polar", "-oversample"],
            "-oversample_omega": ["-oversample_omega", "-oversample"],
            "-printout_pixel": ["-printout", "-printout_pixel"],
            "-misset_seed": ["-misset", "-misset_seed"],
        }

    def test_extensions_do_not_collide_with_c_names(self):
        for h in HANDLERS:
            if h.nbfunc:
                assert [x.name for x in triggered(h.name)] == [h.name]

    def test_every_handler_writes_cflags_fields(self):
        fields = set(CFlags.__dataclass_fields__)
        for h in HANDLERS:
            args = ["beam"] if h.name == "-pivot" else ["1"] * 6
            updates = h.apply(h.values.c_read(args))
            assert updates and set(updates) <= fields, h.name


def _c_source_loop(round_div, hdiv, vdiv, disp):
    """The C program's source loops, one source at a time: (hdiv, vdiv, disp) fractions."""
    (hsteps, hrange, hstep), (vsteps, vrange, vstep), (dsteps, drange, dstep) = hdiv, vdiv, disp
    out = []
    for ht in range(hsteps):
        for vt in range(vsteps):
            h, v = hstep * ht - hrange / 2.0, vstep * vt - vrange / 2.0
            with np.errstate(all="ignore"):
                test = np.float64(h * h - hstep * hstep / 4.0 * (1 - hsteps % 2)) / hrange / hrange
                test += np.float64(v * v - vstep * vstep / 4.0 * (1 - vsteps % 2)) / vrange / vrange
            if round_div and test * 4.0 > 1.1:
                continue
            for t in range(dsteps):
                out.append((h / hrange if hrange > 0 else 0.0, v / vrange if vrange > 0 else 0.0,
                            (dstep * t - drange / 2.0) / drange if drange > 0 else 0.0))
    return out


@pytest.mark.parametrize("round_div", [True, False])
@pytest.mark.parametrize("hdiv, vdiv, disp", [
    ((7, 1e-3, 1e-3 / 6), (4, 2e-3, 2e-3 / 3), (3, 0.01, 0.005)),
    ((6, 1e-3, 2e-4), (1, 0.0, 0.0), (1, 0.0, 0.0)),
    ((1, 0.0, 0.0), (1, 0.0, 0.0), (5, 0.02, 0.005)),
    ((11, 3e-3, 3e-4), (9, 1e-3, 1.25e-4), (2, 0.001, 0.001)),
])
def test_divergence_fractions_follow_the_c_loop(round_div, hdiv, vdiv, disp):
    """The source grid, computed as arrays, holds the C loop's sources in its order, bit for bit."""
    from nbfunc.cli.rules import divergence_fractions

    f = CFlags(round_div=round_div)
    hf, vf, df = divergence_fractions(f, hdiv, vdiv, disp)
    assert all(isinstance(x, np.ndarray) and x.dtype == np.float64 for x in (hf, vf, df))
    assert list(zip(hf.tolist(), vf.tolist(), df.tolist())) == _c_source_loop(round_div, hdiv, vdiv, disp)
