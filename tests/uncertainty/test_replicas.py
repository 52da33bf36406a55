"""Replicas, batched fits and pulls: the pull test in small."""
from __future__ import annotations

import math

import pytest
import torch

from _uncertainty_support import SPOT_TRUTH, SPOTS, SPOTS_FREE, render, spot, tree
from nbfunc.fit import fit_problem
from nbfunc.likelihood import poisson_problem
from nbfunc.replicas import fit_replicas, poisson_replicas, pull_summary
from nbfunc.uncertainty import uncertainty


def test_replicas_are_reproducible_and_poisson():
    mu = torch.tensor([2.0, 50.0, 0.0], dtype=torch.float64)
    a = poisson_replicas(mu, 4000, torch.Generator().manual_seed(5))
    b = poisson_replicas(mu, 4000, torch.Generator().manual_seed(5))
    assert a.shape == (4000, 3) and torch.equal(a, b)
    torch.testing.assert_close(a.mean(0), mu, rtol=0.05, atol=0.0)
    torch.testing.assert_close(a.var(0), mu, rtol=0.1, atol=0.0)


def test_pull_summary_known_values():
    values = torch.tensor([[1.0], [3.0]], dtype=torch.float64)
    out = pull_summary(values, torch.tensor([1.0], dtype=torch.float64),
                       torch.tensor([[2.0], [2.0]], dtype=torch.float64), ["x"])
    assert out["x"]["mean"] == pytest.approx(0.5)
    assert out["x"]["width"] == pytest.approx(math.sqrt(0.5))
    assert out["x"]["mean_err"] == pytest.approx(0.5)
    assert out["x"]["n"] == 2


def test_batched_fits_equal_single_fits():
    counts = poisson_replicas(spot(SPOT_TRUTH), 3, torch.Generator().manual_seed(2))
    start = torch.tensor([480.0, 0.25, 0.75, 9.0], dtype=torch.float64)
    batch = fit_replicas(spot, counts, SPOT_TRUTH, start)
    assert bool(batch.converged.all())
    for r in range(3):
        single = fit_problem(poisson_problem(spot, counts[r], SPOT_TRUTH), start)
        torch.testing.assert_close(batch.values[r], single.values, rtol=0, atol=1e-4 * float(single.uncertainty.std.min()))
        torch.testing.assert_close(batch.std[r], single.uncertainty.std, rtol=1e-6, atol=0)
        assert float(batch.nll[r]) == pytest.approx(single.nll, abs=1e-6)


def test_batched_fits_of_a_tree_equal_single_fits():
    """A tree's replicas share one problem: with a mask and tiles of a few rows each, every
    replica's counts are taken at its tiles' pixels (`Tile.pixels`), and each batched fit
    equals the fit of that replica's own problem. A stack without replicas is refused."""
    p = tree(SPOTS.replace("-detpixels 64", "-detpixels 24"))
    mu = render(p)
    mask = torch.ones_like(mu, dtype=torch.bool)
    mask[3:9, 5:17] = False
    counts = poisson_replicas(mu, 2, torch.Generator().manual_seed(4))
    free = ["detector.distance", "crystal.misset[0]"]
    problem = poisson_problem(p, counts[0], free, mask=mask, tile_pixels=100)
    assert len(problem.tiles) > 3
    start = problem.start * (1 + 1e-3)
    batch = fit_replicas(p, counts, free, start, mask=mask, tile_pixels=100)
    assert bool(batch.converged.all())
    for r in range(2):
        single = fit_problem(poisson_problem(p, counts[r], free, mask=mask, tile_pixels=100), start)
        torch.testing.assert_close(batch.values[r], single.values, rtol=0,
                                   atol=1e-4 * float(single.uncertainty.std.min()))
        assert float(batch.nll[r]) == pytest.approx(single.nll, abs=1e-6)
    with pytest.raises(ValueError, match="at least one replica"):
        fit_replicas(p, counts[:0], free, start)


def test_toy_pulls_have_mean_0_and_width_1():
    n = 400
    generator = torch.Generator().manual_seed(11)
    counts = poisson_replicas(spot(SPOT_TRUTH), n, generator)
    truth = torch.stack(list(SPOT_TRUTH.values()))
    sigma = uncertainty(spot, spot(SPOT_TRUTH), SPOT_TRUTH).std
    start = truth + 2 * sigma * torch.randn(n, 4, generator=generator, dtype=torch.float64)
    fits = fit_replicas(spot, counts, SPOT_TRUTH, start)
    assert bool(fits.converged.all())
    for name, s in pull_summary(fits.values, truth, fits.std, fits.names).items():
        assert abs(s["mean"]) < 4 / math.sqrt(n), (name, s)
        assert abs(s["width"] - 1) < 4 / math.sqrt(2 * n), (name, s)


def test_pull_test_of_the_spot_pattern():
    """30 replicas of the benchmark's truth, 7 free parameters, fixed seed.

    Tolerances for 30 replicas: |mean| < 4/sqrt(30) = 0.73 and |width - 1| < 0.35 (2.7
    standard errors of a width from 30 samples).
    """
    n = 30
    p = tree(SPOTS)
    mu = render(p)
    at_truth = uncertainty(p, mu, SPOTS_FREE)
    generator = torch.Generator().manual_seed(0)
    counts = poisson_replicas(mu, n, generator)
    start = at_truth.values + 3 * at_truth.std * torch.randn(n, 7, generator=generator, dtype=torch.float64)
    fits = fit_replicas(p, counts, SPOTS_FREE, start)
    assert bool(fits.converged.all()), fits.iterations
    assert int(fits.iterations.max()) <= 6
    for name, s in pull_summary(fits.values, at_truth.values, fits.std, fits.names).items():
        assert abs(s["mean"]) < 4 / math.sqrt(n), (name, s)
        assert abs(s["width"] - 1) < 0.35, (name, s)
