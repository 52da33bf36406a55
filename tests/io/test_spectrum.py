"""Spectrum files (`.lam`, the convention diffBragg reads) and Gaussian bandwidths."""
import math

import numpy as np
import pytest
import torch

from nbfunc.io.errors import NbfuncInputError
from nbfunc.io.spectrum import (FWHM_PER_SIGMA, HEADER, gaussian_spectrum, read_spectrum,
                                read_spectrum_sources, save_spectrum, spectrum_sources)


def test_save_then_read_gives_the_same_values(tmp_path):
    lam = np.array([0.9871234567891234, 1.0, 1.0123456789, 1.3e-3])
    w = np.array([0.1, 2.0 / 3.0, 0.0, 12345.678])
    save_spectrum(tmp_path / "s.lam", lam, w)
    text = (tmp_path / "s.lam").read_text()
    assert text.splitlines()[0] == HEADER and text.splitlines()[1].count(",") == 1
    got_lam, got_w = read_spectrum(tmp_path / "s.lam")
    np.testing.assert_array_equal(got_lam, lam)
    np.testing.assert_array_equal(got_w, w)


def test_reads_diffbragg_layout_comments_blank_lines_and_spaces(tmp_path):
    path = tmp_path / "d.lam"
    path.write_text("# wavelengths, weights\n1.000000000000000000e+00,2.5e+03\n\n"
                    "# a comment\n  1.01 \t 500\r\n1.02,0\n")
    lam, w = read_spectrum(path)
    np.testing.assert_array_equal(lam, [1.0, 1.01, 1.02])
    np.testing.assert_array_equal(w, [2500.0, 500.0, 0.0])


def test_a_file_without_header_keeps_its_first_channel(tmp_path):
    (tmp_path / "n.lam").write_text("1.5,1\n")
    lam, w = read_spectrum(tmp_path / "n.lam")
    assert lam.tolist() == [1.5] and w.tolist() == [1.0]


@pytest.mark.parametrize("text, needles", [
    ("# wavelengths, weights\n1.0\n", ("line 2", "found 1 values")),
    ("1.0,1,3\n", ("line 1", "found 3 values")),
    ("1.0,abc\n", ("line 1", "not two numbers")),
    ("1.0,1\n-1,1\n", ("line 2", "wavelength -1 Angstrom")),
    ("0,1\n", ("line 1", "wavelength 0 Angstrom")),
    ("1.0,-2\n", ("line 1", "weight -2")),
    ("1.0,nan\n", ("line 1", "weight nan")),
    ("inf,1\n", ("line 1", "wavelength inf")),
    ("# wavelengths, weights\n", ("no channels found",)),
    ("1.0,0\n1.1,0\n", ("every one of the 2 weights is 0",)),
    ("1.0,1\x00\n", ("binary",)),
])
def test_bad_files_are_refused_in_one_line(tmp_path, text, needles):
    path = tmp_path / "bad.lam"
    path.write_text(text)
    with pytest.raises(NbfuncInputError) as info:
        read_spectrum(path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 300 and str(path) in message
    assert all(n in message for n in needles), message


def test_a_missing_file_is_refused_in_one_line(tmp_path):
    with pytest.raises(NbfuncInputError) as info:
        read_spectrum(tmp_path / "none.lam")
    assert "none.lam" in str(info.value) and "\n" not in str(info.value)


def test_sources_lie_along_the_beam_with_weights_of_mean_one(tmp_path):
    save_spectrum(tmp_path / "s.lam", [1.0, 1.1], [3.0, 1.0])
    sources = read_spectrum_sources(tmp_path / "s.lam", beam_vector=(0.0, 0.0, 1.0))
    assert torch.equal(sources.directions, torch.tensor([[0.0, 0.0, -1.0]] * 2, dtype=torch.float64))
    assert torch.equal(sources.wavelengths, torch.tensor([1.0, 1.1], dtype=torch.float64))
    assert torch.equal(sources.weights, torch.tensor([1.5, 0.5], dtype=torch.float64))
    raw = spectrum_sources([1.0, 1.1], [3.0, 1.0], normalize=False, dtype=torch.float32)
    assert raw.weights.tolist() == [3.0, 1.0] and raw.wavelengths.dtype == torch.float32


def test_gaussian_channels_are_symmetric_with_mean_one():
    lam, w = gaussian_spectrum(1.3, 5, fwhm=0.02)
    sigma = 0.02 / FWHM_PER_SIGMA
    expected = 1.3 * (1 + sigma * torch.tensor([-3.0, -1.5, 0.0, 1.5, 3.0], dtype=torch.float64))
    assert torch.allclose(lam, expected, rtol=1e-15)
    assert torch.allclose(w, w.flip(0), rtol=1e-15) and math.isclose(float(w.mean()), 1.0, rel_tol=1e-15)
    assert math.isclose(float(w[1] / w[2]), math.exp(-1.125), rel_tol=1e-14)
    same_lam, same_w = gaussian_spectrum(1.3, 5, sigma=sigma)
    assert torch.allclose(same_lam, lam, rtol=1e-15) and torch.allclose(same_w, w, rtol=1e-15)
    one_lam, one_w = gaussian_spectrum(1.3, 1, fwhm=0.02)
    assert one_lam.tolist() == [1.3] and one_w.tolist() == [1.0]


@pytest.mark.parametrize("kwargs, needle", [
    ({"fwhm": 0.01, "sigma": 0.01}, "exactly one of fwhm and sigma"),
    ({}, "exactly one of fwhm and sigma"),
    ({"fwhm": -0.01}, "fwhm = -0.01"),
    ({"sigma": 0.5}, "sigma = 0.5"),
    ({"sigma": 0.01, "span": 0.0}, "span = 0.0"),
])
def test_gaussian_refusals(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        gaussian_spectrum(1.0, 3, **kwargs)
    with pytest.raises(ValueError, match="n_channels"):
        gaussian_spectrum(1.0, 0, sigma=0.01)
    with pytest.raises(ValueError, match="wavelength"):
        gaussian_spectrum(-1.0, 3, sigma=0.01)
