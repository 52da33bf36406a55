import math

import torch

from nbfunc.beam import polarization_factor, sources
from nbfunc.params import Beam, SourceGrid

D = torch.float64


def unit(*v):
    return torch.nn.functional.normalize(torch.tensor(v, dtype=D), dim=-1)


class TestPolarization:
    i = unit(1, 0, 0)
    p = torch.tensor([0.0, 0.0, 1.0], dtype=D)

    def test_unpolarized_is_half_one_plus_cos_squared(self):
        d = unit(1, 1, 0)
        assert torch.allclose(polarization_factor(self.i, d, self.p, torch.tensor(0.0, dtype=D)),
                              torch.tensor(0.75, dtype=D))

    def test_fully_polarized_in_and_out_of_plane(self):
        k = torch.tensor(1.0, dtype=D)
        in_plane = polarization_factor(self.i, unit(0, 0, 1), self.p, k)   # along E: no scattering
        normal = polarization_factor(self.i, unit(0, 1, 0), self.p, k)     # perpendicular to E
        assert torch.allclose(in_plane, torch.tensor(0.0, dtype=D), atol=1e-15)
        assert torch.allclose(normal, torch.tensor(1.0, dtype=D))

    def test_forward_is_one_with_finite_gradient(self):
        d = self.i.clone().requires_grad_(True)
        k = torch.tensor(0.7, dtype=D, requires_grad=True)
        f = polarization_factor(self.i, d, self.p, k)
        f.backward()
        assert torch.allclose(f, torch.tensor(1.0, dtype=D))
        assert torch.isfinite(d.grad).all() and torch.isfinite(k.grad)


class TestSources:
    def test_single_source_is_the_beam(self):
        incident, lam = sources(Beam(wavelength=1.5))
        assert torch.allclose(incident, torch.tensor([[1.0, 0.0, 0.0]], dtype=D))
        assert torch.allclose(lam, torch.tensor([1.5e-10], dtype=D))

    def test_divergence_tilts_by_the_angle(self):
        grid = SourceGrid(hdivrange=2.0, vdivrange=0.0, hdiv_fracs=(-0.5, 0.5), vdiv_fracs=(0.0, 0.0),
                          disp_fracs=(0.0, 0.0))
        incident, _ = sources(Beam(wavelength=1.0, sources=grid))
        angle = torch.acos((incident[0] * incident[1]).sum())
        assert torch.allclose(angle, torch.tensor(2e-3, dtype=D))

    def test_dispersion_spreads_wavelengths(self):
        grid = SourceGrid(dispersion=0.02, hdiv_fracs=(0.0,) * 3, vdiv_fracs=(0.0,) * 3, disp_fracs=(-0.5, 0.0, 0.5))
        _, lam = sources(Beam(wavelength=1.0, sources=grid))
        assert torch.allclose(lam, torch.tensor([0.99e-10, 1e-10, 1.01e-10], dtype=D))
