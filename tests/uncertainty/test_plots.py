"""Figures: PNGs are written; a missing matplotlib gives an error that says how to install it."""
from __future__ import annotations

import sys

import pytest
import torch

from _uncertainty_support import SPOT_TRUTH, spot
from nbfunc.plots import corner_plot, correlation_heatmap, ellipse, pull_histograms
from nbfunc.uncertainty import uncertainty

PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def toy():
    return uncertainty(spot, spot(SPOT_TRUTH), SPOT_TRUTH)


def test_ellipse_radius_follows_the_covariance():
    cov = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    pts = ellipse(cov, 1.0, 64)
    radius = pts.norm(dim=1)
    assert float(radius.max()) == pytest.approx(2.0, rel=1e-3)
    assert float(radius.min()) == pytest.approx(1.0, rel=1e-2)


def test_figures_are_written(toy, tmp_path):
    pytest.importorskip("matplotlib")
    samples = toy.values + toy.std * torch.randn(50, 4, generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.float64)
    paths = [correlation_heatmap(toy, tmp_path / "corr.png"),
             corner_plot(toy, tmp_path / "sub" / "corner.png", samples=samples),
             pull_histograms((samples - toy.values) / toy.std, toy.names, tmp_path / "pulls.png")]
    for path in paths:
        assert path.read_bytes()[:4] == PNG


def test_missing_matplotlib_says_how_to_install(toy, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"nbfunc\[plot\]"):
        correlation_heatmap(toy, tmp_path / "corr.png")
