"""Fisher information, observed Hessian, covariance, priors and degeneracy warnings."""
from __future__ import annotations

import warnings

import pytest
import torch

from _uncertainty_support import TINY, X, linear, render, spot, SPOT_TRUTH, tree
from nbfunc.likelihood import poisson_problem
from nbfunc.tree import get_leaf, replace_leaves
from nbfunc.uncertainty import (DegenerateInformationWarning, hessian_covariance,
                                invert_information, standard_errors, summary_table, uncertainty,
                                unit_diagonal)

f64 = lambda x: torch.tensor(x, dtype=torch.float64)


def no_warnings():
    """Turn DegenerateInformationWarning into an error inside the block."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", DegenerateInformationWarning)
    return ctx


class TestToyModels:
    def test_linear_model_covariance_is_the_analytic_inverse(self):
        mu = linear({"a": f64(100.0), "b": f64(20.0)})
        u = uncertainty(linear, mu, {"a": 100.0, "b": 20.0})
        design = torch.stack([X, torch.ones_like(X)], 1)           # d mu / d (a, b)
        fisher = (design / mu[:, None]).T @ design
        torch.testing.assert_close(u.fisher, fisher, rtol=1e-12, atol=0)
        torch.testing.assert_close(u.covariance, torch.linalg.inv(fisher), rtol=1e-10, atol=0)
        torch.testing.assert_close(u.std, torch.linalg.inv(fisher).diagonal().sqrt(), rtol=1e-10, atol=0)
        c = torch.linalg.inv(fisher)
        assert float(u.correlation[0, 1]) == pytest.approx(float(c[0, 1] / (c[0, 0] * c[1, 1]).sqrt()), rel=1e-10)
        assert u.names == ("a", "b")
        assert u.degenerate == ()

    def test_scale_model_variance_is_s_over_sum(self):
        """mu = s t: Fisher = sum(t)/s, so Var(s) = s / sum(t) exactly."""
        t = torch.tensor([1.0, 4.0, 9.0, 0.5], dtype=torch.float64)
        model = lambda v: v["s"] * t
        u = uncertainty(model, model({"s": f64(3.0)}), {"s": 3.0})
        assert float(u.covariance[0, 0]) == pytest.approx(3.0 / float(t.sum()), rel=1e-12)

    def test_hessian_equals_fisher_when_counts_equal_mu(self):
        u = uncertainty(spot, spot(SPOT_TRUTH), SPOT_TRUTH)
        torch.testing.assert_close(u.hessian, u.fisher, rtol=1e-9, atol=1e-9 * float(u.fisher.abs().max()))

    def test_hessian_is_the_second_derivative_of_the_nll(self):
        counts = torch.poisson(spot(SPOT_TRUTH), generator=torch.Generator().manual_seed(0))
        u = uncertainty(spot, counts, SPOT_TRUTH)
        names = list(SPOT_TRUTH)

        def nll(theta):
            mu = spot(dict(zip(names, theta)))
            return (mu - counts * torch.log(mu)).sum()

        expected = torch.func.hessian(nll)(torch.stack([SPOT_TRUTH[n] for n in names]))
        torch.testing.assert_close(u.hessian, expected, rtol=1e-10, atol=0)
        assert not torch.allclose(u.hessian, u.fisher)

    def test_hessian_is_computed_when_first_read(self, monkeypatch):
        """The covariance needs the Fisher information only: the second derivative is taken
        when ``u.hessian`` is read, once."""
        import nbfunc.uncertainty as module

        calls = []
        original = module.poisson_hessian
        monkeypatch.setattr(module, "poisson_hessian",
                            lambda *a: calls.append(1) or original(*a))
        counts = torch.poisson(spot(SPOT_TRUTH), generator=torch.Generator().manual_seed(1))
        u = uncertainty(spot, counts, SPOT_TRUTH)
        assert calls == []
        first = u.hessian
        assert calls == [1] and u.hessian is first
        torch.testing.assert_close(hessian_covariance(u).covariance,
                                   torch.linalg.inv(first), rtol=1e-9, atol=0)

    def test_masked_and_zero_mu_pixels_are_left_out(self):
        mu = linear({"a": f64(100.0), "b": f64(20.0)})
        mask = torch.ones_like(mu, dtype=torch.bool)
        mask[:10] = False
        garbage = mu.clone()
        garbage[:10] = 1e9
        masked = uncertainty(linear, garbage, {"a": 100.0, "b": 20.0}, mask=mask)
        design = torch.stack([X, torch.ones_like(X)], 1)[10:]
        fisher = (design / mu[10:, None]).T @ design
        torch.testing.assert_close(masked.fisher, fisher, rtol=1e-12, atol=0)
        # mu = 0 at x = 0 (b = 0): that pixel is excluded, even with counts there
        u = uncertainty(linear, torch.full_like(mu, 5.0), {"a": 100.0, "b": 0.0})
        assert torch.isfinite(u.fisher).all() and torch.isfinite(u.hessian).all()

    def test_multi_element_leaf_counts_as_its_elements(self):
        model = lambda v: v["ab"][0] * X + v["ab"][1]
        u = uncertainty(model, model({"ab": f64([100.0, 20.0])}), {"ab": [100.0, 20.0]})
        ref = uncertainty(linear, linear({"a": f64(100.0), "b": f64(20.0)}), {"a": 100.0, "b": 20.0})
        assert u.names == ("ab[0]", "ab[1]")
        torch.testing.assert_close(u.covariance, ref.covariance)


class TestPriors:
    def test_prior_adds_precision_to_the_fisher(self):
        mu = linear({"a": f64(100.0), "b": f64(20.0)})
        plain = uncertainty(linear, mu, {"a": 100.0, "b": 20.0})
        u = uncertainty(linear, mu, {"a": 100.0, "b": 20.0}, priors={"b": 0.5})
        expected = torch.linalg.inv(plain.fisher + torch.diag(f64([0.0, 4.0])))
        torch.testing.assert_close(u.covariance, expected, rtol=1e-10, atol=0)
        torch.testing.assert_close(u.fisher, plain.fisher)          # the data part is unchanged
        torch.testing.assert_close(u.prior_precision, f64([0.0, 4.0]))
        assert float(u.std[1]) < 0.5

    def test_prior_on_a_whole_leaf_applies_to_each_element(self, tiny):
        mu = render(tiny)
        u = uncertainty(tiny, mu, ["crystal.misset", "detector.distance"], priors={"crystal.misset": 0.1})
        torch.testing.assert_close(u.prior_precision, f64([100.0, 100.0, 100.0, 0.0]))

    def test_prior_on_a_name_that_is_not_free_is_an_error(self):
        with pytest.raises(KeyError, match="not a free parameter"):
            uncertainty(linear, linear({"a": f64(1.0), "b": f64(1.0)}), {"a": 1.0, "b": 1.0},
                        priors={"c": 1.0})
        with pytest.raises(ValueError, match="must be > 0"):
            uncertainty(linear, linear({"a": f64(1.0), "b": f64(1.0)}), {"a": 1.0, "b": 1.0},
                        priors={"a": 0.0})


class TestDegenerate:
    def test_perfectly_correlated_pair_warns_names_it_and_gives_no_nan(self):
        model = lambda v: (v["a"] + v["b"]) * X + v["c"]
        mu = model({"a": f64(50.0), "b": f64(50.0), "c": f64(20.0)})
        with pytest.warns(DegenerateInformationWarning) as record:
            u = uncertainty(model, mu, {"a": 50.0, "b": 50.0, "c": 20.0})
        message = str(record[0].message)
        assert "singular" in message and "condition number inf" in message
        assert "a" in message and "b" in message and "priors=" in message
        assert u.condition_number == float("inf")
        assert len(u.degenerate) == 1
        combo = u.degenerate[0]
        assert set(combo.shifts) == {"a", "b"}
        assert combo.shifts["a"] == pytest.approx(-combo.shifts["b"], rel=1e-6)  # a + b fixed
        for t in (u.covariance, u.std, u.correlation, u.fisher, u.hessian):
            assert not torch.isnan(t).any()
        assert torch.isinf(u.std[:2]).all() and torch.isfinite(u.std[2])
        assert float(u.correlation[0, 1]) == pytest.approx(-1.0)    # limit of a vanishing prior
        assert float(u.correlation[0, 2]) == 0.0
        # c alone is determined: its std is that of the model mu = s x + c
        ref = uncertainty(linear, mu, {"a": 100.0, "b": 20.0})
        assert float(u.std[2]) == pytest.approx(float(ref.std[1]), rel=1e-8)
        assert "degenerate" in summary_table(u)

    def test_a_prior_lifts_the_degeneracy(self):
        model = lambda v: (v["a"] + v["b"]) * X + v["c"]
        mu = model({"a": f64(50.0), "b": f64(50.0), "c": f64(20.0)})
        ctx = no_warnings()
        try:
            u = uncertainty(model, mu, {"a": 50.0, "b": 50.0, "c": 20.0}, priors={"a": 1.0})
        finally:
            ctx.__exit__(None, None, None)
        assert float(u.std[0]) == pytest.approx(1.0, rel=1e-6)
        assert torch.isfinite(u.covariance).all()

    def test_ill_conditioned_warns_but_stays_finite(self):
        model = lambda v: v["a"] * X + v["b"] * (X + 3e-4 * X**2) + 20.0
        mu = model({"a": f64(50.0), "b": f64(50.0)})
        with pytest.warns(DegenerateInformationWarning, match="ill-conditioned"):
            u = uncertainty(model, mu, {"a": 50.0, "b": 50.0})
        assert 1e8 < u.condition_number < float("inf")
        assert torch.isfinite(u.std).all()

    def test_fluence_and_structure_factor_are_degenerate_without_background(self):
        p = tree("-cell 50 60 70 85 95 100 -misset 10 -20 30 -default_F 100 -N 5 -lambda 1 "
                 "-distance 50 -pixel 0.5 -detpixels 6 -oversample 1")
        mu = render(p)
        with pytest.warns(DegenerateInformationWarning, match="beam.fluence") as record:
            u = uncertainty(p, mu, ["beam.fluence", "crystal.default_F", "detector.distance"])
        assert "crystal.default_F" in str(record[0].message)
        assert not torch.isnan(u.covariance).any() and not torch.isnan(u.correlation).any()
        assert set(u.degenerate[0].shifts) == {"beam.fluence", "crystal.default_F"}
        # mu ~ fluence F^2: the flat direction is d(fluence)/fluence = -2 dF/F
        shifts = u.degenerate[0].shifts
        ratio = (shifts["beam.fluence"] / float(p.beam.fluence)) / (shifts["crystal.default_F"] / 100.0)
        assert ratio == pytest.approx(-2.0, rel=1e-4)


class TestTree:
    FREE = ["detector.distance", "detector.beam_center_f", "crystal.cell_a", "crystal.misset"]

    def test_fisher_equals_jt_w_j_with_finite_difference_jacobian(self, tiny):
        mu = render(tiny)
        u = uncertainty(tiny, mu, self.FREE)
        columns = []
        for path in self.FREE:
            leaf = get_leaf(tiny, path)
            flat = leaf.reshape(-1)
            for i in range(flat.numel()):
                step = 1e-5 * max(1.0, abs(float(flat[i])))
                delta = torch.zeros_like(flat)
                delta[i] = step
                plus = render(replace_leaves(tiny, {path: (flat + delta).reshape(leaf.shape)}))
                minus = render(replace_leaves(tiny, {path: (flat - delta).reshape(leaf.shape)}))
                columns.append(((plus - minus) / (2 * step)).reshape(-1))
        jac = torch.stack(columns, 1)
        fisher = (jac / mu.reshape(-1, 1)).T @ jac
        scale = fisher.diagonal().sqrt()
        scaled = lambda m: m / (scale[:, None] * scale[None, :])
        torch.testing.assert_close(scaled(u.fisher), scaled(fisher), rtol=0, atol=1e-5)
        assert u.names[-3:] == ("crystal.misset[0]", "crystal.misset[1]", "crystal.misset[2]")
        assert u.units == ("mm", "mm", "Angstrom", "deg", "deg", "deg")

    def test_observed_and_expected_information_agree_as_counts_grow(self):
        """At the truth H - F = sum (1 - k/mu) d2mu has mean 0 and shrinks like 1/sqrt(counts).

        Without water, mu is proportional to the fluence, so raising it raises the counts
        and nothing else.
        """
        dry = tree(TINY.replace("-water 0.01", ""))
        generator = torch.Generator().manual_seed(7)
        gaps = []
        for factor in (1.0, 1e2, 1e4):
            p = replace_leaves(dry, {"beam.fluence": dry.beam.fluence * factor})
            mu = render(p)
            counts = torch.poisson(mu, generator=generator)
            u = uncertainty(p, counts, self.FREE)
            scaled, _ = unit_diagonal(u.fisher)
            d = u.fisher.diagonal().sqrt()
            gaps.append(float((u.hessian / (d[:, None] * d[None, :]) - scaled).abs().max()))
        assert gaps[2] < gaps[1] < gaps[0], gaps
        assert gaps[2] < gaps[0] / 10 and gaps[2] < 0.02, gaps
        torch.testing.assert_close(hessian_covariance(u).std, u.std, rtol=0.03, atol=0)

    def test_tiles_roi_and_mask(self, tiny):
        mu = render(tiny)
        one = uncertainty(tiny, mu, self.FREE)
        many = uncertainty(tiny, mu, self.FREE, tile_pixels=7)
        assert len(poisson_problem(tiny, mu, self.FREE, tile_pixels=7).tiles) == 6
        torch.testing.assert_close(many.fisher, one.fisher, rtol=1e-12, atol=0)
        torch.testing.assert_close(many.hessian, one.hessian, rtol=1e-10, atol=1e-10 * float(one.hessian.abs().max()))
        mask = torch.ones(6, 6, dtype=torch.bool)
        mask[:, 3:] = False
        masked = uncertainty(tiny, mu, self.FREE, mask=mask)
        roi = tiny.model_copy(update={"sampling": tiny.sampling.model_copy(update={"roi": (0, 2, 0, 5)})})
        by_roi = uncertainty(roi, mu, self.FREE, tile_pixels=5)
        torch.testing.assert_close(masked.fisher, by_roi.fisher, rtol=1e-12, atol=0)
        assert float(masked.fisher[0, 0]) < float(one.fisher[0, 0])

    def test_input_errors_say_what_to_do(self, tiny):
        mu = render(tiny)
        with pytest.raises(KeyError, match="crystal.cell_a"):
            uncertainty(tiny, mu, ["crystal.cel_a"])
        with pytest.raises(ValueError, match="3 elements"):
            uncertainty(tiny, mu, ["crystal.misset[3]"])
        with pytest.raises(ValueError, match="more than once"):
            uncertainty(tiny, mu, ["crystal.misset", "crystal.misset[1]"])
        with pytest.raises(ValueError, match="expected \\(spixels, fpixels\\)"):
            uncertainty(tiny, mu[:3], ["detector.distance"])
        with pytest.raises(ValueError, match="mask has shape"):
            uncertainty(tiny, mu, ["detector.distance"], mask=torch.ones(3, 3, dtype=torch.bool))
        with pytest.raises(TypeError, match="dict"):
            uncertainty(linear, mu, ["a"])


def test_invert_information_of_a_zero_information_parameter():
    info = f64([[4.0, 0.0], [0.0, 0.0]])
    inv = invert_information(info)
    assert float(inv.std[0]) == pytest.approx(0.5)
    assert float(inv.std[1]) == float("inf")
    assert not torch.isnan(inv.correlation).any()
    assert inv.condition_number == float("inf")


def test_standard_errors_of_a_stack_equal_invert_information():
    """`standard_errors` of stacked matrices, well conditioned, rank-deficient and with a zero
    parameter, equals `invert_information`'s ``std`` of each (inf at the same places)."""
    g = torch.Generator().manual_seed(1)
    stack = []
    for k in range(12):
        a = torch.randn(7, 7, generator=g, dtype=torch.float64)
        m = a @ a.T * 10.0 ** (4 * torch.rand((), generator=g, dtype=torch.float64) - 2)
        if k % 4 == 0:  # rank 3: a line and two unit directions
            v = torch.randn(7, 1, generator=g, dtype=torch.float64)
            m = v @ v.T + torch.diag(f64([1.0, 1.0, 0, 0, 0, 0, 0]))
        if k % 5 == 1:
            m[3], m[:, 3] = 0.0, 0.0
        stack.append(m)
    got = standard_errors(torch.stack(stack))
    expected = torch.stack([invert_information(m).std for m in stack])
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(got), finite) and int((~finite).sum()) > 0
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-12, atol=0)
