"""``-params FILE``: a tree saved by ``-params_out`` renders the same files again, and the
flags that would change its physics are refused in one line (`nbfunc.cli.tree_run`)."""
import numpy as np
import pytest
import torch

from _cli_support import run_cli
from nbfunc import Params
from nbfunc.cli.flags import given_flags

SMALL = ("-cell 60 60 60 90 90 90 -default_F 100 -N 4 -lambda 1 -distance 80 -detpixels 16 "
         "-pixel 0.2 -noprogress -nopgm").split()
OUTPUTS = ["float.bin", "int.img", "noise.img"]


def save_tree(folder) -> None:
    """A small run that writes its tree to ``folder``/t.json (and its images under s_*)."""
    status, _, err = run_cli(SMALL + ["-params_out", "t.json", "-nonoise", "-floatfile", "s.bin",
                                      "-intfile", "s.img"], folder)
    assert status == 0, err


def outputs(prefix: str) -> list[str]:
    return ["-floatfile", prefix + "float.bin", "-intfile", prefix + "int.img", "-noisefile",
            prefix + "noise.img", "-seed", "7"]


@pytest.mark.parametrize("geometry, label", [
    ([], []),
    (["-denzo", "-Xbeam", "1.1", "-Ybeam", "2.3", "-detector_rotz", "3"], ["-denzo"]),
    (["-xds", "-ORGX", "6.5", "-ORGY", "9", "-twotheta", "4", "-phi", "1", "-osc", "2",
      "-phisteps", "2"], []),
], ids=["mosflm", "denzo", "xds"])
def test_saved_tree_renders_byte_identical_files(geometry, label, tmp_path):
    status, _, err = run_cli(SMALL + geometry + outputs("a_") + ["-params_out", "t.json"], tmp_path)
    assert status == 0, err
    status, out, err = run_cli(["-params", "t.json"] + label + outputs("b_") + ["-nopgm",
                                                                               "-noprogress"],
                               tmp_path)
    assert status == 0, err
    assert "parameter tree from t.json" in out
    for name in OUTPUTS:
        assert (tmp_path / ("b_" + name)).read_bytes() == (tmp_path / ("a_" + name)).read_bytes(), name


def test_roi_and_dtype_apply_to_the_saved_tree(tmp_path):
    save_tree(tmp_path)
    status, _, err = run_cli(["-params", "t.json", "-roi", "2", "5", "3", "9", "-dtype", "float32",
                              "-floatfile", "roi.bin", "-nonoise", "-nopgm",
                              "-params_out", "roi.json"], tmp_path)
    assert status == 0, err
    image = np.fromfile(tmp_path / "roi.bin", dtype="<f4").reshape(16, 16)
    inside = np.zeros((16, 16), bool)
    inside[3:10, 2:6] = True
    assert (image[~inside] == 0).all() and (image[inside] > 0).all()
    saved = Params.load(tmp_path / "roi.json")
    assert saved.sampling.roi == (2, 5, 3, 9) and saved.detector.distance.dtype == torch.float32


@pytest.mark.parametrize("extra, needles", [
    (["-distance", "50"], ["-distance cannot be given with -params t.json", "the tree holds"]),
    (["-pixels", "0.1"], ["-pixels cannot be given with -params"]),
    (["-mask", "m.img"], ["-mask cannot be given with -params"]),
    (["-xds"], ["-xds with -params", "not the XDS convention's", "MOSFLM names"]),
    (["-roi", "9", "3", "0", "15"], ["-roi 9 3 0 15 is empty"]),
])
def test_flags_that_change_the_physics_are_refused(extra, needles, tmp_path):
    save_tree(tmp_path)
    status, out, err = run_cli(["-params", "t.json", "-nonoise"] + extra, tmp_path)
    assert status == 2 and err.count("\n") == 1 and len(err) < 300, err
    assert all(n in err for n in needles), err
    assert not (tmp_path / "floatimage.bin").exists()


@pytest.mark.parametrize("content, needles", [
    (None, ["-params missing.json", "give a file written by"]),
    ("{not json", ["-params bad.json", "give a tree written by -params_out"]),
    ('{"beam": {"wavelength": 1.0}}', ["-params bad.json: detector: Field required"]),
])
def test_unreadable_trees_are_one_line_errors(content, needles, tmp_path):
    name = "missing.json" if content is None else "bad.json"
    if content is not None:
        (tmp_path / name).write_text(content)
    status, _, err = run_cli(["-params", name, "-nonoise", "-nopgm"], tmp_path)
    assert status == 2 and err.count("\n") == 1 and len(err) < 300, err
    assert all(n in err for n in needles), err


def test_given_flags_names_handlers_with_the_arguments_that_ran_them():
    assert given_flags(["-N", "5", "-pixels", "0.1", "-params", "t.json"]) == {
        "-N": "-N", "-pixel": "-pixels", "-params": "-params"}
    assert "-twotheta" not in given_flags(["-twotheta_axis", "0", "1", "0"])
