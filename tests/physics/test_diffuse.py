"""diffBragg's diffuse scattering (``crystal.diffuse``) and the per-shot B factor
(``crystal.bfactor``) through the renderer: defaults unchanged bit for bit, the Laue operators
against gemmi, the formula against a direct evaluation, its limits and symmetry, the B factor
as scaled structure factors, derivatives to second order, refusals, and a small pull test.

Images are 6 x 6 to 16 x 16 pixels in float64, rendered eagerly.
"""
from __future__ import annotations

import math

import gemmi
import numpy as np
import pytest
import torch

import nbfunc
from nbfunc import Params
from nbfunc.cli.derive import params_from_args
from nbfunc.crystal import oriented_cell
from nbfunc.diffuse import (LAUE_GROUPS, diffuse_forms, diffuse_intensity, laue_operators,
                            operator_tensor)
from nbfunc.params import Crystal
from nbfunc.render import make_plan, partials_apply
from nbfunc.replicas import fit_replicas, poisson_replicas, pull_summary
from nbfunc.tree import get_leaf, replace_leaves
from nbfunc.uncertainty import uncertainty

from _physics_support import central, close

D = torch.float64
BASE = ("-cell 50 60 70 85 95 100 -misset 10 -20 30 -default_F 100 -N 5 -lambda 1 "
        "-distance 50 -pixel 0.5 -detpixels 8 -oversample 1")
GAMMA = [3.0, 4.0, 2.5]
SIGMA = [0.3, 0.5, 0.4]
GEMMI_NAMES = dict(zip(LAUE_GROUPS, ["P -1", "P 1 1 2/m", "P 1 2/m 1", "P 2/m 1 1", "P m m m",
                                     "P 4/m", "P 4/m m m", "P -3", "P -3 m 1", "P -3 1 m",
                                     "P 6/m", "P 6/m m m", "P m -3", "P m -3 m"]))


@pytest.fixture(autouse=True)
def eager():
    with torch.compiler.set_stance("force_eager"):
        yield


def tree(extra: str = "", base: str = BASE, **crystal) -> Params:
    """A validated tree from command-line flags with crystal fields replaced."""
    p = params_from_args((base + " " + extra).split())
    values = {**dict(p.crystal), **{k: torch.as_tensor(v, dtype=D) if isinstance(v, (list, float))
                                    else v for k, v in crystal.items()}}
    return Params(**{**dict(p), "crystal": Crystal(**values)})


def diffuse_tree(extra: str = "", group: str = "P-1", **crystal) -> Params:
    return tree(extra, diffuse=True, diffuse_gamma=GAMMA, diffuse_sigma=SIGMA,
                diffuse_laue_group=group, **crystal)




def reference_diffuse(hkl, recip, gamma, sigma, ops):
    """diffBragg's ``calc_diffuse_at_hkl`` (stencil 0) written out with numpy, one point:
    ``mean_L E exp(-E) 8 pi det(G) / (1 + 4 pi^2 |G A^-1 L dH|^2)^2``, ``E = 4 pi^2 Q0^T U Q0``."""
    h = np.asarray(hkl, dtype=float)
    h0 = np.ceil(h - 0.5)
    ainv = np.asarray(recip).T                   # columns a*, b*, c* (1/Angstrom)
    g, u = np.diag(gamma), np.diag(np.square(sigma))
    total = 0.0
    for op in ops:
        q0 = ainv @ op @ h0
        exparg = 4 * math.pi**2 * q0 @ u @ q0
        v = g @ (ainv @ op @ (h - h0))
        total += exparg * math.exp(-exparg) * 8 * math.pi * np.linalg.det(g) / (1 + 4 * math.pi**2 * v @ v) ** 2
    return total / len(ops)


def ours(hkl, recip, gamma, sigma, group):
    """`nbfunc.diffuse.diffuse_intensity` at Miller indices ``hkl`` (n, 3)."""
    hkl = torch.as_tensor(hkl, dtype=D)
    h0 = torch.ceil(hkl - 0.5)
    forms = diffuse_forms(recip, torch.as_tensor(gamma, dtype=D), torch.as_tensor(sigma, dtype=D),
                          operator_tensor(group, recip))
    return diffuse_intensity(h0.unbind(-1), (hkl - h0).unbind(-1), *forms)


# --------------------------------------------------------------------------------------------
class TestDefaults:
    @pytest.mark.parametrize("extra", ["", "-gauss_xtal -fudge 2", "-round_xtal -water 10",
                                       "-mosaic 0.5 -mosaic_dom 3 -oversample 2"])
    def test_off_is_bit_identical_whatever_the_unused_values(self, extra):
        """Diffuse and B off (the defaults): the image is that of a tree without the fields,
        bit for bit, even with other values of the unused leaves and Laue group."""
        plain = nbfunc.simulate(tree(extra))
        assert plain.max() > 0
        other = tree(extra, diffuse_gamma=[7.0, 8.0, 9.0], diffuse_sigma=[1.0, 0.0, 2.0],
                     diffuse_laue_group="Pm-3m")
        assert torch.equal(nbfunc.simulate(other), plain)

    def test_b_zero_applied_is_bit_identical(self):
        """bfactor on with B = 0 multiplies every term by exp(-0) = 1 exactly."""
        p = tree("-gauss_xtal")
        assert torch.equal(nbfunc.simulate(tree("-gauss_xtal", bfactor=True)), nbfunc.simulate(p))

    def test_plain_configuration_only_without_diffuse_and_b(self):
        for p, expected in ((tree(), True), (diffuse_tree(), False), (tree(bfactor=True), False)):
            plan, pixels = make_plan(p)
            assert partials_apply(plan, len(pixels), 8, False) is expected
        plan, _ = make_plan(diffuse_tree(group="P6/mmm"))
        assert plan.diffuse_ops == 12


# --------------------------------------------------------------------------------------------
class TestLaueOperators:
    @pytest.mark.parametrize("symbol", LAUE_GROUPS)
    def test_operators_are_gemmis_proper_rotations_on_miller_indices(self, symbol):
        """The closure of our generators equals gemmi's proper rotations of the group,
        transposed (a direct-space rotation R maps H to R^T H)."""
        group = gemmi.find_spacegroup_by_name(GEMMI_NAMES[symbol])
        expected = set()
        for op in group.operations().sym_ops:
            rot = np.array(op.rot) // gemmi.Op.DEN
            if round(np.linalg.det(rot)) == 1:
                expected.add(tuple(map(tuple, rot.T.tolist())))
        ops = laue_operators(symbol)
        assert ops[0] == ((1, 0, 0), (0, 1, 0), (0, 0, 1))
        assert len(set(ops)) == len(ops) and set(ops) == expected

    @pytest.mark.parametrize("symbol, cell", [("P6/mmm", (40, 40, 70, 90, 90, 120)),
                                              ("P-3m1", (40, 40, 70, 90, 90, 120)),
                                              ("P4/mmm", (40, 40, 70, 90, 90, 90)),
                                              ("Pm-3m", (40, 40, 40, 90, 90, 90))])
    def test_operators_keep_the_reciprocal_metric(self, symbol, cell):
        c = Crystal(**dict(zip(("cell_a", "cell_b", "cell_c", "cell_alpha", "cell_beta", "cell_gamma"), cell)),
                    misset=[11.0, -7.0, 23.0])
        _, recip = oriented_cell(c)
        metric = recip @ recip.T
        ops = operator_tensor(symbol, recip)
        torch.testing.assert_close(ops.transpose(-1, -2) @ metric @ ops, metric.expand(len(ops), 3, 3),
                                   rtol=1e-12, atol=1e-16)


# --------------------------------------------------------------------------------------------
class TestDiffuseFormula:
    HKL = [[0.3, -1.2, 2.45], [3.1, 0.0, -0.4], [-2.6, 4.49, 1.05], [1.0, 1.0, 1.0]]

    @pytest.mark.parametrize("symbol", ["P-1", "P4/mmm", "P6/mmm", "Pm-3"])
    def test_equals_diffbraggs_formula_written_out(self, symbol):
        group = gemmi.find_spacegroup_by_name(GEMMI_NAMES[symbol])
        ops = [(np.array(op.rot) // gemmi.Op.DEN).T for op in group.operations().sym_ops
               if round(np.linalg.det(np.array(op.rot))) > 0]
        _, recip = oriented_cell(tree().crystal)
        got = ours(self.HKL, recip, GAMMA, SIGMA, symbol)
        want = torch.tensor([reference_diffuse(h, recip.numpy(), GAMMA, SIGMA, ops) for h in self.HKL], dtype=D)
        assert float(want.min()) > 0
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)

    @pytest.mark.parametrize("symbol, cell", [("P4/mmm", (40, 40, 70, 90, 90, 90)),
                                              ("P6/mmm", (40, 40, 70, 90, 90, 120))])
    def test_symmetrised_term_has_the_laue_symmetry(self, symbol, cell):
        """With anisotropic gamma and sigma, I_D(L H) = I_D(H) for every operator L of the
        group after symmetrisation, and not without it (P-1). The points lie within 0.2 of a
        reflection in h and k, so that L maps the nearest reflection to the nearest reflection
        (rounding to the nearest index is not equivariant under hexagonal operators far from
        it; diffBragg rounds the same way)."""
        c = Crystal(**dict(zip(("cell_a", "cell_b", "cell_c", "cell_alpha", "cell_beta", "cell_gamma"), cell)))
        _, recip = oriented_cell(c)
        hkl = torch.tensor([[0.2, -1.15, 2.45], [3.1, 0.0, -0.4], [-2.85, 4.1, 1.05], [1.0, 1.0, 1.0]], dtype=D)
        ops = operator_tensor(symbol, recip)
        base = ours(hkl, recip, GAMMA, SIGMA, symbol)
        moved = [ours(hkl @ op.T, recip, GAMMA, SIGMA, symbol) for op in ops]
        for m in moved:
            torch.testing.assert_close(m, base, rtol=1e-12, atol=0)
        plain = ours(hkl, recip, GAMMA, SIGMA, "P-1")
        assert max(float((ours(hkl @ op.T, recip, GAMMA, SIGMA, "P-1") - plain).abs().max() / plain.max())
                   for op in ops) > 1e-3

    def test_isotropic_peak_width_and_sigma_optimum(self):
        """Isotropic gamma, sigma: at dH = 0 the term is 8 pi gamma^3 E exp(-E) with
        E = 4 pi^2 sigma^2 |Q0|^2; it halves at |dQ| = sqrt(sqrt(2) - 1)/(2 pi gamma) (a wider
        peak for a smaller gamma); over sigma it peaks at E = 1; sigma = 0 leaves nothing."""
        _, recip = oriented_cell(tree().crystal)
        h0 = torch.tensor([2.0, -1.0, 3.0], dtype=D)
        q0 = float(torch.linalg.vector_norm(recip.T @ h0))
        for gamma in (20.0, 60.0):
            sigma = 0.35
            e = 4 * math.pi**2 * sigma**2 * q0**2
            peak = ours(h0[None], recip, [gamma] * 3, [sigma] * 3, "P-1")
            torch.testing.assert_close(peak, torch.tensor([8 * math.pi * gamma**3 * e * math.exp(-e)], dtype=D),
                                       rtol=1e-13, atol=0)
            # the fractional offset along h that moves Q by dq along a*: dh = dq / |a*|
            dq = math.sqrt(math.sqrt(2) - 1) / (2 * math.pi * gamma)
            step = dq / float(torch.linalg.vector_norm(recip[0]))
            assert step < 0.5
            half = ours((h0 + torch.tensor([step, 0, 0], dtype=D))[None], recip, [gamma] * 3, [sigma] * 3, "P-1")
            torch.testing.assert_close(half, peak / 2, rtol=1e-12, atol=0)
        best = 1 / (2 * math.pi * q0)
        values = [float(ours(h0[None], recip, [3.0] * 3, [s] * 3, "P-1")) for s in (0.9 * best, best, 1.1 * best)]
        assert values[1] > values[0] and values[1] > values[2]
        assert float(ours(h0[None], recip, [3.0] * 3, [0.0] * 3, "P-1")) == 0.0

    def test_render_adds_fcell_squared_times_the_term(self):
        """Diffuse on: image - image(off) = scale * F^2 * I_D summed over the pixel's
        evaluations; with sigma = 0 the term vanishes and the images agree to round-off."""
        off = nbfunc.simulate(tree())
        on = nbfunc.simulate(diffuse_tree(group="Pmmm"))
        assert bool((on >= off).all()) and float((on - off).max()) > 1e-3 * float(off.max())
        none = nbfunc.simulate(tree(diffuse=True, diffuse_sigma=[0.0, 0.0, 0.0]))
        torch.testing.assert_close(none, off, rtol=1e-14, atol=0)
        # Bragg and diffuse terms both scale with F_cell^2
        scaled = nbfunc.simulate(diffuse_tree(group="Pmmm", default_F=100.0 * math.sqrt(2)))
        torch.testing.assert_close(scaled, 2 * on, rtol=1e-13, atol=0)

    def test_float32_is_as_close_to_float64_as_the_plain_render(self):
        """float32 renders with diffuse and B differ from float64 no more than the plain
        render does (its error, ~2e-5 relative here, is the lattice sum's round-off)."""
        def error(p):
            ref = nbfunc.simulate(p)
            return float((nbfunc.simulate(p.to(torch.float32)).double() - ref).abs().max() / ref.max())
        plain = error(tree())
        assert error(diffuse_tree(group="P6/mmm", bfactor=True, B=12.0)) <= 2 * plain


# --------------------------------------------------------------------------------------------
class TestBFactor:
    def hkl_tree(self, fhkl=None, **crystal):
        """Structure factors on a grid covering every reflection the detector reaches."""
        if fhkl is None:
            fhkl = 50 + 100 * torch.rand(17, 17, 17, generator=torch.Generator().manual_seed(3), dtype=D)
        return tree(fhkl=fhkl, hkl_origin=(-8, -8, -8), **crystal), fhkl

    @pytest.mark.parametrize("diffuse", [False, True])
    def test_b_equals_structure_factors_scaled_by_hand(self, diffuse):
        """B multiplies each term by exp(-2 B stol^2) at the nearest reflection: the render
        equals one with every F(hkl) times exp(-B stol_hkl^2), stol = |Q_hkl|/2."""
        extra = dict(diffuse=True, diffuse_gamma=GAMMA, diffuse_sigma=SIGMA) if diffuse else {}
        b = 30.0
        p, fhkl = self.hkl_tree(bfactor=True, B=b, **extra)
        _, recip = oriented_cell(p.crystal)
        grid = torch.stack(torch.meshgrid(*(torch.arange(-8, 9, dtype=D),) * 3, indexing="ij"), -1)
        stol_sq = (grid @ recip).pow(2).sum(-1) / 4
        scaled, _ = self.hkl_tree(fhkl=fhkl * torch.exp(-b * stol_sq), **extra)
        want = nbfunc.simulate(scaled)
        got = nbfunc.simulate(p)
        assert float(want.max()) > 0
        assert float((got - nbfunc.simulate(self.hkl_tree(**extra)[0])).abs().max()) > 1e-3 * float(got.max())
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------
PATHS = ("crystal.diffuse_gamma", "crystal.diffuse_sigma", "crystal.B")


@pytest.fixture(scope="module")
def differentiated():
    with torch.compiler.set_stance("force_eager"):
        p = diffuse_tree("-detpixels 6", group="P4/mmm", bfactor=True, B=20.0)
        return p, torch.func.jacfwd(nbfunc.simulate)(p), torch.func.jacrev(nbfunc.simulate)(p)


class TestDerivatives:
    @pytest.mark.parametrize("path", PATHS)
    def test_jacfwd_jacrev_match_central_differences(self, path, differentiated):
        p, jf, jr = differentiated
        fwd, rev = get_leaf(jf, path), get_leaf(jr, path)
        assert float(fwd.abs().max()) > 0
        close(rev, fwd, 1e-10, f"jacrev vs jacfwd {path}")
        close(fwd, central(nbfunc.simulate, p, path), 1e-7, f"jacfwd vs central {path}")

    def test_hessian_of_poisson_nll_matches_central_differences(self, differentiated):
        p = differentiated[0]
        observed = nbfunc.simulate(p).detach() * 1.3 + 0.5

        def nll(t: Params) -> torch.Tensor:
            mu = nbfunc.simulate(t)
            return (mu - observed * torch.log(mu)).sum()

        def grads(t: Params) -> torch.Tensor:
            g = torch.func.grad(nll)(t)
            return torch.cat([get_leaf(g, path).reshape(-1) for path in PATHS])

        chosen = {path: get_leaf(p, path) for path in PATHS}

        def loss(leaves):
            return nll(replace_leaves(p, leaves))

        hess = torch.func.hessian(loss)(chosen)
        for col in PATHS:
            analytic = torch.cat([hess[row][col].reshape(get_leaf(p, row).numel(), -1) for row in PATHS])
            numeric = central(grads, p, col, rel=1e-5).reshape(analytic.shape)
            close(analytic, numeric, 1e-6, f"hessian column {col}")


# --------------------------------------------------------------------------------------------
class TestRefusals:
    @pytest.mark.parametrize("field, value, words", [
        ("diffuse_gamma", [1.0, 0.0, 1.0], "> 0 (Angstrom)"),
        ("diffuse_gamma", [1.0, 1.0], "three finite numbers"),
        ("diffuse_sigma", [0.1, -0.1, 0.1], ">= 0 (Angstrom)"),
        ("diffuse_sigma", [0.1, float("nan"), 0.1], "finite"),
        ("B", -1.0, ">= 0 (Angstrom^2"),
        ("diffuse_laue_group", "P4/nmm", "Pm-3m"),
    ])
    def test_bad_values_are_refused_in_one_line(self, field, value, words):
        with pytest.raises(ValueError) as err:
            tree(**{field: value})
        line = str(err.value).splitlines()
        assert any(field in x and words in x for x in line), str(err.value)

    def test_b_without_the_switch_is_refused(self):
        with pytest.raises(ValueError, match=r"crystal.B = 5 .*set bfactor=True, or B = 0"):
            tree(B=5.0)

    def test_spaced_laue_symbol_is_accepted(self):
        assert tree(diffuse_laue_group="P 6/m m m").crystal.diffuse_laue_group == "P6/mmm"


# --------------------------------------------------------------------------------------------
PULL_BASE = ("-cell 30 34 38 88 92 95 -misset 5 15 -25 -default_F 30 -N 3 -lambda 1 "
             "-distance 20 -pixel 1 -detpixels 16 -oversample 1 -fluence 1e29")
PULL_FREE = ("crystal.diffuse_gamma[0]", "crystal.diffuse_sigma[0]", "crystal.B")


def test_pull_test_of_diffuse_and_b():
    """100 Poisson replicas (about 1e4 photons each), gamma_x, sigma_x and B free: the pulls of
    the Fisher errors have mean 0 and width 1 within 4 standard errors (|mean| < 4/sqrt(100),
    |width - 1| < 4/sqrt(2*99)). benchmarks/pull_models.py (case diffuse) runs the same with more replicas."""
    n = 100
    p = tree(base=PULL_BASE, diffuse=True, diffuse_gamma=[2.0, 2.5, 3.0], diffuse_sigma=[0.3, 0.3, 0.3],
             diffuse_laue_group="Pmmm", bfactor=True, B=25.0)
    mu = nbfunc.simulate(p)
    at_truth = uncertainty(p, mu, PULL_FREE)
    assert bool((at_truth.std / at_truth.values.abs() < 0.1).all()), at_truth.std
    generator = torch.Generator().manual_seed(4)
    counts = poisson_replicas(mu, n, generator)
    start = at_truth.values + at_truth.std * torch.randn(n, 3, generator=generator, dtype=D)
    fits = fit_replicas(p, counts, PULL_FREE, start)
    assert bool(fits.converged.all()), fits.iterations
    for name, s in pull_summary(fits.values, at_truth.values, fits.std, fits.names).items():
        assert abs(s["mean"]) < 4 / math.sqrt(n), (name, s)
        assert abs(s["width"] - 1) < 4 / math.sqrt(2 * (n - 1)), (name, s)


# --------------------------------------------------------------------------------------------
class TestRange:
    """Extreme diffuse_gamma and diffuse_sigma: a tree is refused in one line naming the leaf,
    its value and the fix, or renders a finite image (params._diffuse_bounds); the exponent cap
    in diffuse_intensity changes no value or derivative."""

    @staticmethod
    def capped_and_plain(dtype, x):
        """`diffuse_intensity` at one operator with ``E = x^2``, ``W = 0``, peak 1, and the
        uncapped ``E exp(-E) / (1 + W)^2`` written out, as functions of ``x``."""
        form = torch.zeros(1, 3, 3, dtype=dtype)
        form[0, 0, 0] = 1.0
        zero = torch.zeros_like(x)
        peak = torch.ones((), dtype=dtype)

        def capped(x):
            return diffuse_intensity((x, zero, zero), (zero, zero, zero), form, form, peak)

        def plain(x):
            e = x * x
            w = 1 + zero
            return e * torch.exp(-e) / (w * w)

        return capped, plain

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_cap_keeps_values_and_derivatives_bit_for_bit(self, dtype):
        """E from 0 to 1e6, through the underflow of exp(-E) (about 87-104 in float32, 708-746
        in float64) and past the cap 1e4."""
        e = torch.cat([torch.linspace(0, 20, 81), torch.linspace(80, 110, 61),
                       torch.linspace(700, 760, 121), torch.tensor([999.0, 1e4, 1.5e4, 1e6])])
        x = e.to(dtype).sqrt()
        capped, plain = self.capped_and_plain(dtype, x)
        assert torch.equal(capped(x), plain(x))
        assert float(capped(x).max()) > 0.3
        d_capped = torch.func.vmap(torch.func.grad(lambda t: capped(t[None])[0]))(x)
        d_plain = torch.func.vmap(torch.func.grad(lambda t: plain(t[None])[0]))(x)
        assert torch.equal(d_capped, d_plain) and float(d_plain.abs().max()) > 0.1

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_infinite_exponent_gives_the_limit_zero(self, dtype):
        """E = x^2 overflows to inf: the plain product is inf * 0 = nan, the capped one 0."""
        big = torch.finfo(dtype).max
        x = torch.tensor([1.0, big, big ** 0.5 * 2], dtype=dtype)
        capped, plain = self.capped_and_plain(dtype, x)
        assert bool((x * x)[1:].isinf().all()) and bool(plain(x)[1:].isnan().all())
        value = capped(x)
        assert torch.equal(value[1:], torch.zeros(2, dtype=dtype)) and float(value[0]) > 0
        grad = torch.func.vmap(torch.func.grad(lambda t: capped(t[None])[0]))(x)
        assert bool(torch.isfinite(grad).all())

    # the thresholds at which these trees rendered all-NaN images before the bounds: float64
    # gamma 1e103, sigma 1e160; float32 gamma 1e13, sigma 1e20
    SWEEPS = {
        (torch.float64, "diffuse_gamma"): [1e10, 1e50, 1e98, 1e100, 1e101, 1e102, 1e103, 1e150,
                                           1e200, (1e150, 1e-150, 1.0), (1e200, 1e-200, 1.0)],
        (torch.float64, "diffuse_sigma"): [1e10, 1e100, 1e150, 1e152, 1e154, 1e155, 1e160, 1e200,
                                           (1e160, 0.0, 0.0)],
        (torch.float32, "diffuse_gamma"): [1e3, 1e8, 1e10, 1e11, 1e12, 1e13, 1e15,
                                           (1e15, 1e-15, 1.0), (1e30, 1e-30, 1.0)],
        (torch.float32, "diffuse_sigma"): [1e3, 1e10, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e30,
                                           (1e20, 0.0, 0.0)],
    }

    @staticmethod
    def refused_or_finite(dtype, field, value, base=BASE) -> str:
        """"refused" (one line naming the leaf, its value, the fix and the dtype) or "finite"
        (the image renders finite); anything else fails."""
        values = list(value) if isinstance(value, tuple) else [value] * 3
        try:
            lengths = {"diffuse_gamma": GAMMA, "diffuse_sigma": SIGMA, field: values}
            p = tree(base=base, diffuse=True, **lengths).to(dtype=dtype)
        except ValueError as err:
            lines = [x for x in str(err).splitlines() if f"crystal.{field} = " in x]
            assert len(lines) == 1, (value, str(err))
            assert f"{values[0]:.4g}" in lines[0], lines[0]
            assert f"lower {field}" in lines[0] and str(dtype)[6:] in lines[0], lines[0]
            return "refused"
        image = nbfunc.simulate(p)
        assert image.dtype == dtype and bool(torch.isfinite(image).all()), (value, image)
        return "finite"

    @pytest.mark.parametrize("dtype, field", list(SWEEPS))
    def test_extreme_values_are_refused_or_render_finite(self, dtype, field):
        values = self.SWEEPS[dtype, field]
        outcomes = [self.refused_or_finite(dtype, field, v) for v in values]
        # both outcomes occur: the bound neither refuses all large values nor lets all pass,
        # and the values that rendered NaN before are among the refused
        assert "finite" in outcomes and "refused" in outcomes, outcomes
        first_nan = {"float64": {"diffuse_gamma": 1e103, "diffuse_sigma": 1e160},
                     "float32": {"diffuse_gamma": 1e13, "diffuse_sigma": 1e20}}
        assert outcomes[values.index(first_nan[str(dtype)[6:]][field])] == "refused"

    def test_correlation_form_on_a_tiny_cell(self):
        """A 0.01 Angstrom cell (reciprocal vectors of 100/Angstrom) and one long gamma: the
        peak 8 pi det(Gamma) is small, but 4 pi^2 |Gamma dQ|^2 overflows from gamma_x of
        about 6e151 (nan without its bound); 1e151 still renders."""
        base = BASE.replace("-cell 50 60 70", "-cell 0.01 0.012 0.014").replace("-lambda 1",
                                                                               "-lambda 0.1")
        outcomes = [self.refused_or_finite(D, "diffuse_gamma", (g, 1e-151, 1.0), base)
                    for g in (1e148, 6e151, 1e152)]
        assert outcomes == ["finite", "refused", "refused"], outcomes

    def test_accepted_extremes_have_finite_derivatives(self):
        """sigma large enough that every E_L is far past exp's underflow, and gamma so large
        that (1 + W)^2 overflows off the peaks: the Jacobians are finite."""
        p = tree(diffuse=True, diffuse_sigma=[1e150] * 3, diffuse_gamma=[1e50] * 3)
        jac = torch.func.jacrev(nbfunc.simulate)(p)
        for path in ("crystal.diffuse_gamma", "crystal.diffuse_sigma"):
            assert bool(torch.isfinite(get_leaf(jac, path)).all()), path
