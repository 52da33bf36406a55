import math

import pytest
import torch

from nbfunc.lattice import lattice_factor, sinc3, sincg

D = torch.float64


class TestSincg:
    def test_zero_gives_n(self):
        assert sincg(torch.tensor(0.0, dtype=D), torch.tensor(7.0, dtype=D)) == 7.0

    def test_peak_at_integer_h_is_n(self):
        h = torch.tensor([1.0, 2.0, -3.0], dtype=D)
        assert torch.allclose(sincg(math.pi * h, torch.tensor(5.0, dtype=D)).abs(), torch.full((3,), 5.0, dtype=D))

    def test_matches_sum_of_phases(self):
        x, n = torch.tensor(0.37, dtype=D), 6
        direct = sum(torch.exp(1j * (2 * j - (n - 1)) * x) for j in range(n)).real
        assert torch.allclose(sincg(x, torch.tensor(float(n), dtype=D)), direct)

    def test_finite_gradient_at_zero(self):
        x = torch.tensor(0.0, dtype=D, requires_grad=True)
        n = torch.tensor(4.0, dtype=D, requires_grad=True)
        sincg(x, n).backward()
        assert torch.isfinite(x.grad) and torch.isfinite(n.grad)


class TestSinc3:
    def test_value_at_zero(self):
        assert sinc3(torch.tensor(0.0, dtype=D)) == 1.0

    @pytest.mark.parametrize("x", [1e-3 * 0.999, 1e-3 * 1.001, 0.5, 2.0])
    def test_taylor_and_formula_agree(self, x):
        t = torch.tensor(x, dtype=D)
        exact = 3 * (torch.sin(t) / t - torch.cos(t)) / t**2
        assert torch.allclose(sinc3(t), exact, rtol=1e-9)

    def test_gradcheck(self):
        x = torch.tensor([0.0, 5e-4, 0.3, 2.0], dtype=D, requires_grad=True)
        assert torch.autograd.gradcheck(sinc3, (x,))


@pytest.mark.parametrize("shape", ["square", "round", "gauss", "tophat"])
class TestLatticeFactor:
    recip = torch.eye(3, dtype=D) / 50.0
    n = torch.tensor([5.0, 6.0, 7.0], dtype=D)
    fudge = torch.tensor(1.0, dtype=D)

    def test_peak_is_n_cubed_scale(self, shape):
        f = lattice_factor(shape, torch.tensor([2.0, -1.0, 3.0], dtype=D), self.recip, self.n, self.fudge)
        expected = 210.0 * (0.723601254558268 if shape == "round" else 1.0)
        assert torch.allclose(f.abs(), torch.tensor(expected, dtype=D))

    def test_friedel_symmetric(self, shape):
        hkl = torch.randn(50, 3, dtype=D) * 3
        a = lattice_factor(shape, hkl, self.recip, self.n, self.fudge)
        b = lattice_factor(shape, -hkl, self.recip, self.n, self.fudge)
        assert torch.allclose(a.abs(), b.abs())

    def test_intensity_peak_scales_as_n_to_the_sixth(self, shape):
        hkl = torch.tensor([1.0, 1.0, 1.0], dtype=D)
        i1 = lattice_factor(shape, hkl, self.recip, self.n, self.fudge) ** 2
        i2 = lattice_factor(shape, hkl, self.recip, 2 * self.n, self.fudge) ** 2
        assert torch.allclose(i2 / i1, torch.tensor(64.0, dtype=D))
