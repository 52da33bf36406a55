import numpy as np
import pytest
import torch
from pydantic import ValidationError

from nbfunc.beam import check_source_memory, polarization_factor, source_memory_bytes, sources
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


class TestSourceGridFractions:
    def test_fractions_are_static_float64_arrays_from_tuples_or_arrays(self):
        listed = SourceGrid(hdiv_fracs=(-0.5, 0.5), vdiv_fracs=(0.0, 0.0), disp_fracs=(0.25, -0.25))
        arrays = SourceGrid(hdiv_fracs=np.array([-0.5, 0.5]), vdiv_fracs=torch.zeros(2),
                            disp_fracs=np.array([0.25, -0.25], dtype=np.float32))
        assert listed == arrays and listed.n_sources == 2
        assert all(getattr(arrays, n).dtype == D for n in ("hdiv_fracs", "vdiv_fracs", "disp_fracs"))
        assert "hdiv_fracs" in SourceGrid.static_fields() and "hdiv_fracs" not in SourceGrid.LEAVES
        back = SourceGrid.model_validate_json(listed.model_dump_json())
        assert torch.equal(back.disp_fracs, listed.disp_fracs)

    def test_fractions_of_another_shape_are_refused(self):
        with pytest.raises(ValidationError, match=r"hdiv_fracs has shape \(2, 1\); give one finite"):
            SourceGrid(hdiv_fracs=((0.0,), (1.0,)), vdiv_fracs=(0.0, 0.0), disp_fracs=(0.0, 0.0))


def test_source_memory_refusal_names_the_steps_and_what_fits():
    check_source_memory(100, 100, 10, 8, source_memory_bytes(10**5, 8))
    with pytest.raises(ValueError) as err:
        check_source_memory(100, 100, 11, 8, source_memory_bytes(10**5, 8))
    message = str(err.value)
    assert message.startswith("-hdivsteps/-vdivsteps/-dispsteps 100 x 100 x 11 = 110000 sources need ")
    fits = int(message.rsplit("at most about ", 1)[1].split()[0])
    assert fits == 100000 and len(message) < 300
