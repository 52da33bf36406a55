"""Second derivatives: ``torch.func.hessian`` of a Poisson loss and grad of grad."""
from __future__ import annotations

import copy

import pytest
import torch

import nbfunc
from _transforms_support import assert_close_scaled, eager_mode, leaf_step, poisson_nll

f64 = lambda x: torch.tensor(x, dtype=torch.float64)
SELECTED = ("detector.distance", "crystal.cell_a", "crystal.misset", "beam.wavelength")


@pytest.fixture(scope="module")
def problem(tiny):
    """A target image from a slightly different crystal, and the loss of a dict of leaves."""
    with torch.no_grad(), eager_mode():
        target = nbfunc.simulate(nbfunc.replace_leaves(tiny, {"crystal.cell_a": f64(50.3)}))

    def loss(leaves: dict) -> torch.Tensor:
        return poisson_nll(nbfunc.simulate(nbfunc.replace_leaves(tiny, leaves)), target)

    start = {path: nbfunc.tree.get_leaf(tiny, path) for path in SELECTED}
    return loss, start, target


def as_matrix(hessian: dict, leaves: dict) -> torch.Tensor:
    """Assemble the dict-of-dicts Hessian into one (n, n) matrix in the order of ``leaves``."""
    rows = []
    for a, va in leaves.items():
        row = [hessian[a][b].reshape(va.numel(), vb.numel()) for b, vb in leaves.items()]
        rows.append(torch.cat(row, 1))
    return torch.cat(rows, 0)


def test_hessian_of_selected_leaves_is_symmetric(problem):
    loss, start, _ = problem
    hessian = torch.func.hessian(loss)(start)
    assert set(hessian) == set(SELECTED)
    assert hessian["crystal.misset"]["detector.distance"].shape == (3,)
    assert hessian["crystal.misset"]["crystal.misset"].shape == (3, 3)
    matrix = as_matrix(hessian, start)
    assert matrix.shape == (6, 6)
    assert torch.isfinite(matrix).all()
    # leaves have different units: compare in units scaled by each leaf's step
    scale = torch.cat([leaf_step(v).reshape(-1) for v in start.values()]) / 1e-6
    scaled = matrix * scale[:, None] * scale[None, :]
    assert_close_scaled(scaled, scaled.T, 1e-9, "symmetry")


def test_hessian_matches_jacrev_of_grad_and_finite_differences(problem, eager):
    loss, start, _ = problem
    hessian = torch.func.hessian(loss)(start)
    mixed = torch.func.jacrev(torch.func.grad(loss))(start)
    for a in start:
        for b in start:
            assert_close_scaled(mixed[a][b], hessian[a][b], 1e-8, f"{a}, {b}", atol=1e-300)
    grad = torch.func.grad(loss)
    for b in ("detector.distance", "crystal.misset"):
        value = start[b].reshape(-1)
        steps = leaf_step(value)
        for j in range(value.numel()):
            delta = torch.zeros_like(value)
            delta[j] = steps[j]
            plus = grad({**start, b: (value + delta).reshape(start[b].shape)})
            minus = grad({**start, b: (value - delta).reshape(start[b].shape)})
            for a in start:
                numeric = (plus[a] - minus[a]) / (2 * steps[j])
                column = hessian[a][b].reshape(start[a].shape + (-1,))[..., j]
                assert_close_scaled(column, numeric, 1e-5, f"d2/d{a} d{b}[{j}]",
                                    atol=1e-8 * float(column.abs().max()))


def test_hessian_of_a_subtree(tiny, eager):
    """The beam sub-tree as the argument: the Hessian is a Beam of Beams."""
    target = nbfunc.simulate(nbfunc.replace_leaves(tiny, {"beam.wavelength": f64(1.002)})).detach()

    def loss(beam: nbfunc.Beam) -> torch.Tensor:
        return poisson_nll(nbfunc.simulate(tiny.model_copy(update={"beam": beam})), target)

    hessian = torch.func.hessian(loss)(tiny.beam)
    assert isinstance(hessian, nbfunc.Beam)
    assert isinstance(hessian.wavelength, nbfunc.Beam)
    assert isinstance(hessian.sources.hdivrange, nbfunc.Beam)
    ww = hessian.wavelength.wavelength
    assert ww.shape == () and ww > 0        # a minimum in wavelength near the target
    cross = (hessian.wavelength.kahn_factor, hessian.kahn_factor.wavelength)
    torch.testing.assert_close(cross[0], cross[1], rtol=1e-9, atol=0)
    cross = (hessian.wavelength.fluence, hessian.fluence.wavelength)
    torch.testing.assert_close(cross[0], cross[1], rtol=1e-9, atol=0)


@pytest.mark.parametrize("path", ["detector.distance", "crystal.cell_b", "crystal.Na", "beam.wavelength"])
def test_grad_of_grad_equals_finite_difference_of_grad(tiny, path, eager):
    """d2 image_sum / d x2 for one scalar leaf: ``grad(grad(f))`` against central differences of ``grad(f)``."""

    def total(x):
        return nbfunc.simulate(nbfunc.replace_leaves(tiny, {path: x})).sum()

    x0 = nbfunc.tree.get_leaf(tiny, path)
    second = torch.func.grad(torch.func.grad(total))(x0)
    step = leaf_step(x0)
    first = torch.func.grad(total)
    numeric = (first(x0 + step) - first(x0 - step)) / (2 * step)
    assert torch.isfinite(second)
    assert_close_scaled(second, numeric, 1e-5, path)
    autograd_second = torch.autograd.functional.hessian(total, x0)
    torch.testing.assert_close(autograd_second, second, rtol=1e-9, atol=0)


HVP_CASES = {"one orientation": "", "polarized": "-polar 0.5",
             "mosaic and phi": "-mosaic 0.5 -mosaic_dom 3 -phi 10 -osc 6 -phisteps 2",
             "sources": "-sourcefile {sources}", "point pixel": "-point_pixel -oversample 2",
             "water": "-water 10"}
"""Plain configurations whose Hessians with respect to crystal leaves take the partial sums'
second-order route (`PartialsRules.vjp_along`)."""


def _second_order(patch: pytest.MonkeyPatch, through_sums: bool):
    """Fresh partial-sum rules (no derived function cached from another test), with their
    second-order route on or off; returns a list that counts the route's calls."""
    from nbfunc import render

    patch.setattr(render, "_PARTIALS", {key: ({}, copy.copy(rules))
                                        for key, (_, rules) in render._PARTIALS.items()})
    calls = []
    if through_sums:
        original = render.PartialsRules.vjp_along

        def counted(self, *args):
            calls.append(1)
            return original(self, *args)
        patch.setattr(render.PartialsRules, "vjp_along", counted)
    else:
        patch.setattr(render.PartialsRules, "vjp_along_supported", lambda self, *a: False)
    return calls


@pytest.mark.parametrize("case", HVP_CASES)
def test_crystal_hessian_through_the_partial_sums(case, input_files, eager):
    """The Hessian of a Poisson loss with respect to cell, misset, N and fluence (and mosaic
    spread and phi start), and the derivative of the whole tree's gradient along the cell and N
    (every input's row of the rules' VJP moves), through the partial sums' tangents equal those
    derived from the kernel."""
    from _transforms_support import make_params
    from torch.utils._pytree import tree_leaves

    tree = make_params(HVP_CASES[case], input_files)
    target = nbfunc.simulate(nbfunc.replace_leaves(tree, {"crystal.cell_a": f64(50.3)})).detach()
    names = ("crystal.cell_a", "crystal.cell_gamma", "crystal.misset", "crystal.Nb", "beam.fluence")
    if case == "mosaic and phi":
        names += ("crystal.mosaic_spread", "crystal.phi_start")
    start = {n: nbfunc.tree.get_leaf(tree, n) for n in names}

    def loss(leaves):
        return poisson_nll(nbfunc.simulate(nbfunc.replace_leaves(tree, leaves)), target)

    c0, nc0 = start["crystal.cell_gamma"], tree.crystal.Nc

    def moved_gradient(c):  # along the cell and Nc together
        grad = torch.func.grad(lambda q: poisson_nll(nbfunc.simulate(q), target))
        return grad(nbfunc.replace_leaves(tree, {"crystal.cell_gamma": c,
                                                 "crystal.Nc": nc0 + 0.1 * (c - c0)}))

    results = {}
    for through_sums in (True, False):
        with pytest.MonkeyPatch.context() as patch:
            calls = _second_order(patch, through_sums)
            hessian = as_matrix(torch.func.hessian(loss)(start), start)
            n_calls = [len(calls)]
            mixed = tree_leaves(torch.func.jacfwd(moved_gradient)(c0))
            results[through_sums] = hessian, mixed, n_calls + [len(calls) - n_calls[0]]
    (fast, fast_mixed, n_calls), (derived, derived_mixed, _) = results[True], results[False]
    assert min(n_calls) > 0, f"the second-order route was not taken (calls {n_calls})"
    assert torch.isfinite(fast).all()
    assert_close_scaled(fast, derived, 1e-11, "Hessian")
    assert len(fast_mixed) == len(derived_mixed)
    # some leaves' derivatives are differences of much larger per-pixel terms: G enters through
    # the scale and through the water background over G, whose water parts cancel. Their
    # rounding is that of the largest terms, whose size in units of the leaf is the largest
    # relative sensitivity x d/dx over the leaves (``terms``) over the leaf's value; allowed:
    # 1e-14 of it (some 50 ulps)
    values = tree_leaves(tree)
    sensitivities = [x.abs() * b.abs() for x, b in zip(values, derived_mixed)
                     if isinstance(x, torch.Tensor) and x.is_floating_point() and b.numel()]
    terms = max(float(x.max()) for x in sensitivities)
    for x, a, b in zip(values, fast_mixed, derived_mixed):
        size = float(x.abs().max()) if isinstance(x, torch.Tensor) and x.numel() else 0.0
        rounding = 1e-14 * terms / size if size > 0 else 0.0
        assert_close_scaled(a, b, 1e-11, "d(gradient) along cell_gamma and Nc",
                            atol=max(rounding, 1e-300))
