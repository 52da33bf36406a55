"""-mosaic_quadrature, -eta and -eta_tensor: the quadrature mosaic from the command line."""
from __future__ import annotations

import pytest
import torch

import nbfunc
from nbfunc.cli.flags import FlagError, triggered

BASE = ("-cell 40 40 40 90 90 90 -default_F 100 -N 6 -lambda 1 -distance 80 -detpixels 8 "
        "-pixel 0.2 ")


def crystal(extra: str) -> nbfunc.Crystal:
    return nbfunc.params_from_args((BASE + extra).split()).crystal


def test_flags_match_only_their_exact_names():
    for name in ("-mosaic_quadrature", "-eta", "-eta_tensor"):
        assert [h.name for h in triggered(name)] == [name]


def test_eta_sets_the_quadrature_tree():
    c = crystal("-mosaic_quadrature -eta 0.3 0.2 0.1")
    assert c.mosaic_model == "quadrature" and c.mosaic_domains == 10  # C's automatic count
    assert c.eta.tolist() == [0.3, 0.2, 0.1] and float(c.mosaic_spread) == 0.0
    assert len(c.mosaic_axes) == 0  # no random draws
    c = crystal("-mosaic_quadrature -eta_tensor 0.3 0.2 0.1 0.05 -0.02 0.01 -mosaic_dom 7 -mosaic 0.1")
    assert c.eta.tolist() == [0.3, 0.2, 0.1, 0.05, -0.02, 0.01]
    assert c.mosaic_domains == 7 and float(c.mosaic_spread) == pytest.approx(0.1)


def test_quadrature_with_an_isotropic_spread_only():
    c = crystal("-mosaic_quadrature -mosaic 0.3")
    assert c.mosaic_model == "quadrature" and c.mosaic_domains == 10
    assert torch.equal(c.eta, torch.zeros(3, dtype=torch.float64))
    assert crystal("-mosaic_quadrature").mosaic_domains == 1


def test_default_is_still_the_random_domains():
    c = crystal("-mosaic 0.3")
    assert c.mosaic_model == "c_random" and len(c.mosaic_axes) == 10


@pytest.mark.parametrize("extra, message", [
    ("-eta 0.3 0.2 0.1", r"^-eta/-eta_tensor need -mosaic_quadrature .*; add it, or drop -eta$"),
    ("-mosaic_quadrature -mosaic 0.3 -mosaic_dom 3", r"^-mosaic_dom: crystal.mosaic_domains = 3 is too few"),
    ("-mosaic_quadrature -eta_tensor 0.1 0.1 0.1 0.5 0 0", r"^-eta/-eta_tensor: .*not positive semidefinite"),
    ("-mosaic_quadrature -eta -0.1 0 0", r"^-eta expects 3 angles in degrees \(xx yy zz\) of at least 0"),
    ("-mosaic_quadrature -eta_tensor 0.1 0.1 0.1", r"^-eta_tensor expects 6 angles"),
])
def test_bad_mosaic_flags_are_refused_in_one_line(extra, message):
    with pytest.raises(FlagError, match=message) as err:
        crystal(extra)
    assert "\n" not in str(err.value)
