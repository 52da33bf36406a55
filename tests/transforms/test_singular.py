"""Derivatives at the removable singularities of the physics stay finite and correct.

The geometry puts the centre of pixel (0, 0) exactly on the direct beam: the beam centre is
half a pixel from the detector origin, so the diffracted ray equals the beam bit for bit,
q = 0 and h = k = l = 0 for any cell (``grating(0)``, ``sinc3(0)``, 2theta = 0).
"""
from __future__ import annotations

import math

import pytest
import torch

import nbfunc
from nbfunc import Beam, Crystal, Detector, Params, SourceGrid
from nbfunc.lattice import lattice_factor
from nbfunc.units import R_E_SQR
from _transforms_support import all_finite, assert_close_scaled, central_difference

f64 = lambda x: torch.tensor(x, dtype=torch.float64)


def on_beam(shape="square", kahn=0.5, **crystal) -> Params:
    """4 x 4 pixels of 0.1 mm at 100 mm, pixel (0, 0) centred on the direct beam."""
    cell = dict(cell_a=50, cell_b=60, cell_c=70, Na=5, Nb=5, Nc=5, default_F=100, shape=shape)
    cell.update(crystal)
    return Params(beam=Beam(wavelength=1.0, kahn_factor=kahn),
                  detector=Detector(distance=100, beam_center_f=0.05, beam_center_s=0.05,
                                    pixel_size=0.1, fpixels=4, spixels=4),
                  crystal=Crystal(**cell))


def pixel00(p: Params, **leaves):
    """Pixel (0, 0) as a function of the named leaves."""
    return nbfunc.simulate(nbfunc.replace_leaves(p, leaves))[0, 0]


def test_pixel_is_exactly_on_the_beam(eager):
    """q = 0 at pixel (0, 0): its value is the peak ``r_e^2 fluence F^2 (Na Nb Nc)^2 omega``
    (polarization 1 at 2theta = 0) and no cell or orientation leaf changes it at all."""
    p = on_beam()
    value = nbfunc.simulate(p)[0, 0]
    omega = (0.1e-3 / 0.1) ** 2                     # pixel^2 / distance^2 on the axis (sr)
    peak = R_E_SQR * float(p.beam.fluence) * 100.0**2 * (5.0**3) ** 2 * omega
    assert float(value) == pytest.approx(peak, rel=1e-12)
    jac = torch.func.jacrev(pixel00)(p)
    for block in (jac.crystal.cell_a, jac.crystal.cell_gamma, jac.crystal.misset, jac.crystal.phi_start):
        assert torch.all(block == 0)


@pytest.mark.parametrize("shape", ["square", "round", "gauss", "tophat"])
def test_jacobian_is_finite_at_exact_bragg(shape, eager):
    p = on_beam(shape)
    jac = torch.func.jacrev(nbfunc.simulate)(p)
    assert all_finite(jac)
    # at h = 0 the lattice factor is stationary: moving the beam centre changes pixel (0, 0)
    # only through the solid angle and polarization, which are even about the beam too
    assert abs(float(jac.detector.beam_center_f[0, 0])) < 1e-12 * float(nbfunc.simulate(p)[0, 0])


@pytest.mark.parametrize("shape", ["square", "round", "gauss"])
def test_second_derivative_at_exact_bragg(shape, eager):
    """sincg''(0) = -N (N^2 - 1)/3 and the curvature of sinc3 survive at q = 0."""
    p = on_beam(shape)
    x0 = p.detector.beam_center_f
    f = lambda x: pixel00(p, **{"detector.beam_center_f": x})
    second = torch.func.grad(torch.func.grad(f))(x0)
    grad = torch.func.grad(f)
    step = 1e-6
    numeric = (grad(x0 + step) - grad(x0 - step)) / (2 * step)
    assert second < 0
    assert_close_scaled(second, numeric, 1e-4, shape)
    hessian = torch.func.hessian(f)(x0)
    torch.testing.assert_close(hessian, second, rtol=1e-12, atol=0)


def test_lattice_factor_at_integer_indices():
    """Exact integer h, k, l: finite gradients and the analytic curvature of the grating function."""
    n_cells = f64([5.0, 6.0, 7.0])
    recip = torch.eye(3, dtype=torch.float64) / 50
    fudge = f64(1.0)
    for hkl in ([0.0, 0.0, 0.0], [1.0, -2.0, 3.0]):
        hkl = f64(hkl)
        for shape in ("square", "round", "gauss", "tophat"):
            fn = lambda x: lattice_factor(shape, x, recip, n_cells, fudge)
            grad = torch.func.grad(fn)(hkl)
            hessian = torch.func.hessian(fn)(hkl)
            assert torch.isfinite(grad).all() and torch.isfinite(hessian).all(), (shape, hkl)
            assert torch.all(grad.abs() < 1e-6 * fn(hkl)), (shape, hkl)
        square = torch.func.hessian(lambda x: lattice_factor("square", x, recip, n_cells, fudge))(hkl)
        n = n_cells
        expected = -math.pi**2 * n * (n * n - 1) / 3 * n.prod() / n
        torch.testing.assert_close(torch.diagonal(square).abs(), expected.abs(), rtol=1e-9, atol=0)


def test_polarization_at_zero_scattering_angle(eager):
    p = on_beam(kahn=0.5)
    grad = torch.func.grad(pixel00)(p)
    assert all_finite(grad)
    # sin^2(2theta) = 0: the Kahn factor has no effect on the beam-centre pixel
    assert grad.beam.kahn_factor == 0
    unpolarized = torch.func.grad(pixel00)(on_beam(kahn=0.0))
    assert all_finite(unpolarized)


def _grid_sources(p: Params) -> Params:
    sources = SourceGrid(hdiv_fracs=(-0.5, 0.5, -0.5, 0.5), vdiv_fracs=(-0.5, -0.5, 0.5, 0.5),
                         disp_fracs=(-0.25, 0.25, 0.25, -0.25))
    return p.model_copy(update={"beam": p.beam.model_copy(update={"sources": sources})})


@pytest.mark.parametrize("path", ["beam.sources.dispersion", "beam.sources.hdivrange",
                                  "beam.sources.vdivrange"])
def test_zero_divergence_and_dispersion_with_several_sources(path, eager):
    p = _grid_sources(on_beam())
    assert p.beam.sources.n_sources == 4 and float(nbfunc.tree.get_leaf(p, path)) == 0.0
    jac = nbfunc.tree.get_leaf(torch.func.jacfwd(nbfunc.simulate)(p), path)
    assert torch.isfinite(jac).all()
    assert_close_scaled(jac, central_difference(nbfunc.simulate, p, path), 1e-5, path,
                        atol=1e-9 * float(nbfunc.simulate(p).max()))


@pytest.mark.parametrize("phi_start", [0.0, 10.0])
def test_zero_phi_step_with_several_steps(phi_start, eager):
    p = on_beam(phisteps=3, phi_step=0.0, phi_start=phi_start, misset=[5.0, 10.0, 15.0])
    path = "crystal.phi_step"
    jac = torch.func.jacfwd(nbfunc.simulate)(p).crystal.phi_step
    assert torch.isfinite(jac).all() and jac.abs().max() > 0
    assert_close_scaled(jac, central_difference(nbfunc.simulate, p, path), 1e-5, path)
    carried = torch.func.jacrev(lambda q: nbfunc.simulate_with_carry(q, nbfunc.initial_carry(q))[0])(p)
    assert all_finite(carried)


def test_zero_mosaic_spread_with_several_domains(eager):
    p = on_beam(mosaic_domains=4, mosaic_spread=0.0, misset=[5.0, 10.0, 15.0])
    assert len(p.crystal.mosaic_axes) == 4
    path = "crystal.mosaic_spread"
    jac = torch.func.jacfwd(nbfunc.simulate)(p).crystal.mosaic_spread
    assert torch.isfinite(jac).all()
    assert_close_scaled(jac, central_difference(nbfunc.simulate, p, path), 1e-5, path,
                        atol=1e-9 * float(nbfunc.simulate(p).max()))


@pytest.mark.parametrize("leaves", [
    {"crystal.water_size": 0.0},
    {"crystal.Na": 1.0, "crystal.Nb": 1.0},
    {"beam.kahn_factor": 1.0},
    {"crystal.misset": [0.0, 0.0, 0.0], "detector.rotx": 0.0, "detector.twotheta": 0.0},
])
def test_boundary_values_give_finite_gradients(leaves, eager):
    p = nbfunc.replace_leaves(on_beam(), {k: f64(v) for k, v in leaves.items()})
    loss = lambda q: nbfunc.simulate(q).sum()
    assert all_finite(torch.func.grad(loss)(p))


def test_zero_thickness_sensor_gives_finite_gradients(eager):
    base = on_beam()
    det = base.detector.model_copy(update={"absorption": True, "thicksteps": 2,
                                           "thick_step_fraction": 0.5, "thickness": f64(0.0),
                                           "mu": f64(20.0)})
    p = base.model_copy(update={"detector": det})
    grad = torch.func.grad(lambda q: nbfunc.simulate(q).sum())(p)
    assert all_finite(grad)
    assert grad.detector.thickness > 0      # a thicker sensor captures more photons


@pytest.mark.parametrize("d", [1e-12, 1e-8, 1e-6])
def test_derivative_just_off_an_integer_index_is_accurate(d):
    from nbfunc.lattice import grating

    n = f64(5.0)
    h = f64(1.0 + d)
    grad = torch.func.grad(lambda t: grating(t, n))(h)
    d = float(h) - 1.0                                  # the offset as stored (exact)
    exact = -n * (n * n - 1) / 3 * math.pi**2 * d      # d/dh at 1 + d, to O(d^3), for n = 5
    assert abs(float(grad - exact)) < 1e-9 * abs(float(exact))
