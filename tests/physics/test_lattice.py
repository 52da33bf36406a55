import math

import mpmath
import pytest
import torch

from nbfunc.lattice import (_SERIES_LIMIT, grating, grating_and_derivatives, grating_second_derivatives,
                            lattice_factor, sinc3, sinpi_reduced)

D = torch.float64


def mp_grating(h: float, n: int) -> float:
    """sin(n pi h)/sin(pi h) in 50-digit arithmetic (h taken exactly as the double given)."""
    with mpmath.workdps(50):
        x = mpmath.mpf(h)
        if x == mpmath.nint(x):
            return float(n * (-1) ** (int(mpmath.nint(x)) * (n - 1)))
        return float(mpmath.sin(n * mpmath.pi * x) / mpmath.sin(mpmath.pi * x))


class TestGrating:
    def test_zero_gives_n(self):
        assert grating(torch.tensor(0.0, dtype=D), torch.tensor(7.0, dtype=D)) == 7.0

    @pytest.mark.parametrize("n", [4, 5])
    def test_peak_at_integer_h_is_n_with_the_limit_sign(self, n):
        h = torch.tensor([1.0, 2.0, -3.0, 40.0], dtype=D)
        expected = torch.tensor([n * (-1) ** (int(k) * (n - 1)) for k in h], dtype=D)
        assert torch.equal(grating(h, torch.tensor(float(n), dtype=D)), expected)

    def test_matches_sum_of_phases(self):
        h, n = torch.tensor(0.37 / math.pi, dtype=D), 6
        direct = sum(torch.exp(1j * math.pi * (2 * j - (n - 1)) * h) for j in range(n)).real
        assert torch.allclose(grating(h, torch.tensor(float(n), dtype=D)), direct, rtol=1e-14)

    @pytest.mark.parametrize("n", [2, 5, 37, 100])
    def test_float64_matches_high_precision(self, n):
        gen = torch.Generator().manual_seed(n)
        h = torch.cat([(torch.rand(400, generator=gen, dtype=D) - 0.5) * 80,
                       torch.tensor([3.0 + 1e-12, 3.0 - 1e-9, -7.0 + 1e-6, 12.0 + 0.002, 2.5, 1e-300], dtype=D)])
        got = grating(h, torch.tensor(float(n), dtype=D))
        exact = torch.tensor([mp_grating(float(x), n) for x in h], dtype=D)
        # relative to the peak height n: the values are differences of O(n) quantities
        assert (got - exact).abs().max() < 1e-12 * n

    @pytest.mark.parametrize("n", [5, 37])
    def test_float32_matches_float64(self, n):
        h = ((torch.rand(20000, generator=torch.Generator().manual_seed(1), dtype=D) - 0.5) * 60).float()
        got = grating(h, torch.tensor(float(n))).double()
        ref = grating(h.double(), torch.tensor(float(n), dtype=D))
        assert (got - ref).abs().max() < 1e-5 * n

    def test_c_formula_agrees_away_from_integers(self):
        h = torch.linspace(-30.3, 30.7, 10001, dtype=D)
        h = h[(h - h.round()).abs() > 0.01]     # near integers the C formula divides rounding errors
        c = torch.sin(5 * math.pi * h) / torch.sin(math.pi * h)     # nanoBragg's sincg(pi h, 5)
        assert torch.allclose(grating(h, torch.tensor(5.0, dtype=D)), c, rtol=0, atol=1e-11)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_series_and_quotient_meet_at_the_switch(self, dtype):
        n = 5.0
        limit = _SERIES_LIMIT[dtype] / n
        h = torch.tensor([3 + limit * (1 - 1e-6), 3 + limit * (1 + 1e-6)], dtype=D)
        values = grating(h.to(dtype), torch.tensor(n, dtype=dtype)).double()
        exact = torch.tensor([mp_grating(float(x), 5) for x in h.to(dtype).double()], dtype=D)
        tol = 1e-14 if dtype == torch.float64 else 1e-6
        assert torch.allclose(values, exact, rtol=tol, atol=0)

    def test_one_cell_is_exactly_one(self):
        h = torch.linspace(-3, 3, 10001, dtype=D)
        assert torch.equal(grating(h, torch.tensor(1.0, dtype=D)), torch.ones_like(h))

    def test_axes_with_n_at_most_one_contribute_one(self):
        hkl = torch.tensor([[0.3, 0.7, 2.2]], dtype=D)
        n = torch.tensor([0.0, 1.0, 5.0], dtype=D)
        f = lattice_factor("square", hkl, torch.eye(3, dtype=D), n, torch.tensor(1.0, dtype=D))
        assert torch.allclose(f, grating(hkl[:, 2], n[2]))

    def test_finite_gradient_at_zero(self):
        h = torch.tensor(0.0, dtype=D, requires_grad=True)
        n = torch.tensor(4.0, dtype=D, requires_grad=True)
        grating(h, n).backward()
        assert torch.isfinite(h.grad) and torch.isfinite(n.grad)

    @pytest.mark.parametrize("d", [0.0, 1e-12, 1e-8, 1e-5, 1e-3, 0.01, 0.2])
    def test_derivatives_near_a_peak(self, d):
        # d/dh and d2/dh2 of sin(n pi h)/sin(pi h) at h = 1 + d, against 50-digit arithmetic
        n = 5
        h = torch.tensor(1.0 + d, dtype=D)
        with mpmath.workdps(50):
            x = mpmath.mpf(float(h))
            exact = [float(mpmath.diff(lambda t: mpmath.sin(n * mpmath.pi * t) / mpmath.sin(mpmath.pi * t), x, k))
                     if d else float(v) for k, v in ((1, 0.0), (2, -n * (n * n - 1) / 3 * math.pi**2))]
        first = torch.func.grad(lambda t: grating(t, torch.tensor(5.0, dtype=D)))
        second = torch.func.grad(first)
        scale = [n * math.pi**2 * n * n, n * math.pi**2 * n * n]     # size of the derivatives near the peak
        assert abs(float(first(h)) - exact[0]) < 1e-9 * scale[0]
        assert abs(float(second(h)) - exact[1]) < 1e-9 * scale[1]

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_sinpi_polynomial_is_accurate(self, dtype):
        g = torch.linspace(-0.5, 0.5, 100001, dtype=D)
        exact = torch.sin(math.pi * g)
        got = sinpi_reduced(g.to(dtype)).double()
        ulp = torch.finfo(dtype).eps
        assert (got - exact).abs().max() < 2 * ulp


@pytest.mark.parametrize("n", [1.0, 2.0, 5.0, 37.0])
def test_grating_derivatives_equal_autograd(n):
    h = torch.cat([torch.linspace(-20.3, 20.7, 801, dtype=D),
                   torch.tensor([3.0, 3 + 1e-9, 3 + 1e-3, 2.5, 0.0, 1 + 0.0019, 1 + 0.0021], dtype=D)])
    nn = torch.tensor(n, dtype=D, requires_grad=True)
    hh = h.clone().requires_grad_(True)
    value, d_h, d_n = grating_and_derivatives(h, torch.tensor(n, dtype=D))
    reference = grating(hh, nn)
    assert torch.equal(value, reference.detach())
    (grad_h,) = torch.autograd.grad(reference.sum(), hh, retain_graph=True)
    torch.testing.assert_close(d_h, grad_h, rtol=1e-12, atol=1e-13 * n**3)
    grad_n = torch.stack([torch.autograd.grad(r, nn, retain_graph=True)[0] for r in reference[::40]])
    torch.testing.assert_close(d_n[::40], grad_n, rtol=1e-12, atol=1e-13 * n)


@pytest.mark.parametrize("n", [2.0, 5.0, 37.0])
def test_grating_second_derivatives_equal_autograd(n):
    """d2G/dh2, d2G/dh dn and d2G/dn2 against autograd twice through `grating` (exact in its
    first four derivatives in n at the peaks), on both branches: near and at peaks of order
    0 and k != 0 (the series) and between them (the quotient)."""
    h = torch.tensor([0.3, -1.2, 0.49, 2.5, 0.0, 1e-4, 3.0, 3 + 1e-9, 3 + 1e-3, 1 + 0.0019, -2.0009,
                      7 + 2e-4], dtype=D)
    got = grating_second_derivatives(h, torch.tensor(n, dtype=D))
    first = grating_and_derivatives(h, torch.tensor(n, dtype=D))
    for a, b in zip(got[:3], first):  # the same, up to the order of a product's factors
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0.0)
    for i in range(len(h)):
        hh, nn = h[i].clone().requires_grad_(True), torch.tensor(n, dtype=D, requires_grad=True)
        d_h, d_n = torch.autograd.grad(grating(hh, nn), (hh, nn), create_graph=True)
        hh_, hn = torch.autograd.grad(d_h, (hh, nn), retain_graph=True)
        (nn_,) = torch.autograd.grad(d_n, nn)
        for what, value, expected in (("hh", got[3][i], hh_), ("hn", got[4][i], hn), ("nn", got[5][i], nn_)):
            torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12 * n**4,
                                       msg=lambda m: f"d2G/d{what} at h = {float(h[i])}: {m}")


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


@pytest.mark.parametrize("shape", ["square", "round", "gauss", "gauss_hkl", "tophat"])
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


class TestDomainSizeTensor:
    """Off-diagonal domain-size terms (Nd, Ne, Nf) of the Gaussian shape (docs/physics.md)."""

    recip = torch.tensor([[0.020, 0.001, -0.002], [0.0, 0.017, 0.003], [0.0, 0.0, 0.014]], dtype=D)
    n = torch.tensor([5.0, 6.0, 7.0], dtype=D)
    fudge = torch.tensor(1.3, dtype=D)
    offdiag = torch.tensor([0.8, -0.5, 0.3], dtype=D)

    def hkl(self):
        return (torch.rand(300, 3, generator=torch.Generator().manual_seed(3), dtype=D) - 0.5) * 8

    @pytest.mark.parametrize("shape", ["square", "round", "gauss", "gauss_hkl", "tophat"])
    def test_zero_offdiagonals_are_bit_for_bit_the_plain_factor(self, shape):
        hkl = self.hkl()
        plain = lattice_factor(shape, hkl, self.recip, self.n, self.fudge)
        zeros = lattice_factor(shape, hkl, self.recip, self.n, self.fudge, torch.zeros(3, dtype=D))
        assert torch.equal(plain, zeros)

    def test_gauss_is_the_documented_matrix_formula(self):
        hkl = self.hkl()
        na, nb, nc = self.n.tolist()
        nd, ne, nf = self.offdiag.tolist()
        size = torch.tensor([[na, nd, nf], [nd, nb, ne], [nf, ne, nc]], dtype=D)
        dhkl = hkl - torch.ceil(hkl - 0.5)
        coupled = dhkl @ (torch.diag(1.0 / self.n) @ size).T      # rows D^-1 N dh
        rad = ((coupled @ self.recip) ** 2).sum(-1) * (na * nb * nc) ** 2
        expected = torch.linalg.det(size) * torch.exp(-rad / 0.63 * self.fudge)
        got = lattice_factor("gauss", hkl, self.recip, self.n, self.fudge, self.offdiag)
        assert torch.allclose(got, expected, rtol=1e-12, atol=0)
        assert not torch.allclose(got, lattice_factor("gauss", hkl, self.recip, self.n, self.fudge))

    @pytest.mark.parametrize("shape", ["square", "round", "tophat"])
    def test_other_shapes_ignore_offdiagonals(self, shape):
        hkl = self.hkl()
        plain = lattice_factor(shape, hkl, self.recip, self.n, self.fudge)
        assert torch.equal(plain, lattice_factor(shape, hkl, self.recip, self.n, self.fudge, self.offdiag))

    def test_peak_is_det_n_within_hadamards_bound(self):
        peak = lattice_factor("gauss", torch.tensor([2.0, -1.0, 3.0], dtype=D), self.recip, self.n,
                              self.fudge, self.offdiag)
        na, nb, nc = self.n.tolist()
        nd, ne, nf = self.offdiag.tolist()
        size = torch.tensor([[na, nd, nf], [nd, nb, ne], [nf, ne, nc]], dtype=D)
        assert torch.allclose(peak, torch.linalg.det(size), rtol=1e-14)
        # the overflow bound of nbfunc.params takes F_latt <= Na Nb Nc
        assert peak < na * nb * nc


class TestGaussHkl:
    """diffBragg's Gaussian lattice factor, ``det N exp(-|N dH|^2 fudge/0.63)`` with the offset
    ``dH`` in Miller units (simtbx/diffBragg/src/diffBragg_cpu_kernel.cpp, docs/physics.md)."""

    recip = TestDomainSizeTensor.recip
    n = TestDomainSizeTensor.n
    fudge = TestDomainSizeTensor.fudge
    offdiag = TestDomainSizeTensor.offdiag

    def hkl(self):
        return (torch.rand(400, 3, generator=torch.Generator().manual_seed(8), dtype=D) - 0.5) * 8

    def matrix(self):
        (na, nb, nc), (nd, ne, nf) = self.n.tolist(), self.offdiag.tolist()
        return torch.tensor([[na, nd, nf], [nd, nb, ne], [nf, ne, nc]], dtype=D)

    def test_is_the_matrix_formula(self):
        hkl = self.hkl()
        dhkl = hkl - torch.ceil(hkl - 0.5)
        size = self.matrix()
        v = dhkl @ size.T                                     # rows N dH
        expected = torch.linalg.det(size) * torch.exp(-(v * v).sum(-1) / 0.63 * self.fudge)
        got = lattice_factor("gauss_hkl", hkl, self.recip, self.n, self.fudge, self.offdiag)
        assert torch.allclose(got, expected, rtol=1e-12, atol=0)
        assert got.max() > 1.0 and got.min() < 1e-3          # peaks and tails both sampled

    def test_zero_offdiagonals_are_cctbx_nanobraggs_gauss(self):
        """cctbx's nanoBragg (simtbx/nanoBragg/nanoBragg.cpp, shape GAUSS) measures the offset
        in Miller units: ``Na Nb Nc exp(-(dh^2 Na^2 + dk^2 Nb^2 + dl^2 Nc^2)/0.63 fudge)``."""
        hkl = self.hkl()
        dh, dk, dl = (hkl - torch.ceil(hkl - 0.5)).unbind(-1)
        na, nb, nc = self.n.tolist()
        hrad = dh * dh * na * na + dk * dk * nb * nb + dl * dl * nc * nc
        expected = na * nb * nc * torch.exp(-(hrad / 0.63 * self.fudge))
        got = lattice_factor("gauss_hkl", hkl, self.recip, self.n, self.fudge)
        # the same sum in another order: exp(-x) carries its argument's rounding, x eps with x
        # up to ~60 in the tails here, so about 1e-14 relative
        assert torch.allclose(got, expected, rtol=1e-13, atol=0)

    def test_ignores_the_reciprocal_cell_unlike_the_c_programs_gauss(self):
        hkl = self.hkl()
        a = lattice_factor("gauss_hkl", hkl, self.recip, self.n, self.fudge, self.offdiag)
        b = lattice_factor("gauss_hkl", hkl, 2.0 * self.recip, self.n, self.fudge, self.offdiag)
        assert torch.equal(a, b)
        c_gauss = lattice_factor("gauss", hkl, self.recip, self.n, self.fudge, self.offdiag)
        assert not torch.allclose(a, c_gauss, rtol=1e-3)

    def test_peak_is_det_n_and_the_exponent_is_never_positive(self):
        peak = lattice_factor("gauss_hkl", torch.tensor([2.0, -1.0, 3.0], dtype=D), self.recip,
                              self.n, self.fudge, self.offdiag)
        assert torch.allclose(peak, torch.linalg.det(self.matrix()), rtol=1e-14)
        values = lattice_factor("gauss_hkl", self.hkl(), self.recip, self.n, self.fudge, self.offdiag)
        assert bool((values <= peak * (1 + 1e-15)).all())

    def test_float32_agrees_with_float64(self):
        hkl = self.hkl()
        args = (self.recip, self.n, self.fudge, self.offdiag)
        f64 = lattice_factor("gauss_hkl", hkl, *args)
        f32 = lattice_factor("gauss_hkl", hkl.float(), *(a.float() for a in args))
        assert f32.dtype == torch.float32
        assert torch.allclose(f32.double(), f64, rtol=2e-4, atol=1e-4 * float(f64.max()))

    def test_derivatives_in_the_size_terms_are_diffbraggs(self):
        """d F/d N_ij = F (tr(N^-1 dN) - 2 fudge/0.63 (dN dH).(N dH)), the kernel's
        ``determ_deriv - C dV_dN.dot(V)`` with ``C = 2 fudge/0.63``."""
        hkl = self.hkl()[:50]
        dhkl = hkl - torch.ceil(hkl - 0.5)
        size = self.matrix()
        inverse = torch.linalg.inv(size)
        fn = lambda n, off: lattice_factor("gauss_hkl", hkl, self.recip, n, self.fudge, off)
        d_n, d_off = torch.func.jacrev(fn, argnums=(0, 1))(self.n, self.offdiag)
        value = fn(self.n, self.offdiag)
        v = dhkl @ size.T
        pairs = [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]   # Na Nb Nc Nd Ne Nf
        columns = torch.cat([d_n, d_off], -1)
        for col, (i, j) in enumerate(pairs):
            dn = torch.zeros(3, 3, dtype=D)
            dn[i, j] = dn[j, i] = 1.0
            coef = torch.trace(inverse @ dn) - 2 * float(self.fudge) / 0.63 * ((dhkl @ dn.T) * v).sum(-1)
            assert torch.allclose(columns[:, col], value * coef, rtol=1e-10, atol=1e-12), (i, j)
