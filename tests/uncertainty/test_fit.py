"""Maximum-likelihood fits: methods agree, positivity, priors, convergence status."""
from __future__ import annotations

import math

import pytest
import torch

from _uncertainty_support import SPOT_TRUTH, SPOTS, SPOTS_FREE, render, spot, tree
from nbfunc.fit import (Coordinates, damped_step, fit, fit_problem, newton_decrement, to_theta,
                        to_z)
from nbfunc.likelihood import poisson_problem, poisson_terms
from nbfunc.uncertainty import uncertainty

START = {"amp": 400.0, "x0": 0.1, "w": 1.0, "bg": 5.0}


@pytest.fixture(scope="module")
def spot_counts():
    return torch.poisson(spot(SPOT_TRUTH), generator=torch.Generator().manual_seed(1))


class TestToySpot:
    @pytest.mark.parametrize("method", ["fisher", "newton", "lbfgs"])
    def test_methods_converge_to_the_same_optimum(self, spot_counts, method):
        ref = fit(spot, spot_counts, START, method="newton", tol=1e-14)
        result = fit(spot, spot_counts, START, method=method)
        assert result.status.converged, result.status.message
        assert "converged" in result.status.message
        assert result.names == ("amp", "x0", "w", "bg")
        # the optimum to a small fraction of a standard error
        err = (result.values - ref.values) / ref.uncertainty.std
        assert float(err.abs().max()) < 1e-3
        assert result.nll == pytest.approx(ref.nll, abs=1e-6)
        assert result.history[0] > result.history[-1]
        assert result.nll == pytest.approx(result.history[-1], abs=1e-6)
        assert isinstance(result.tree, dict) and set(result.tree) == set(START)

    def test_gradient_vanishes_at_the_fit(self, spot_counts):
        result = fit(spot, spot_counts, START)
        problem = poisson_problem(spot, spot_counts, START)
        terms = poisson_terms(problem, result.values)
        assert float(newton_decrement(terms.grad, terms.fisher)) < 1e-8

    def test_uncertainty_at_the_fit_matches_a_direct_call(self, spot_counts):
        result = fit(spot, spot_counts, START)
        direct = uncertainty(spot, spot_counts, dict(zip(result.names, result.values)))
        torch.testing.assert_close(result.uncertainty.covariance, direct.covariance, rtol=1e-8, atol=0)
        torch.testing.assert_close(result.uncertainty.hessian, direct.hessian, rtol=1e-8, atol=0)

    def test_a_strong_prior_pins_the_parameter(self, spot_counts):
        result = fit(spot, spot_counts, START, priors={"x0": (0.0, 1e-6)})
        assert float(result.values[1]) == pytest.approx(0.0, abs=1e-5)
        assert float(result.uncertainty.std[1]) < 1e-6

    def test_not_converged_reports_why(self, spot_counts):
        result = fit(spot, spot_counts, START, max_iter=1)
        assert not result.status.converged
        assert result.status.iterations == 1
        assert "max_iter" in result.status.message

    def test_bad_arguments(self, spot_counts):
        with pytest.raises(ValueError, match="method='gauss' is not known"):
            fit(spot, spot_counts, START, method="gauss")
        problem = poisson_problem(spot, spot_counts, START, positive=("w",))
        with pytest.raises(ValueError, match="must stay > 0"):
            fit_problem(problem, torch.tensor([400.0, 0.1, -1.0, 5.0], dtype=torch.float64))


class TestPositivity:
    def test_log_coordinates_keep_positive_parameters_positive(self):
        c = Coordinates(torch.tensor([True, False]), torch.tensor([math.log(2.0), 1.0], dtype=torch.float64),
                        torch.tensor([10.0, 10.0], dtype=torch.float64))
        z = torch.tensor([[-5e3, -1e4], [0.0, 0.0], [30.0, 30.0]], dtype=torch.float64)
        theta = to_theta(c, z)
        assert bool((theta[:, 0] > 0).all())
        assert float(theta[0, 1]) == pytest.approx(1.0 - 1e3)
        torch.testing.assert_close(to_z(c, theta[1:]), z[1:])

    def test_a_width_started_far_away_stays_positive(self, spot_counts):
        problem = poisson_problem(spot, spot_counts, START, positive=("w", "amp", "bg"))
        result = fit_problem(problem, torch.tensor([400.0, 0.1, 3.0, 5.0], dtype=torch.float64))
        assert result.status.converged, result.status.message
        assert float(result.values[2]) == pytest.approx(0.7, abs=0.05)

    def test_damped_step_makes_an_indefinite_matrix_definite(self):
        curvature = torch.tensor([[1.0, 0.0], [0.0, -2.0]], dtype=torch.float64)
        step, lam = damped_step(curvature, torch.tensor([1.0, 1.0], dtype=torch.float64),
                                torch.tensor(1e-3, dtype=torch.float64))
        assert float(lam) > 2.0
        assert float(step @ torch.tensor([1.0, 1.0], dtype=torch.float64)) < 0   # descent


class TestTree:
    def test_fit_of_the_spot_pattern_recovers_the_truth(self):
        p = tree(SPOTS)
        mu = render(p)
        counts = torch.poisson(mu, generator=torch.Generator().manual_seed(3))
        at_truth = uncertainty(p, mu, SPOTS_FREE)
        signs = torch.tensor([2.0, -2.0, 2.0, -2.0, 2.0, -2.0, 2.0], dtype=torch.float64)
        problem = poisson_problem(p, counts, SPOTS_FREE)
        result = fit_problem(problem, at_truth.values + signs * at_truth.std)
        assert result.status.converged, result.status.message
        assert result.status.iterations <= 6
        pulls = (result.values - at_truth.values) / result.uncertainty.std
        assert float(pulls.abs().max()) < 4.0, pulls
        assert float(result.tree.crystal.cell_a) == pytest.approx(float(result.values[0]))
        assert float(result.tree.crystal.misset[0]) == pytest.approx(float(result.values[5]))
        assert float(result.tree.crystal.misset[1]) == float(p.crystal.misset[1])
        assert result.uncertainty.units[:3] == ("Angstrom", "Angstrom", "mm")
        assert result.uncertainty.condition_number < 100
