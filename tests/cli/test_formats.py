"""The nbfunc output formats on the command line (-cbffile, -nxsfile), --version, and flag
errors from the environment."""
import numpy as np
import pytest

from _cli_support import run_cli
from nbfunc import __version__
from nbfunc.cli import main

BASE = ("-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 1 -distance 100 -detpixels 24 "
        "-pixel 0.4 -roi 3 17 5 20 -nonoise -nopgm -floatfile f.bin").split()


def test_cbf_and_nxs_files_hold_the_float_image(tmp_path):
    """-cbffile holds the float image's photons rounded to counts, -nxsfile the float image
    itself, with the rendered pixels (the ROI) unmasked."""
    fabio = pytest.importorskip("fabio")
    h5py = pytest.importorskip("h5py")
    status, out, err = run_cli(BASE + ["-cbffile", "a.cbf", "-nxsfile", "a.h5",
                                       "-nxs_compression", "gzip"], tmp_path)
    assert status == 0, err
    assert "writing a.cbf as miniCBF" in out and "writing a.h5 as NXmx HDF5" in out
    image = np.fromfile(tmp_path / "f.bin", dtype="<f4").reshape(24, 24)
    assert image[5:21, 3:18].min() > 0
    counts = fabio.open(str(tmp_path / "a.cbf")).data
    assert np.array_equal(counts, np.floor(image.astype(np.float64) + 0.5))
    with h5py.File(tmp_path / "a.h5") as f:
        assert np.array_equal(f["/entry/data/data"][0], image)
        masked = f["/entry/instrument/detector/pixel_mask"][()] != 0
    assert not masked[5:21, 3:18].any() and masked.sum() == 24 * 24 - 16 * 15


def test_a_geometry_cbf_cannot_hold_is_refused_before_rendering(tmp_path):
    status, out, err = run_cli(BASE + ["-twotheta", "20", "-xds", "-cbffile", "a.cbf"], tmp_path)
    assert status == 2 and out == ""
    assert err.startswith("nbfunc: error: -cbffile a.cbf: params.detector: the detector is turned 20 deg")
    assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_an_unknown_compression_is_refused(tmp_path):
    status, _, err = run_cli(BASE + ["-nxsfile", "a.h5", "-nxs_compression", "lzf"], tmp_path)
    assert status == 2 and "-nxs_compression expects 'none', 'gzip' or 'bslz4'" in err


@pytest.mark.parametrize("flag", ["--version", "-version"])
def test_version(flag, tmp_path):
    status, out, err = run_cli(["-cell", "1", flag], tmp_path)
    assert (status, err) == (0, "")
    assert out.startswith(f"nbfunc {__version__} (torch ")


def test_an_environment_flag_not_understood_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("nbfunc.compile.SETTING_ERRORS",
                        ["NANOBRAGG_DISABLE_COMPILE='2' is not understood; use 1 (on) or 0 (off)"])
    status, out, err = run_cli(BASE, tmp_path)
    assert (status, out) == (2, "")
    assert err == ("nbfunc: error: NANOBRAGG_DISABLE_COMPILE='2' is not understood; "
                   "use 1 (on) or 0 (off)\n")
    assert main.version_text().startswith("nbfunc ")


def test_params_out_reproduces_the_run_from_python(tmp_path):
    """The tree written by -params_out renders the command line's float image again."""
    import torch

    import nbfunc

    flags = BASE + ["-mosaic", "0.5", "-mosaic_dom", "3", "-phi", "0", "-osc", "1", "-phisteps", "2",
                    "-params_out", "tree.json"]
    status, out, err = run_cli(flags, tmp_path)
    assert status == 0, err
    assert "writing tree.json as the parameter tree" in out
    p = nbfunc.Params.load(tmp_path / "tree.json")
    image, _ = nbfunc.simulate_with_carry(p, nbfunc.initial_carry(p))
    expected = np.fromfile(tmp_path / "f.bin", dtype="<f4").reshape(24, 24)
    assert np.array_equal(image.to(torch.float32).numpy(), expected)
