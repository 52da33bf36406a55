"""Anisotropic mosaicity with deterministic quadrature (``mosaic_model="quadrature"``, ``eta``).

The domains stand for Gaussian rotation vectors ``r ~ N(0, E E)`` with ``E = mosaic_spread*I
+ eta`` (deg, lab frame). Checks: the reductions to the C program's model where they overlap,
the exact second moments of the design, a physical check of the axis (a spread about the beam
axis smears a spot tangentially by ``R * eta`` and leaves its radial profile and its intensity
alone), derivatives against central differences, validation, and a small pull test.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from pydantic import ValidationError

import nbfunc
from nbfunc import Crystal
from nbfunc.crystal import (mosaic_rotations, quadrature_points, rotation_vector_matrix,
                            spread_matrix)
from nbfunc.io.errors import first_validation_error
from nbfunc.replicas import fit_replicas, poisson_replicas, pull_summary
from nbfunc.rotation import axis_rotation_matrix
from nbfunc.uncertainty import uncertainty

F64 = torch.float64
SPOT = (28, 124)
"""(slow, fast) pixel of a strong, isolated spot of `SPOT_FLAGS` at eta = 0 (76.5 px from the
beam centre at (100.5, 100.5) px)."""
SPOT_FLAGS = ("-cell 40 40 40 90 90 90 -misset 10 20 30 -default_F 100 -N 6 -gauss_xtal -lambda 1 "
              "-distance 80 -detpixels 200 -pixel 0.2 -oversample 1")
PULL_FLAGS = ("-cell 40 40 40 90 90 90 -misset 10 20 30 -default_F 100 -N 6 -gauss_xtal -lambda 1 "
              "-distance 60 -detpixels 40 -pixel 0.6 -oversample 1 -fluence 1e28 -water 0.01")
"""40 x 40 pixels with about twenty spots (peak about 2500 photons) and a faint water ring."""


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def with_mosaic(p: nbfunc.Params, **kw) -> nbfunc.Params:
    """``p`` with its crystal rebuilt (validated) with the mosaic settings ``kw``."""
    fields = {k: getattr(p.crystal, k) for k in type(p.crystal).model_fields
              if k not in ("mosaic_axes", "mosaic_scales")}
    fields.update(kw)
    return p.model_copy(update={"crystal": Crystal(**fields)})


def roi_tree(half: int, **kw) -> nbfunc.Params:
    """`SPOT_FLAGS` rendered on the (2 half + 1)^2 pixels around `SPOT`, with mosaic ``kw``."""
    s, f = SPOT
    flags = SPOT_FLAGS + f" -roi {f - half} {f + half} {s - half} {s + half}"
    return with_mosaic(nbfunc.params_from_args(flags.split()), **kw)


def roi_pixels(img: torch.Tensor, half: int) -> torch.Tensor:
    s, f = SPOT
    return img[..., s - half:s + half + 1, f - half:f + half + 1]


def crystal(**kw) -> Crystal:
    return Crystal(cell_a=50, cell_b=50, cell_c=50, **kw)


# --------------------------------------------------------------------------------------------
# defaults and reductions to the C program's model
# --------------------------------------------------------------------------------------------
def test_defaults_are_the_c_programs_random_domains():
    cr = crystal(mosaic_spread=0.5, mosaic_domains=6, mosaic_seed=-7)
    assert cr.mosaic_model == "c_random" and torch.equal(cr.eta, torch.zeros(3, dtype=F64))
    explicit = crystal(mosaic_spread=0.5, mosaic_domains=6, mosaic_seed=-7, mosaic_model="c_random",
                       eta=[0.0, 0.0, 0.0])
    assert torch.equal(mosaic_rotations(explicit), mosaic_rotations(cr))
    expected = axis_rotation_matrix(cr.mosaic_axes, cr.mosaic_spread * math.pi / 180 * cr.mosaic_scales)
    assert torch.equal(mosaic_rotations(cr), expected)
    assert "eta" in Crystal.LEAVES and "mosaic_model" in Crystal.static_fields()


def test_zero_spread_is_the_unrotated_crystal():
    quad = crystal(mosaic_model="quadrature", mosaic_domains=20)
    assert torch.equal(mosaic_rotations(quad), torch.eye(3, dtype=F64).expand(20, 3, 3))
    p = roi_tree(5)
    plain = nbfunc.simulate(p)
    many = nbfunc.simulate(with_mosaic(p, mosaic_model="quadrature", mosaic_domains=20))
    torch.testing.assert_close(many, plain, rtol=1e-14, atol=0)


def test_one_domain_equals_the_c_programs_one_domain():
    """One domain is the unrotated crystal in both models, whatever the spread (nanoBragg)."""
    p = roi_tree(5)
    c_one = nbfunc.simulate(with_mosaic(p, mosaic_spread=0.7, mosaic_domains=1))
    q_one = nbfunc.simulate(with_mosaic(p, mosaic_model="quadrature", mosaic_spread=0.7,
                                        mosaic_domains=1, eta=[0.3, 0.2, 0.1]))
    assert torch.equal(q_one, c_one) and bool((c_one > 0).any())


def test_isotropic_eta_equals_mosaic_spread():
    p = roi_tree(5)
    by_eta = nbfunc.simulate(with_mosaic(p, mosaic_model="quadrature", mosaic_domains=12, eta=[0.4] * 3))
    by_spread = nbfunc.simulate(with_mosaic(p, mosaic_model="quadrature", mosaic_domains=12,
                                            mosaic_spread=0.4))
    split = nbfunc.simulate(with_mosaic(p, mosaic_model="quadrature", mosaic_domains=12,
                                        mosaic_spread=0.1, eta=[0.3] * 3))
    torch.testing.assert_close(by_eta, by_spread, rtol=1e-14, atol=0)
    torch.testing.assert_close(split, by_spread, rtol=1e-13, atol=0)
    assert not torch.allclose(by_eta, nbfunc.simulate(p), rtol=1e-3)


# --------------------------------------------------------------------------------------------
# the design and the rotations
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("domains", [6, 7, 12, 51, 1000])
def test_design_has_mean_zero_and_identity_second_moments(domains):
    z = quadrature_points(domains)
    assert z.shape == (domains, 3)
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-15)
    np.testing.assert_allclose(z.T @ z / domains, np.eye(3), atol=1e-13)
    assert np.array_equal(z, quadrature_points(domains))  # deterministic (and cached)
    # the antipodal pairs are distinct points: no two domains coincide
    assert len(np.unique(np.round(z, 12), axis=0)) == domains


def test_design_radii_follow_the_chi3_distribution():
    """Lengths of the (whitened) points: median of chi_3 within 2 % for 1000 points."""
    radii = np.linalg.norm(quadrature_points(1000), axis=1)
    assert abs(np.median(radii) / 1.5381722 - 1) < 0.02


def test_rotation_vector_matrix_matches_axis_angle_on_both_branches():
    g = torch.Generator().manual_seed(3)
    axes = torch.nn.functional.normalize(torch.randn(40, 3, generator=g, dtype=F64), dim=1)
    angles = torch.cat([torch.logspace(-9, -1.2, 20, dtype=F64), torch.linspace(0.2, 3.0, 20, dtype=F64)])
    torch.testing.assert_close(rotation_vector_matrix(axes * angles[:, None]),
                               axis_rotation_matrix(axes, angles), rtol=0, atol=1e-15)
    assert torch.equal(rotation_vector_matrix(torch.zeros(3, dtype=F64)), torch.eye(3, dtype=F64))


def log_map(rot: torch.Tensor) -> torch.Tensor:
    """Rotation vectors (rad) of rotations (*, 3, 3) with angles in (0, pi)."""
    angle = torch.arccos(((rot.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1))
    skew = torch.stack([rot[..., 2, 1] - rot[..., 1, 2], rot[..., 0, 2] - rot[..., 2, 0],
                        rot[..., 1, 0] - rot[..., 0, 1]], -1)
    return skew * (angle / (2 * torch.sin(angle)))[..., None]


def test_rotation_vectors_have_covariance_E_squared():
    """The tensor's layout (xx, yy, zz, xy, yz, xz), its symmetry and units (deg): the
    domains' rotation vectors, read back from the matrices, have covariance ``E E`` (rad^2)."""
    eta = t([0.9, 0.5, 0.7, 0.2, -0.1, 0.15])
    cr = crystal(mosaic_model="quadrature", mosaic_domains=31, mosaic_spread=0.1, eta=eta)
    r = log_map(mosaic_rotations(cr)[:-1])  # the last (odd count) domain is the identity
    e = torch.tensor([[1.0, 0.2, 0.15], [0.2, 0.6, -0.1], [0.15, -0.1, 0.8]], dtype=F64) * math.pi / 180
    torch.testing.assert_close(r.T @ r / 31, e @ e, rtol=1e-12, atol=0)
    torch.testing.assert_close(spread_matrix(eta, t(0.1)) * math.pi / 180, e, rtol=1e-15, atol=0)


def test_one_axis_tensor_rotates_about_that_axis_only():
    s = 0.8
    u = torch.tensor([0.0, 1.0, 1.0], dtype=F64) / math.sqrt(2)
    # E = s u u^T as six terms (xx, yy, zz, xy, yz, xz)
    cr = crystal(mosaic_model="quadrature", mosaic_domains=12, eta=[0.0, s / 2, s / 2, 0.0, s / 2, 0.0])
    rot = mosaic_rotations(cr)
    torch.testing.assert_close(rot @ u, u.expand(12, 3), rtol=0, atol=1e-15)
    assert float(log_map(rot).norm(dim=1).max()) > 0.5 * s * math.pi / 180


# --------------------------------------------------------------------------------------------
# physics: a spread about the beam axis turns spots about the beam centre
# --------------------------------------------------------------------------------------------
def spot_moments(img: torch.Tensor, half: int) -> tuple[float, float, float, float]:
    """Total, radius (px), radial and tangential variances (px^2) of the spot within 8 px of
    `SPOT` (its neighbours lie further out), about the beam centre (100.5, 100.5) px."""
    block = roi_pixels(img, half)
    s, f = torch.meshgrid(torch.arange(-half, half + 1, dtype=F64) + SPOT[0],
                          torch.arange(-half, half + 1, dtype=F64) + SPOT[1], indexing="ij")
    block = block * (((s - SPOT[0]) ** 2 + (f - SPOT[1]) ** 2) < 64)
    w = block / block.sum()
    cs, cf = (w * s).sum(), (w * f).sum()
    radial = torch.stack([cs - 100.5, cf - 100.5])
    radius = radial.norm()
    radial = radial / radius
    ds, df = s - cs, f - cf
    r, tang = ds * radial[0] + df * radial[1], -ds * radial[1] + df * radial[0]
    return float(block.sum()), float(radius), float((w * r * r).sum()), float((w * tang * tang).sum())


def test_spread_about_the_beam_axis_smears_spots_tangentially_only():
    """Rotating the crystal about the beam (lab x) keeps every reflection's distance from the
    Ewald sphere, so the spot turns about the beam centre: its intensity and radial profile
    stay, and its tangential variance grows by ``(R s)^2`` (R the spot's radius, s in rad)
    for Gaussian rotation angles of standard deviation s. Spreads about y or z change the
    excitation instead."""
    half, s = 10, 1.0
    base = spot_moments(nbfunc.simulate(roi_tree(half)), half)
    along_x = spot_moments(nbfunc.simulate(roi_tree(half, mosaic_model="quadrature", mosaic_domains=30,
                                                    eta=[s, 0.0, 0.0])), half)
    about_z = spot_moments(nbfunc.simulate(roi_tree(half, mosaic_model="quadrature", mosaic_domains=30,
                                                    eta=[0.0, 0.0, s])), half)
    assert along_x[0] == pytest.approx(base[0], rel=1e-3)      # same excitation
    assert along_x[1] == pytest.approx(base[1], abs=0.05)      # same radius (px)
    assert along_x[2] == pytest.approx(base[2], rel=0.01)      # same radial width
    grown = along_x[3] - base[3]
    assert grown == pytest.approx((base[1] * s * math.pi / 180) ** 2, rel=0.03)
    assert about_z[0] < 0.8 * base[0]                           # partial: off the Ewald sphere


# --------------------------------------------------------------------------------------------
# derivatives
# --------------------------------------------------------------------------------------------
ETA6 = [0.6, 0.4, 0.5, 0.1, -0.05, 0.08]


def image_of_eta(p: nbfunc.Params, half: int):
    return lambda x: roi_pixels(nbfunc.simulate(nbfunc.replace_leaves(p, {"crystal.eta": x})), half).reshape(-1)


def central(fn, x: torch.Tensor, h: float) -> torch.Tensor:
    """Central differences of ``fn`` (vector out) in every element of ``x``, (out, n)."""
    cols = []
    for i in range(x.numel()):
        dx = torch.zeros_like(x)
        dx[i] = h
        cols.append((fn(x + dx) - fn(x - dx)) / (2 * h))
    return torch.stack(cols, -1)


def test_jacobian_of_the_image_matches_central_differences():
    half = 4
    p = roi_tree(half, mosaic_model="quadrature", mosaic_domains=12, eta=ETA6)
    fn, x = image_of_eta(p, half), t(ETA6)
    fwd, rev = torch.func.jacfwd(fn)(x), torch.func.jacrev(fn)(x)
    torch.testing.assert_close(rev, fwd, rtol=1e-10, atol=1e-10 * float(fwd.abs().max()))
    coarse, fine = central(fn, x, 2e-3), central(fn, x, 1e-3)
    scale = float(fwd.abs().max())
    # the differences have converged (O(h^2) error: four times smaller at half the step)
    assert float((coarse - fine).abs().max()) < 1e-4 * scale
    torch.testing.assert_close(fwd, fine, rtol=0, atol=1e-5 * scale)


def test_derivatives_at_zero_spread_are_finite_and_the_gradient_vanishes():
    """The image is even in E (antipodal design), so its gradient at eta = 0 is 0; the
    second derivative there is finite and matches differences of the gradient."""
    half = 4
    p = roi_tree(half, mosaic_model="quadrature", mosaic_domains=12)
    fn = image_of_eta(p, half)
    x0 = torch.zeros(6, dtype=F64)
    jac = torch.func.jacfwd(fn)(x0)
    assert bool(torch.isfinite(jac).all())
    img = fn(x0)
    assert float(jac.abs().max()) < 1e-9 * float(img.max())
    total = lambda x: fn(x).sum()  # noqa: E731
    hess = torch.func.hessian(total)(x0)
    assert bool(torch.isfinite(hess).all()) and float(hess.abs().max()) > 0
    grad = torch.func.grad(total)
    coarse, fine = central(grad, x0, 2e-3), central(grad, x0, 1e-3)
    scale = float(hess.abs().max())
    assert float((coarse - fine).abs().max()) < 1e-4 * scale
    torch.testing.assert_close(hess, fine, rtol=0, atol=1e-5 * scale)


def test_hessian_of_poisson_nll_matches_central_differences_of_its_gradient():
    half = 4
    p = roi_tree(half, mosaic_model="quadrature", mosaic_domains=12, eta=ETA6)
    fn, x = image_of_eta(p, half), t(ETA6)
    with torch.no_grad():
        counts = torch.poisson(fn(t([0.7, 0.35, 0.55, 0.05, 0.0, 0.1])) + 1.0,
                               generator=torch.Generator().manual_seed(4))

    def nll(v):
        mu = fn(v) + 1.0  # one photon of flat background keeps every pixel in the sum
        return (mu - counts * torch.log(mu)).sum()

    hess = torch.func.hessian(nll)(x)
    torch.testing.assert_close(hess, hess.T, rtol=1e-9, atol=1e-9 * float(hess.abs().max()))
    grad = torch.func.grad(nll)
    coarse, fine = central(grad, x, 2e-3), central(grad, x, 1e-3)
    scale = float(hess.abs().max())
    assert float((coarse - fine).abs().max()) < 1e-4 * scale
    torch.testing.assert_close(hess, fine, rtol=0, atol=1e-5 * scale)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, message", [
    (dict(eta=[0.1, 0.0, 0.0]),
     r"crystal.eta = \(0.1, 0, 0\) needs mosaic_model='quadrature'; give "
     r"zeros for nanoBragg's random domains"),
    (dict(mosaic_model="quadrature", eta=[0.1, -0.2, 0.0]),
     r"crystal.eta = \(0.1, -0.2, 0\) has a negative axis spread; give spreads xx, yy, zz >= 0 deg"),
    (dict(mosaic_model="quadrature", eta=[0.1, 0.1, 0.1, 0.5, 0.0, 0.0]),
     r"crystal.eta = \(0.1, 0.1, 0.1, 0.5, 0, 0\) is not positive semidefinite \(smallest "
     r"eigenvalue -0.4 deg\); give smaller off-diagonal terms"),
    (dict(mosaic_model="quadrature", eta=[0.1, 0.1]),
     r"eta must be 3 axis spreads xx, yy, zz or 6 tensor terms xx, yy, zz, xy, yz, xz \(deg\), got"),
    (dict(mosaic_model="quadrature", mosaic_domains=4, mosaic_spread=0.1),
     r"crystal.mosaic_domains = 4 is too few for the quadrature mosaic; give 1 \(no mosaicity\) "
     r"or at least 6 domains"),
    (dict(mosaic_model="quadrature", mosaic_domains=6, mosaic_axes=[[0.0, 0.0, 1.0]] * 6,
          mosaic_scales=[0.5] * 6),
     r"list random draws but mosaic_model is 'quadrature'.*leave them empty"),
    (dict(mosaic_model="quadrature", mosaic_domains=10**12, mosaic_spread=0.1),
     r"-mosaic_dom 1000000000000 needs .* GB for the mosaic domains .*; give fewer domains"),
])
def test_invalid_mosaic_settings_are_refused_in_one_line(kw, message):
    with pytest.raises(ValidationError) as err:
        crystal(**kw)
    _, text = first_validation_error(err.value)
    assert re.search(message, text) and "\n" not in text, text


def test_quadrature_tree_round_trips_through_json_and_float32(tmp_path):
    p = roi_tree(3, mosaic_model="quadrature", mosaic_domains=7, mosaic_spread=0.1, eta=ETA6)
    p.save(tmp_path / "tree.json")
    back = nbfunc.Params.load(tmp_path / "tree.json")
    assert back == p and back.crystal.mosaic_model == "quadrature"
    assert torch.equal(nbfunc.simulate(back), nbfunc.simulate(p))
    single = p.to(dtype=torch.float32)
    assert single.crystal.eta.dtype == torch.float32
    torch.testing.assert_close(nbfunc.simulate(single).double(), nbfunc.simulate(p), rtol=1e-4,
                               atol=1e-4 * float(nbfunc.simulate(p).max()))


def test_quadrature_accepts_a_semidefinite_tensor_and_one_axis():
    crystal(mosaic_model="quadrature", mosaic_domains=6, eta=[0.0, 0.2, 0.2, 0.0, 0.2, 0.0])
    crystal(mosaic_model="quadrature", mosaic_domains=6, eta=[0.3, 0.0, 0.0])


# --------------------------------------------------------------------------------------------
# pull test
# --------------------------------------------------------------------------------------------
def test_pulls_of_three_axis_spreads():
    """30 Poisson replicas of `PULL_FLAGS` with eta = (1.0, 0.6, 0.8) deg (12 domains), the
    three axis spreads fitted from starts 3 sigma away. Bounds for 30 replicas, as in
    tests/uncertainty/test_replicas.py: |mean| < 4/sqrt(30) = 0.73 (4 standard errors) and
    |width - 1| < 0.35 (2.7 standard errors of a width from 30 samples)."""
    n = 30
    p = with_mosaic(nbfunc.params_from_args(PULL_FLAGS.split()), mosaic_model="quadrature",
                    mosaic_domains=12, eta=[1.0, 0.6, 0.8])
    free = ["crystal.eta[0]", "crystal.eta[1]", "crystal.eta[2]"]
    with torch.no_grad():
        mu = nbfunc.simulate(p)
    at_truth = uncertainty(p, mu, free)
    assert float((at_truth.std / at_truth.values).max()) < 0.05  # each spread well measured
    generator = torch.Generator().manual_seed(0)
    counts = poisson_replicas(mu, n, generator)
    start = at_truth.values + 3 * at_truth.std * torch.randn(n, 3, generator=generator, dtype=F64)
    fits = fit_replicas(p, counts, free, start)
    assert bool(fits.converged.all()), fits.iterations
    for name, s in pull_summary(fits.values, at_truth.values, fits.std, fits.names).items():
        assert abs(s["mean"]) < 4 / math.sqrt(n), (name, s)
        assert abs(s["width"] - 1) < 0.35, (name, s)
