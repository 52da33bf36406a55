"""The command-line flags of diffuse scattering and the B factor: ``-diffuse``,
``-diffuse_gamma``, ``-diffuse_sigma``, ``-laue_group`` and ``-bfactor`` (docs/cli.md).

They reach the tree's leaves and switches, ``-params_out`` saves them, bad values and
``-laue_group`` alone are refused in one line, and without them the tree and the header are
what they were. Every run is an 8 x 8 detector.
"""
import os

import numpy as np
import pytest
import torch

import nbfunc
from _cli_support import refuse, run_cli
from nbfunc import Params
from nbfunc.cli import main
from nbfunc.cli.derive import derive
from nbfunc.cli.flags import parse_flags, triggered

D = torch.float64
BASE = ("-cell 50 60 70 85 95 100 -misset 10 -20 30 -default_F 100 -N 5 -lambda 1 "
        "-distance 50 -pixel 0.5 -detpixels 8 -oversample 1 -noprogress").split()
FLAGS = ("-diffuse", "-diffuse_gamma", "-diffuse_sigma", "-laue_group", "-bfactor")
DIFFBRAGG_LAUE = ("P-1", "P112/m", "P12/m1", "P2/m11", "Pmmm", "P4/m", "P4/mmm", "P-3", "P-3m1",
                  "P-31m", "P6/m", "P6/mmm", "Pm-3", "Pm-3m")
"""diffBragg's Laue groups in the order of its numbers 1 to 14 (simtbx/diffBragg/utils.py,
get_laue_group_number)."""


def tree(extra: str = "") -> Params:
    return derive(BASE + extra.split())[0]


def render(p: Params) -> torch.Tensor:
    with torch.compiler.set_stance("force_eager"):
        return nbfunc.simulate(p)


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", FLAGS)
def test_exact_names_that_no_c_flag_matches(flag):
    assert [h.name for h in triggered(flag)] == [flag]
    assert triggered(flag + "x") == ()


def test_one_value_is_isotropic_and_three_are_per_axis():
    cf = parse_flags("-diffuse_gamma 3 -N 5 -diffuse_sigma 0.1 0.2 0.3".split())
    assert cf.diffuse_gamma == (3.0, 3.0, 3.0) and cf.diffuse_sigma == (0.1, 0.2, 0.3)
    assert cf.Na == 5.0  # the values stop at the next flag
    cf = parse_flags("-diffuse_sigma 0 -diffuse_gamma 1e1 2 .5".split())
    assert cf.diffuse_sigma == (0.0, 0.0, 0.0) and cf.diffuse_gamma == (10.0, 2.0, 0.5)


@pytest.mark.parametrize("number", range(1, 15))
def test_laue_group_numbers_are_diffbraggs(number):
    assert parse_flags(["-laue_group", str(number)]).laue_group == DIFFBRAGG_LAUE[number - 1]


def test_laue_group_symbols_ignore_spaces():
    assert parse_flags(["-laue_group", "P 4/m m m"]).laue_group == "P4/mmm"
    assert parse_flags(["-laue_group", "Pm-3m"]).laue_group == "Pm-3m"


# --------------------------------------------------------------------------------------------
# the tree
# --------------------------------------------------------------------------------------------
def test_flags_reach_the_leaves_and_switches():
    cr = tree("-diffuse -diffuse_gamma 3 4 2.5 -diffuse_sigma 0.3 -laue_group 7 -bfactor 20").crystal
    assert cr.diffuse and cr.bfactor and cr.diffuse_laue_group == "P4/mmm"
    assert torch.equal(cr.diffuse_gamma, torch.tensor([3.0, 4.0, 2.5], dtype=D))
    assert torch.equal(cr.diffuse_sigma, torch.tensor([0.3, 0.3, 0.3], dtype=D))
    assert cr.B.shape == () and float(cr.B) == 20.0


def test_gamma_or_sigma_turn_the_diffuse_term_on():
    for extra in ("-diffuse_gamma 2", "-diffuse_sigma 0.2", "-diffuse_gamma 2 -laue_group P-3"):
        cr = tree(extra).crystal
        assert cr.diffuse and not cr.bfactor, extra
    cr = tree("-diffuse_sigma 0.2").crystal
    assert torch.equal(cr.diffuse_gamma, tree().crystal.diffuse_gamma)  # the tree's default


def test_diffuse_alone_keeps_the_trees_defaults():
    plain, on = tree().crystal, tree("-diffuse").crystal
    assert on.diffuse and not plain.diffuse
    assert torch.equal(on.diffuse_gamma, plain.diffuse_gamma)
    assert torch.equal(on.diffuse_sigma, plain.diffuse_sigma)
    assert on.diffuse_laue_group == plain.diffuse_laue_group == "P-1"


def test_without_the_flags_the_models_are_off():
    cr = tree().crystal
    assert not cr.diffuse and not cr.bfactor and float(cr.B) == 0.0


def test_zero_b_factor_changes_no_pixel_and_a_positive_one_lowers_the_spots():
    plain = render(tree())
    assert tree("-bfactor 0").crystal.bfactor
    assert torch.equal(render(tree("-bfactor 0")), plain)
    damped = render(tree("-bfactor 50"))
    assert plain.max() > 0 and bool((damped <= plain).all()) and bool((damped < plain).any())


def test_diffuse_scattering_adds_to_the_image():
    plain = render(tree())
    diffuse = render(tree("-diffuse_gamma 3 -diffuse_sigma 0.4"))
    assert bool((diffuse >= plain).all()) and bool((diffuse > plain).any())


def test_header_keeps_the_c_programs_fields():
    plain = derive(BASE)[1].header
    extra = "-diffuse -diffuse_gamma 3 -diffuse_sigma 0.3 -laue_group Pmmm -bfactor 20"
    assert derive(BASE + extra.split())[1].header == plain


# --------------------------------------------------------------------------------------------
# the command line: -params_out carries the values, -params refuses the flags
# --------------------------------------------------------------------------------------------
def test_params_out_saves_the_leaves_and_renders_the_same_image(tmp_path):
    argv = BASE + "-diffuse_gamma 3 4 2.5 -diffuse_sigma 0.3 0.4 0.5 -laue_group P4/mmm -bfactor 20".split()
    status, _, err = run_cli(argv + ["-floatfile", "a.bin", "-nonoise", "-nopgm",
                                     "-params_out", "t.json"], tmp_path)
    assert status == 0, err
    cr = Params.load(tmp_path / "t.json").crystal
    assert cr.diffuse and cr.bfactor and cr.diffuse_laue_group == "P4/mmm" and float(cr.B) == 20.0
    assert torch.equal(cr.diffuse_gamma, torch.tensor([3.0, 4.0, 2.5], dtype=D))
    assert torch.equal(cr.diffuse_sigma, torch.tensor([0.3, 0.4, 0.5], dtype=D))
    status, _, err = run_cli(["-params", "t.json", "-floatfile", "b.bin", "-nonoise", "-nopgm",
                              "-noprogress"], tmp_path)
    assert status == 0, err
    a = np.fromfile(tmp_path / "a.bin", dtype="<f4")
    assert a.max() > 0 and (tmp_path / "b.bin").read_bytes() == (tmp_path / "a.bin").read_bytes()


@pytest.mark.parametrize("flag", [["-diffuse"], ["-diffuse_gamma", "2"], ["-diffuse_sigma", "0.1"],
                                  ["-laue_group", "P-1"], ["-bfactor", "0"]])
def test_params_refuses_the_flags(flag, tmp_path):
    status, _, err = run_cli(BASE + ["-params_out", "t.json", "-nonoise", "-nopgm"], tmp_path)
    assert status == 0, err
    status, _, err = run_cli(["-params", "t.json"] + flag, tmp_path)
    assert status == 2 and err.count("\n") == 1
    assert f"{flag[0]} cannot be given with -params t.json" in err


# --------------------------------------------------------------------------------------------
# bad values: status 2, one line naming the flag, nothing written
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, needles", [
    ("-diffuse_gamma", ["-diffuse_gamma expects 1 or 3 lengths in Angstrom", "nothing follows it"]),
    ("-diffuse_gamma x", ["-diffuse_gamma", "'x'"]),
    ("-diffuse_gamma 3 4", ["-diffuse_gamma", "got 2: '3' '4'"]),
    ("-diffuse_gamma 3 4 -N 5", ["-diffuse_gamma", "got 2"]),
    ("-diffuse_gamma 0", ["-diffuse_gamma", "greater than 0", "'0'"]),
    ("-diffuse_gamma 1 -2 1", ["-diffuse_gamma", "greater than 0", "'-2'"]),
    ("-diffuse_gamma 1 nan 1", ["-diffuse_gamma", "finite", "'nan'"]),
    ("-diffuse_sigma -0.1", ["-diffuse_sigma", "at least 0", "'-0.1'"]),
    ("-diffuse_sigma inf", ["-diffuse_sigma", "finite"]),
    ("-diffuse -laue_group P4", ["-laue_group expects a Laue group", "P4/mmm", "1 to 14", "'P4'"]),
    ("-diffuse -laue_group 15", ["-laue_group", "'15'"]),
    ("-diffuse -laue_group 0", ["-laue_group", "'0'"]),
    ("-laue_group P4/mmm", ["-laue_group P4/mmm sets only the symmetry of the diffuse",
                            "add -diffuse"]),
    ("-bfactor -1", ["-bfactor expects a B factor in Angstrom^2 of at least 0", "'-1'"]),
    ("-bfactor", ["-bfactor", "nothing follows it"]),
])
def test_bad_values(extra, needles, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refuse(BASE + extra.split(), tmp_path, capsys, *needles)


# --------------------------------------------------------------------------------------------
# lengths whose image would overflow (an all-NaN image with status 0 before the bound):
# status 2, one line naming the flag, the value and the fix, no image written
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, flag, shown, fix", [
    ("-diffuse_gamma 1e200", "-diffuse_gamma", "1e+200", "lower diffuse_gamma"),
    ("-diffuse_gamma 1e103", "-diffuse_gamma", "1e+103", "lower diffuse_gamma"),
    ("-diffuse_sigma 1e160", "-diffuse_sigma", "1e+160", "lower diffuse_sigma"),
    ("-diffuse_gamma 1e13 -dtype float32", "-diffuse_gamma", "1e+13", "lower diffuse_gamma"),
    ("-diffuse_sigma 1e20 -dtype float32", "-diffuse_sigma", "1e+20", "lower diffuse_sigma"),
])
def test_overflowing_lengths_are_refused(extra, flag, shown, fix, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status = main.run(BASE + extra.split() + ["-floatfile", "x.bin"])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert status == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith(f"nbfunc: error: {flag}: crystal.{flag[1:]} = {shown}: "), lines[0]
    dtype = "float32" if "float32" in extra else "float64"
    assert fix in lines[0] and f"beyond what {dtype} holds" in lines[0], lines[0]
    assert "Traceback" not in captured.err
    assert os.listdir(tmp_path) == []


def test_large_accepted_lengths_render_finite(tmp_path):
    """Just inside the bounds (float64: gamma 1e98, sigma 1e150 Angstrom) the run writes a
    finite image."""
    status, out, err = run_cli(BASE + "-diffuse_gamma 1e98 -diffuse_sigma 1e150 -floatfile x.bin "
                               "-nonoise -nopgm".split(), tmp_path)
    assert status == 0, err
    image = np.fromfile(tmp_path / "x.bin", dtype=np.float32)
    assert image.size == 64 and np.isfinite(image).all() and image.max() > 0
