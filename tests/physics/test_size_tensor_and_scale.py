"""The off-diagonal domain-size terms ``crystal.Ncells_def`` and the per-shot scale ``crystal.G``
through the renderer: exact reductions, refusals, derivatives and the tree's bookkeeping.

Every image is 6 x 6 pixels in float64, rendered eagerly (a few milliseconds each).
"""
from __future__ import annotations

import pytest
import torch

import nbfunc
from nbfunc import Params
from nbfunc.cli.derive import params_from_args
from nbfunc.tree import get_leaf, replace_leaves

from _physics_support import central, close

D = torch.float64
BASE = ("-cell 50 60 70 85 95 100 -misset 10 -20 30 -default_F 100 -N 5 -lambda 1 "
        "-distance 50 -pixel 0.5 -detpixels 6 -oversample 1")
OFFDIAG = torch.tensor([0.7, -0.4, 0.5], dtype=D)


@pytest.fixture(autouse=True)
def eager():
    with torch.compiler.set_stance("force_eager"):
        yield


def tree(extra: str = "", **leaves) -> Params:
    p = params_from_args((BASE + " " + extra).split())
    return replace_leaves(p, {f"crystal.{k}": torch.as_tensor(v, dtype=D) for k, v in leaves.items()})




class TestReductions:
    @pytest.mark.parametrize("extra", ["", "-gauss_xtal -fudge 2", "-round_xtal"])
    def test_g_two_doubles_the_image_exactly(self, extra):
        image = nbfunc.simulate(tree(extra))
        assert image.max() > 0
        assert torch.equal(nbfunc.simulate(tree(extra, G=2.0)), 2.0 * image)

    def test_g_scales_the_crystal_and_not_the_water(self):
        """With a water background, G scales the crystal's photons only: the image is
        ``G crystal + water``, linear in G, and G = 1 is the plain render bit for bit."""
        crystal = nbfunc.simulate(tree("-round_xtal"))
        water = nbfunc.simulate(tree("-round_xtal -water 10")) - crystal
        assert water.min() > 0
        for g in (0.5, 3.0):
            close(nbfunc.simulate(tree("-round_xtal -water 10", G=g)), g * crystal + water, 1e-14, f"G={g}")
        assert torch.equal(nbfunc.simulate(tree("-round_xtal -water 10", G=1.0)),
                           nbfunc.simulate(tree("-round_xtal -water 10")))

    def test_explicit_zero_offdiagonals_and_unit_scale_change_nothing(self):
        p = tree("-gauss_xtal -fudge 2")
        same = tree("-gauss_xtal -fudge 2", Ncells_def=[0.0, 0.0, 0.0], G=1.0)
        assert torch.equal(nbfunc.simulate(p), nbfunc.simulate(same))

    def test_offdiagonals_reshape_gaussian_spots(self):
        plain = nbfunc.simulate(tree("-gauss_xtal -fudge 2"))
        coupled = nbfunc.simulate(tree("-gauss_xtal -fudge 2", Ncells_def=OFFDIAG))
        assert torch.isfinite(coupled).all() and not torch.allclose(plain, coupled, rtol=1e-3)


def weighted_sum(p: Params) -> torch.Tensor:
    weights = torch.linspace(0.5, 1.5, 36, dtype=D).reshape(6, 6)
    return (nbfunc.simulate(p) * weights).sum()


@pytest.fixture(scope="module")
def coupled():
    """A Gaussian-shape tree with off-diagonal terms and G != 1, and its two Jacobians."""
    p = tree("-gauss_xtal -fudge 2", Ncells_def=OFFDIAG, G=1.7)
    with torch.compiler.set_stance("force_eager"):
        return p, torch.func.jacfwd(nbfunc.simulate)(p), torch.func.jacrev(nbfunc.simulate)(p)


class TestDerivatives:
    PATHS = ("crystal.Ncells_def", "crystal.G", "crystal.Na")

    @pytest.mark.parametrize("path", PATHS)
    def test_jacfwd_jacrev_match_central_differences(self, path, coupled):
        p, jac_fwd, jac_rev = coupled
        fwd, rev = get_leaf(jac_fwd, path), get_leaf(jac_rev, path)
        assert fwd.abs().max() > 0
        close(rev, fwd, 1e-10, f"jacrev vs jacfwd {path}")
        close(fwd, central(nbfunc.simulate, p, path), 1e-6, f"jacfwd vs central {path}")

    def test_hessian_matches_central_differences_of_the_gradient(self):
        p = tree("-gauss_xtal -fudge 2", Ncells_def=OFFDIAG, G=1.7)
        chosen = {path: get_leaf(p, path) for path in self.PATHS}
        loss = lambda leaves: weighted_sum(replace_leaves(p, leaves))
        hess = torch.func.hessian(loss)(chosen)
        grad = lambda q: torch.cat([g.reshape(-1) for g in torch.func.grad(loss)(
            {path: get_leaf(q, path) for path in self.PATHS}).values()])
        for col in self.PATHS:
            numeric = central(grad, p, col, rel=1e-5)        # (rows, *leaf shape)
            analytic = torch.cat([hess[row][col].reshape(-1, *get_leaf(p, col).shape)
                                  for row in self.PATHS])
            close(analytic, numeric, 1e-6, f"hessian column {col}")

    def test_square_shape_gradient_with_g_is_g_times_the_plain_one(self):
        """The square shape's hand-written first derivatives (`nbfunc.render.PartialsRules`)
        see G through the pixel scale: d/dNa scales by G, d/dG is the image over G."""
        p1, p2 = tree(), tree(G=1.7)
        g1 = torch.func.grad(weighted_sum)(p1)
        g2 = torch.func.grad(weighted_sum)(p2)
        close(g2.crystal.Na, 1.7 * g1.crystal.Na, 1e-13, "Na")
        close(g2.crystal.G, weighted_sum(p2) / 1.7, 1e-13, "G")
        close(g2.crystal.G, central(weighted_sum, p2, "crystal.G"), 1e-8, "G vs central")


class TestTree:
    def test_leaf_paths_and_save_load_round_trip(self, tmp_path):
        p = params_from_args((BASE + " -gauss_xtal").split())
        p = Params.model_validate(p.model_dump() | {"crystal": p.crystal.model_dump()
                                                    | {"Ncells_def": OFFDIAG, "G": 1.25}})
        paths = p.leaf_paths()
        assert "crystal.Ncells_def" in paths and "crystal.G" in paths
        p.save(tmp_path / "tree.json")
        back = Params.load(tmp_path / "tree.json")
        assert back == p
        assert torch.equal(back.crystal.Ncells_def, OFFDIAG) and float(back.crystal.G) == 1.25
        assert torch.equal(nbfunc.simulate(back), nbfunc.simulate(p))

    def test_defaults_are_zero_offdiagonals_and_unit_scale(self):
        cr = tree().crystal
        assert torch.equal(cr.Ncells_def, torch.zeros(3, dtype=D)) and float(cr.G) == 1.0
        assert cr.Ncells_def.dtype == cr.Na.dtype == cr.G.dtype


# --------------------------------------------------------------------------------------------
# diffBragg's Gaussian, shape gauss_hkl (-gauss_hkl_xtal): det N exp(-|N dH|^2 fudge/0.63)
# --------------------------------------------------------------------------------------------
SIZE_PATHS = ("crystal.Na", "crystal.Nb", "crystal.Nc", "crystal.Ncells_def")


def cubic(shape_flag: str, edge: float, **leaves) -> Params:
    """A cubic cell of ``edge`` Angstrom, misset, N = 5, on the 6 x 6 detector of `BASE`."""
    flags = BASE.replace("-cell 50 60 70 85 95 100", f"-cell {edge} {edge} {edge} 90 90 90")
    p = params_from_args(f"{flags} {shape_flag}".split())
    return replace_leaves(p, {f"crystal.{k}": torch.as_tensor(v, dtype=D) for k, v in leaves.items()})


class TestGaussHkl:
    def test_explicit_zero_offdiagonals_change_nothing(self):
        p = tree("-gauss_hkl_xtal -fudge 2")
        assert torch.equal(nbfunc.simulate(p), nbfunc.simulate(tree("-gauss_hkl_xtal -fudge 2",
                                                                    Ncells_def=[0.0, 0.0, 0.0])))

    @pytest.mark.parametrize("offdiag", [None, OFFDIAG])
    def test_equals_the_c_programs_gauss_where_their_measures_agree(self, offdiag):
        """For a cubic cell of edge ``a`` and ``Na = Nb = Nc = n`` the C program's exponent
        ``n^6 |R^T D^-1 N dH|^2 = n^4/a^2 |N dH|^2`` is diffBragg's ``|N dH|^2`` when
        ``a = n^2``: the two shapes then render the same image (round-off apart) through
        different code, and different images for any other edge."""
        extra = {} if offdiag is None else {"Ncells_def": offdiag}
        hkl_image = nbfunc.simulate(cubic("-gauss_hkl_xtal", 25.0, **extra))
        assert hkl_image.max() > 10 * hkl_image.min() > 0
        close(nbfunc.simulate(cubic("-gauss_xtal", 25.0, **extra)), hkl_image, 1e-12, "a = n^2")
        other = nbfunc.simulate(cubic("-gauss_xtal", 30.0, **extra))
        assert not torch.allclose(other, nbfunc.simulate(cubic("-gauss_hkl_xtal", 30.0, **extra)),
                                  rtol=1e-2)

    def test_refused_when_not_positive_definite(self):
        """N = 5 with Ne = 5: det N = 125 - Na Ne^2 = 0."""
        from pydantic import ValidationError

        crystal = tree("-gauss_hkl_xtal").crystal
        assert type(crystal).model_validate(crystal.model_dump() | {"Ncells_def": [0.0, 4.9, 0.0]})
        with pytest.raises(ValidationError, match="not positive definite"):
            type(crystal).model_validate(crystal.model_dump() | {"Ncells_def": [0.0, 5.0, 0.0]})


def poisson_nll(counts: torch.Tensor):
    """``p -> sum(mu - k log mu)`` of the image of ``p`` (mu > 0: the tree has water)."""
    def nll(p: Params) -> torch.Tensor:
        mu = nbfunc.simulate(p)
        return (mu - counts * torch.log(mu)).sum()
    return nll


@pytest.fixture(scope="module")
def gauss_hkl():
    """diffBragg's shape with off-diagonal terms, anisotropic N, water, and Poisson counts."""
    p = tree("-gauss_hkl_xtal -fudge 1.5 -water 0.01", Nb=6.0, Nc=4.5, Ncells_def=OFFDIAG)
    with torch.compiler.set_stance("force_eager"), torch.no_grad():
        mu = nbfunc.simulate(p)
    counts = torch.poisson(mu, generator=torch.Generator().manual_seed(4))
    return p, counts


class TestGaussHklDerivatives:
    @pytest.mark.parametrize("path", SIZE_PATHS)
    def test_jacfwd_jacrev_match_central_differences(self, path, gauss_hkl):
        p, _ = gauss_hkl
        fwd = get_leaf(torch.func.jacfwd(nbfunc.simulate)(p), path)
        rev = get_leaf(torch.func.jacrev(nbfunc.simulate)(p), path)
        assert fwd.abs().max() > 0
        close(rev, fwd, 1e-10, f"jacrev vs jacfwd {path}")
        close(fwd, central(nbfunc.simulate, p, path), 1e-6, f"jacfwd vs central {path}")

    def test_poisson_nll_hessian_matches_central_differences_of_the_gradient(self, gauss_hkl):
        p, counts = gauss_hkl
        nll = poisson_nll(counts)
        chosen = {path: get_leaf(p, path) for path in SIZE_PATHS}
        loss = lambda leaves: nll(replace_leaves(p, leaves))
        hess = torch.func.hessian(loss)(chosen)
        grad = lambda q: torch.cat([g.reshape(-1) for g in torch.func.grad(loss)(
            {path: get_leaf(q, path) for path in SIZE_PATHS}).values()])
        numeric_grad = torch.cat([central(nll, p, path).reshape(-1) for path in SIZE_PATHS])
        close(grad(p), numeric_grad, 1e-6, "gradient")
        for col in SIZE_PATHS:
            numeric = central(grad, p, col, rel=1e-5)          # (rows, *leaf shape)
            analytic = torch.cat([hess[row][col].reshape(-1, *get_leaf(p, col).shape)
                                  for row in SIZE_PATHS])
            assert analytic.abs().max() > 0
            close(analytic, numeric, 1e-6, f"hessian column {col}")
        # the Hessian is symmetric, as a Hessian must be
        flat = torch.cat([torch.cat([hess[r][c].reshape(get_leaf(p, r).numel(), -1)
                                     for c in SIZE_PATHS], 1) for r in SIZE_PATHS], 0)
        close(flat, flat.T, 1e-12, "symmetry")
