"""Pull tests of diffBragg's models: fits of Poisson replicas give calibrated error bars for the
domain-size matrix N (shape gauss_hkl) and for the channel weights of a spectrum.

Each test draws ``R = 200`` Poisson images of one expected image (fixed seed), fits every one
from a start scattered by 2 standard errors (`nbfunc.replicas.fit_replicas`, Fisher standard
errors at each fit), and checks the pulls ``(fit - truth)/std`` of every parameter. For
unbiased fits with right error bars the pulls have mean 0 and width 1; from ``R`` replicas the
sample mean has standard error ``1/sqrt(R)`` and the sample width ``1/sqrt(2(R-1))``, so the
bounds ``|mean| < 4/sqrt(R) = 0.28`` and ``|width - 1| < 4/sqrt(2(R-1)) = 0.20`` are four
standard errors (each check alone fails by chance with probability 6e-5). The width bound
catches error bars off by more than about 20 %. The truth is the fit to the noiseless image
(`nbfunc.uncertainty`), which recovers the tree's values to round-off.

A 48 x 48 detector, one of a few seconds per test (eager, float64).
"""
from __future__ import annotations

import math

import pytest
import torch

from nbfunc.cli.derive import params_from_args
from nbfunc.io.spectrum import spectrum_sources
from nbfunc.replicas import fit_replicas, poisson_replicas, pull_summary
from nbfunc.tree import replace_leaves
from nbfunc.uncertainty import uncertainty

D = torch.float64
R = 200
MEAN_BOUND = 4 / math.sqrt(R)
WIDTH_BOUND = 4 / math.sqrt(2 * (R - 1))
SPOTS = ("-cell 20 20 30 90 90 90 -misset 61 27 42 -default_F {F} -N {N} -gauss_hkl_xtal -lambda 1 "
         "-distance 100 -detpixels 48 -pixel 0.3 -oversample 1 -water 0.03")
"""A handful of Gaussian spots on a water background (mu > 0 everywhere)."""


@pytest.fixture(autouse=True)
def eager():
    with torch.compiler.set_stance("force_eager"):
        yield


def render(p) -> torch.Tensor:
    import nbfunc

    with torch.no_grad():
        return nbfunc.simulate(p)


def pulls(p, free, seed: int):
    """Fit `R` replicas of ``p``'s image; returns the pull summary and the fits."""
    mu = render(p)
    at_truth = uncertainty(p, mu, free)
    generator = torch.Generator().manual_seed(seed)
    counts = poisson_replicas(mu, R, generator)
    start = at_truth.values + 2 * at_truth.std * torch.randn(R, len(at_truth.values),
                                                             generator=generator, dtype=D)
    fits = fit_replicas(p, counts, free, start)
    assert bool(fits.converged.all()), fits.iterations
    return pull_summary(fits.values, at_truth.values, fits.std, fits.names), at_truth


def check(summary) -> None:
    for name, s in summary.items():
        assert abs(s["mean"]) < MEAN_BOUND, (name, s)
        assert abs(s["width"] - 1) < WIDTH_BOUND, (name, s)


def test_domain_size_matrix_pulls():
    """All six entries of N free: Na, Nb, Nc and the off-diagonal Nd, Ne, Nf."""
    p = params_from_args(SPOTS.format(F=30, N=5).split())
    truth = {"crystal.Nb": 6.0, "crystal.Nc": 4.0, "crystal.Ncells_def": [1.0, -0.7, 0.5]}
    p = replace_leaves(p, {k: torch.tensor(v, dtype=D) for k, v in truth.items()})
    free = ["crystal.Na", "crystal.Nb", "crystal.Nc", "crystal.Ncells_def[0]",
            "crystal.Ncells_def[1]", "crystal.Ncells_def[2]"]
    summary, at_truth = pulls(p, free, seed=0)
    expected = torch.tensor([5.0, 6.0, 4.0, 1.0, -0.7, 0.5], dtype=D)
    torch.testing.assert_close(at_truth.values, expected, rtol=0, atol=1e-3 * float(at_truth.std.min()))
    # the entries are measured, not guessed: each to about a fifth of a cell
    assert float(at_truth.std.max()) < 0.3, at_truth.std
    check(summary)


def test_spectrum_weight_pulls():
    """Five channels 5 % apart, every weight free, fluence fixed: the channels light different
    reflections and move each spot along the radius, so the weights are measured separately."""
    p = params_from_args(SPOTS.format(F=30, N=8).split())
    weights = torch.tensor([0.5, 1.0, 2.0, 1.0, 0.5], dtype=D)
    sources = spectrum_sources([0.9, 0.95, 1.0, 1.05, 1.1], weights, p.beam.beam_vector,
                               normalize=False)
    p = p.model_copy(update={"beam": p.beam.model_copy(update={"sources": sources})})
    summary, at_truth = pulls(p, ["beam.sources.weights"], seed=1)
    torch.testing.assert_close(at_truth.values, weights, rtol=0, atol=1e-3 * float(at_truth.std.min()))
    assert float((at_truth.std / weights).max()) < 0.2, at_truth.std
    check(summary)
