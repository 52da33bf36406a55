"""Lattice transforms F_latt of the crystal shapes: the C program's four (square, round,
gauss, tophat) and diffBragg's Gaussian in Miller units (gauss_hkl).

All functions are elementwise over any batch shape and safe to differentiate at their
removable singularities (both branches of every ``torch.where`` are finite).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

ROUND_NORM = 0.723601254558268
"""nanoBragg's correction for the volume ratio of a cube and a sphere (dimensionless)."""


def _taylor_sinpi(terms: int) -> tuple[float, ...]:
    """Coefficients of ``sin(pi g) = g * sum_i c_i (g^2)^i``: ``c_i = (-1)^i pi^(2i+1)/(2i+1)!``."""
    return tuple((-1) ** i * math.pi ** (2 * i + 1) / math.factorial(2 * i + 1) for i in range(terms))


_SINPI = {torch.float64: _taylor_sinpi(11), torch.float32: _taylor_sinpi(7)}
"""Per dtype: on |g| <= 1/2 the first omitted term is below 2e-18 (float64, degree 21) and
7e-10 (float32, degree 13), far under one unit in the last place of sin(pi g)."""

_SERIES_LIMIT = {torch.float64: 0.01, torch.float32: 0.05}
"""|n f| below which `grating` uses its series (see there), per dtype."""


def sinpi_and_derivative(g: torch.Tensor):
    """``(sin(pi g), pi cos(pi g))`` for an already reduced argument, ``|g| <= 1/2`` (a little
    beyond is fine).

    Compiled, a Taylor polynomial in ``g`` with as many terms as the dtype needs and its exact
    derivative ``sum_i (2i+1) c_i g^(2i)``: multiply-adds that inductor fuses and vectorises,
    several times cheaper than library sines (an unused derivative is dropped from the
    compiled graph). Eager, ``torch.sin`` and ``torch.cos``. The two agree to within two units
    in the last place.
    """
    if not torch.compiler.is_compiling():
        return torch.sin(math.pi * g), math.pi * torch.cos(math.pi * g)
    coef = _SINPI.get(g.dtype, _SINPI[torch.float64])
    z = g * g
    acc, dacc = coef[-1], (2 * len(coef) - 1) * coef[-1]
    for i in range(len(coef) - 2, -1, -1):
        acc = acc * z + coef[i]
        dacc = dacc * z + (2 * i + 1) * coef[i]
    return g * acc, dacc


def sinpi_reduced(g: torch.Tensor) -> torch.Tensor:
    """``sin(pi g)`` for a reduced argument (see `sinpi_and_derivative`)."""
    if not torch.compiler.is_compiling():
        # eager, one library sine is cheaper than the polynomial's twenty passes over memory
        return torch.sin(math.pi * g)
    return sinpi_and_derivative(g)[0]


def grating(h: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """nanoBragg's ``sincg(pi h, n) = sin(n pi h)/sin(pi h)`` (dimensionless).

    Both sines are evaluated after an exact argument reduction: with ``k = round(h)`` and
    ``f = h - k`` (exact in floating point), ``sin(pi h) = (-1)^k sin(pi f)``; with ``j`` the
    integer nearest ``n h``, computed as ``n k + n f``, ``sin(n pi h) = (-1)^j sin(pi g)``,
    ``g = (n k - j) + n f``. For whole ``n`` near a Bragg peak ``n k - j`` is exactly 0, so
    ``g = n f`` to one rounding and the ratio keeps full relative precision however close
    ``h`` is to an integer (the C program's ``sin(n x)/sin(x)`` with ``x = pi h`` divides
    rounding errors there; it special-cases only ``h = 0``).

    Where ``|n f|`` is below 0.01 (float64) or 0.05 (float32) and ``n k`` is whole, the
    series ``(-1)^(j-k) n (1 - (n^2-1) z^2/6 + (n^2-1)(3n^2-7) z^4/360
    - (n^2-1)(3n^4-18n^2+31) z^6/15120)``, ``z = pi f``, replaces the quotient: it equals it to
    rounding there (first omitted term below 3e-18 resp. 1e-12 relative) and its derivatives
    do not cancel, so gradients stay exact at and near the peaks. A non-whole ``n`` has poles
    at the integers ``h != 0``; there the quotient is kept (infinite at ``f = 0``).

    The series is a function of ``f`` and ``n`` only, but ``n h`` also moves with ``n``
    through ``n k``: ``dG/dn = pi h cos(n pi h)/sin(pi h)`` has the part
    ``(-1)^(j-k) pi k cos(pi n f)/sin(pi f)``, large near the peaks of order ``k != 0``.
    The series branch therefore evaluates ``cos(pi e) n S + sin(pi e) cos(pi n f)/sin(pi f)``
    with ``e = n k - j``, which is exactly 0 there: the value is the series, and derivatives in
    ``n`` of every order up to the fourth are those of ``sin(n pi h)/sin(pi h)`` (`_shift`).
    Exactly at ``f = 0`` with ``k != 0`` (a pole of the derivative) that part is taken as
    ``pi k (-1)^(j-k)``.

    Args:
        h: (*) fractional Miller index; n: number of cells along that axis (broadcast).
    Returns:
        (*) the grating factor, ``n (-1)^(k(n-1))`` at integer ``h``.

    >>> grating(torch.tensor(0.0), torch.tensor(5.0))
    tensor(5.)
    """
    r = _reduce(h, n)
    quotient = sinpi_reduced(r.g) / sinpi_reduced(r.safe_f)
    cos_e, sin_e = _shift(r.e)
    near_peak = cos_e * (n * _series(r.f, n)[0]) + sin_e * _peak_slope(r, n)
    return r.sign * torch.where(r.use_series, near_peak, quotient)


class _Reduced(NamedTuple):
    f: torch.Tensor           # h - round(h), exact
    e: torch.Tensor           # n k - round(n h): 0 where n k is whole and |n f| < 1/2
    g: torch.Tensor           # n h - round(n h), computed as e + n f
    sign: torch.Tensor        # (-1)^(j - k)
    use_series: torch.Tensor  # bool: |n f| small and n k whole
    safe_f: torch.Tensor      # f, or 1/2 where the series is used
    pole_f: torch.Tensor      # f, or 1/2 where f = 0


def _reduce(h: torch.Tensor, n: torch.Tensor) -> _Reduced:
    k = torch.round(h)
    f = h - k
    nk = n * k
    nf = n * f
    j = torch.round(nk + nf)
    e = nk - j
    t = j - k
    sign = 1.0 - 2.0 * (t - 2.0 * torch.floor(0.5 * t))
    # one comparison for "|n f| small and n k whole" (a non-zero e is at least ~1e-16, so
    # 1e20 |e| >= 1e4): combined boolean masks are slow in inductor's float64 CPU code
    use_series = torch.abs(nf) + 1e20 * torch.abs(e) < _SERIES_LIMIT.get(h.dtype, 0.01)
    return _Reduced(f, e, e + nf, sign, use_series, torch.where(use_series, 0.5, f),
                    torch.where(f == 0, 0.5, f))


def _shift(e: torch.Tensor):
    """``(cos(pi e), sin(pi e))`` by their Taylor polynomials to fourth order: exact in value
    and in the first four derivatives at ``e = 0``, the only place `grating` uses them."""
    z = (math.pi * math.pi) * (e * e)
    return 1.0 - z * (0.5 - z / 24.0), (math.pi * e) * (1.0 - z / 6.0)


def _peak_slope(r: _Reduced, n: torch.Tensor) -> torch.Tensor:
    """``cos(pi n f)/sin(pi f)`` where the series is used (``|n f|`` below `_SERIES_LIMIT`:
    the cosine's series to the sixth power of ``pi n f`` is exact to 2e-17 in float64 and
    1e-11 in float32 there)."""
    return _cos_pi_nf(r, n)[0] / sinpi_reduced(r.pole_f)


def _cos_pi_nf(r: _Reduced, n: torch.Tensor):
    """``cos(pi n f)`` by its series to the sixth power of ``pi n f`` (`_peak_slope`), and the
    series' derivative with respect to ``z = (pi n f)^2``."""
    z = (math.pi * math.pi) * (n * r.f) ** 2
    return 1.0 - z * (0.5 - z * (1.0 / 24.0 - z / 720.0)), -0.5 + z * (1.0 / 12.0 - z / 240.0)


def _series_coefficients(n: torch.Tensor):
    """The coefficients ``(A, B, C)`` of `_series` and their derivatives in ``n``."""
    n2 = n * n
    m = n2 - 1.0
    return ((m / 6.0, m * (3.0 * n2 - 7.0) / 360.0, m * ((3.0 * n2 - 18.0) * n2 + 31.0) / 15120.0),
            (n / 3.0, n * (12.0 * n2 - 20.0) / 360.0, n * ((18.0 * n2 - 84.0) * n2 + 98.0) / 15120.0))


def _series(f: torch.Tensor, n: torch.Tensor):
    """``S = 1 - A z + B z^2 - C z^3`` (``z = pi^2 f^2``) with ``dS/dz`` and ``dS/dn``."""
    z = (math.pi * math.pi) * (f * f)
    (a, b, c), (da, db, dc) = _series_coefficients(n)
    value = 1.0 - z * (a - z * (b - z * c))
    d_z = -a + z * (2.0 * b - 3.0 * z * c)
    d_n = -z * (da - z * (db - z * dc))
    return value, d_z, d_n


def grating_and_derivatives(h: torch.Tensor, n: torch.Tensor):
    """`grating` with its partial derivatives, for hand-written gradients.

    Returns:
        ``(G, dG/dh, dG/dn)``, each of the broadcast shape of ``h`` and ``n``.
    """
    r = _reduce(h, n)
    sin_g, dsin_g = sinpi_and_derivative(r.g)
    sin_f, dsin_f = sinpi_and_derivative(r.safe_f)
    quotient = sin_g / sin_f
    series, series_dz, series_dn = _series(r.f, n)
    value = torch.where(r.use_series, n * series, quotient)
    d_h = torch.where(r.use_series, n * series_dz * (2.0 * math.pi * math.pi) * r.f,
                      (n * dsin_g - quotient * dsin_f) / sin_f)
    # n k moves with n too: d(n h)/dn = k + f (see `grating`)
    d_n = torch.where(r.use_series, series + n * series_dn + math.pi * torch.round(h) * _peak_slope(r, n),
                      dsin_g * h / sin_f)
    return r.sign * value, r.sign * d_h, r.sign * d_n


def grating_second_derivatives(h: torch.Tensor, n: torch.Tensor):
    """`grating_and_derivatives` with the second derivatives that its derivatives' tangents
    along ``h`` need, for hand-written Hessian-vector products.

    Away from the peaks (the quotient ``G = sin(pi g)/sin(pi f)``):
    ``d2G/dh2 = pi^2 (1 - n^2) G - 2 (dG/dh) pi cos(pi f)/sin(pi f)`` and
    ``d2G/dh dn = -pi^2 n h G + (pi cos(pi g) - (dG/dn) pi cos(pi f))/sin(pi f)``; on the
    series branch, the series' own derivatives (``G = n S(z)``, ``z = pi^2 f^2``) and that of
    the peak slope ``cos(pi n f)/sin(pi f)`` (taken as 0 exactly at ``f = 0``, where
    `grating_and_derivatives` takes the slope itself as 1).

    ``d2G/dn2`` is ``-pi^2 h^2 G`` on the quotient branch; on the series branch, the second
    derivative in ``n`` of `grating`'s ``cos(pi e) n S + sin(pi e) cos(pi n f)/sin(pi f)``
    at ``e = n k - j = 0`` (``de/dn = k``): ``(n S)'' + 2 pi k slope' - pi^2 k^2 n S``.

    Returns:
        ``(G, dG/dh, dG/dn, d2G/dh2, d2G/dh dn, d2G/dn2)``, each of the broadcast shape of
        ``h`` and ``n``.
    """
    r = _reduce(h, n)
    sin_g, dsin_g = sinpi_and_derivative(r.g)
    sin_f, dsin_f = sinpi_and_derivative(r.safe_f)
    quotient = sin_g / sin_f
    cot = dsin_f / sin_f  # pi cos(pi f)/sin(pi f)
    q_h = (n * dsin_g - quotient * dsin_f) / sin_f
    q_n = dsin_g * h / sin_f
    q_hh = (math.pi * math.pi) * (1.0 - n * n) * quotient - 2.0 * q_h * cot
    q_hn = -(math.pi * math.pi) * n * h * quotient + (dsin_g - q_n * dsin_f) / sin_f
    # series branch: S, S_z, S_n with S_zz and S_nz; z = pi^2 f^2, dz/dh = 2 pi^2 f
    series, series_dz, series_dn = _series(r.f, n)
    z = (math.pi * math.pi) * (r.f * r.f)
    n2 = n * n
    (_, b, c), (da, db, dc) = _series_coefficients(n)
    series_dzz = 2.0 * b - 6.0 * z * c
    series_dnz = -da + z * (2.0 * db - 3.0 * z * dc)
    dz_dh = (2.0 * math.pi * math.pi) * r.f
    sin_p, dsin_p = sinpi_and_derivative(r.pole_f)
    cos_nf, dcos_dz = _cos_pi_nf(r, n)  # z here (pi n f)^2
    slope = cos_nf / sin_p  # `_peak_slope`
    dcos_nf = dcos_dz * (2.0 * math.pi * math.pi) * n * n * r.f
    slope_dh = torch.where(r.f == 0, 0.0, (dcos_nf - cos_nf * dsin_p / sin_p) / sin_p)
    k = torch.round(h)
    s_val = n * series
    s_h = n * series_dz * dz_dh
    s_n = series + n * series_dn + math.pi * k * slope
    s_hh = n * (series_dzz * dz_dh * dz_dh + series_dz * (2.0 * math.pi * math.pi))
    s_hn = dz_dh * (series_dz + n * series_dnz) + math.pi * k * slope_dh
    dda, ddb, ddc = 1.0 / 3.0, (36.0 * n2 - 20.0) / 360.0, ((90.0 * n2 - 252.0) * n2 + 98.0) / 15120.0
    series_dnn = -z * (dda - z * (ddb - z * ddc))
    slope_dn = dcos_dz * (2.0 * math.pi * math.pi) * n * r.f * r.f / sin_p
    s_nn = (2.0 * series_dn + n * series_dnn + 2.0 * math.pi * k * slope_dn
            - (math.pi * math.pi) * k * k * s_val)
    q_nn = -(math.pi * math.pi) * h * h * quotient
    pick = lambda a, q: r.sign * torch.where(r.use_series, a, q)  # noqa: E731
    return (pick(s_val, quotient), pick(s_h, q_h), pick(s_n, q_n), pick(s_hh, q_hh), pick(s_hn, q_hn),
            pick(s_nn, q_nn))


def sinc3(x: torch.Tensor) -> torch.Tensor:
    """Transform of a sphere, ``3 (sin x / x - cos x)/x^2``, equal to 1 at 0.

    Below |x| = 1e-3 the Taylor series ``1 - x^2/10 + x^4/280`` replaces the cancelling
    formula (the two agree to 1e-13 there).
    """
    small = torch.abs(x) < 1e-3
    safe_x = torch.where(small, 1.0, x)
    exact = 3.0 * (torch.sin(safe_x) / safe_x - torch.cos(safe_x)) / safe_x**2
    x2 = x * x
    return torch.where(small, 1.0 - x2 / 10.0 + x2 * x2 / 280.0, exact)


Components = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def components(v: torch.Tensor | Components) -> Components:
    """The three components of a vector given as a (*, 3) tensor or as a tuple of (*) tensors.

    The renderer passes tuples: elementwise code over contiguous (*) tensors vectorises far
    better than code over a trailing axis of length 3.
    """
    return tuple(v.unbind(-1)) if isinstance(v, torch.Tensor) else tuple(v)


def square_lattice(hkl: torch.Tensor | Components, n_cells: torch.Tensor) -> torch.Tensor:
    """Parallelepiped crystal: product of ``grating(h, Na)`` over the three axes.

    As nanoBragg, an axis with N <= 1 contributes a factor 1.

    Args:
        hkl: (*, 3) fractional Miller indices (or their three components); n_cells: (3,).
    """
    result = None
    # grating(h, 1) is exactly 1, so N <= 1 becomes N = 1 on the scalar, not a per-element select
    n_eff = torch.where(n_cells > 1, n_cells, torch.ones_like(n_cells))
    for x, n in zip(components(hkl), n_eff.unbind(-1)):
        term = grating(x, n)
        result = term if result is None else result * term
    return result


def round_lattice(dhkl: torch.Tensor | Components, n_cells: torch.Tensor, fudge: torch.Tensor) -> torch.Tensor:
    """Ellipsoidal crystal: ``Na Nb Nc 0.7236 sinc3(pi sqrt(fudge sum((dh N)^2)))``.

    Args:
        dhkl: (*, 3) distance to the nearest integer indices, ``h - h0`` (or its components).
    """
    na, nb, nc = n_cells.unbind(-1)
    dh, dk, dl = components(dhkl)
    r2 = ((dh * na) ** 2 + (dk * nb) ** 2 + (dl * nc) ** 2) * fudge
    positive = r2 > 0
    radius = torch.where(positive, torch.sqrt(torch.where(positive, r2, 1.0)), 0.0)
    # at r2 = 0 the series of sinc3(pi sqrt(r2)) in r2 (exactly 1 there) keeps the second
    # derivatives that the square root would lose
    at_zero = 1.0 - r2 * (math.pi**2 / 10.0) + r2 * r2 * (math.pi**4 / 280.0)
    return na * nb * nc * ROUND_NORM * torch.where(positive, sinc3(math.pi * radius), at_zero)


def size_determinant(n_cells: torch.Tensor, n_offdiag: torch.Tensor | None = None) -> torch.Tensor:
    """``det N`` of the domain-size matrix ``N = [[Na, Nd, Nf], [Nd, Nb, Ne], [Nf, Ne, Nc]]``
    (cells^3, the number of cells in the domain).

    Written as ``Na Nb Nc + (2 Nd Ne Nf - Na Ne^2 - Nb Nf^2 - Nc Nd^2)``: with zero
    off-diagonal terms the bracket is exactly 0, so the result is bit for bit ``Na Nb Nc``.

    Args:
        n_cells: (*, 3) Na, Nb, Nc; n_offdiag: (*, 3) Nd, Ne, Nf (cells), or None for zeros.
    Returns:
        (*) the determinant.
    """
    product = n_cells.prod(-1)
    if n_offdiag is None:
        return product
    na, nb, nc = n_cells.unbind(-1)
    nd, ne, nf = n_offdiag.unbind(-1)
    return product + (2.0 * nd * ne * nf - na * ne * ne - nb * nf * nf - nc * nd * nd)


def coupled_offsets(dhkl: torch.Tensor | Components, n_cells: torch.Tensor,
                    n_offdiag: torch.Tensor | None) -> Components:
    """The Miller offsets turned by the relative shape ``diag(Na, Nb, Nc)^-1 N``.

    ``dh' = dh + (Nd dk + Nf dl)/Na``, ``dk' = dk + (Nd dh + Ne dl)/Nb``,
    ``dl' = dl + (Nf dh + Ne dk)/Nc`` (dimensionless). With zero off-diagonal terms each
    added quotient is a signed zero, so the offsets come back bit for bit unchanged.

    Args:
        dhkl: (*, 3) offsets from the nearest integer indices, or their components;
        n_cells: (3,) Na, Nb, Nc; n_offdiag: (3,) Nd, Ne, Nf (cells), or None (no change).
    Returns:
        the three (*) components.
    """
    dh, dk, dl = components(dhkl)
    if n_offdiag is None:
        return dh, dk, dl
    na, nb, nc = n_cells.unbind(-1)
    nd, ne, nf = n_offdiag.unbind(-1)
    return (dh + (nd * dk + nf * dl) / na, dk + (nd * dh + ne * dl) / nb,
            dl + (nf * dh + ne * dk) / nc)


def reciprocal_distance_sq(dhkl: torch.Tensor | Components, recip: torch.Tensor,
                           n_cells: torch.Tensor, n_offdiag: torch.Tensor | None = None) -> torch.Tensor:
    """``|dh' a* + dk' b* + dl' c*|^2 (Na Nb Nc)^2`` with a*, b*, c* in 1/Angstrom (nanoBragg's
    units), ``(dh', dk', dl')`` the offsets coupled by the off-diagonal size terms
    (`coupled_offsets`; the plain offsets when they are zero or None).

    Args:
        dhkl: (*, 3) or components; recip: (3, 3) rows a*, b*, c*; n_cells: (3,);
        n_offdiag: (3,) Nd, Ne, Nf (cells) or None.
    Returns:
        (*) nanoBragg's ``rad_star_sqr`` (1/Angstrom^2 times cells^6, used as a pure number).
    """
    x = _reciprocal_offset(coupled_offsets(dhkl, n_cells, n_offdiag), recip)
    return _squared(x) * n_cells.prod(-1) ** 2


def _reciprocal_offset(coupled: Components, recip: torch.Tensor) -> list:
    """The three components of ``dh' a* + dk' b* + dl' c*`` (1/Angstrom) for (*) offsets."""
    dh, dk, dl = coupled
    return [dh * recip[..., 0, axis] + dk * recip[..., 1, axis] + dl * recip[..., 2, axis]
            for axis in range(3)]


def _squared(x: list) -> torch.Tensor:
    """``x_0^2 + x_1^2 + x_2^2``, summed in that order."""
    return x[0] * x[0] + x[1] * x[1] + x[2] * x[2]


def miller_distance_sq(dhkl: torch.Tensor | Components, n_cells: torch.Tensor,
                       n_offdiag: torch.Tensor | None = None) -> torch.Tensor:
    """``|N dH|^2``: the Miller offsets ``dH = (dh, dk, dl)`` times the domain-size matrix
    ``N = [[Na, Nd, Nf], [Nd, Nb, Ne], [Nf, Ne, Nc]]``, squared (dimensionless: cells times
    Miller units). diffBragg's ``hrad_sqr`` (simtbx/diffBragg/src/diffBragg_cpu_kernel.cpp,
    ``V = NABC*delta_H``); with zero or no off-diagonal terms it is cctbx nanoBragg's
    ``(h-h0)^2 Na^2 + (k-k0)^2 Nb^2 + (l-l0)^2 Nc^2``.

    Args:
        dhkl: (*, 3) offsets from the nearest integer indices, or their components;
        n_cells: (3,) Na, Nb, Nc; n_offdiag: (3,) Nd, Ne, Nf (cells), or None for zeros.
    Returns:
        (*) the squared length.
    """
    dh, dk, dl = components(dhkl)
    na, nb, nc = n_cells.unbind(-1)
    if n_offdiag is None:
        return (na * dh) ** 2 + (nb * dk) ** 2 + (nc * dl) ** 2
    nd, ne, nf = n_offdiag.unbind(-1)
    v1 = na * dh + nd * dk + nf * dl
    v2 = nd * dh + nb * dk + ne * dl
    v3 = nf * dh + ne * dk + nc * dl
    return v1 * v1 + v2 * v2 + v3 * v3


def gauss_lattice(rad_star_sq: torch.Tensor, n_cells: torch.Tensor, fudge: torch.Tensor,
                  n_offdiag: torch.Tensor | None = None) -> torch.Tensor:
    """Gaussian spots: ``det N exp(-rad^2/0.63 * fudge)`` (``det N = Na Nb Nc`` without
    off-diagonal terms, `size_determinant`). ``rad^2`` is `reciprocal_distance_sq` for the C
    program's shape 'gauss' and `miller_distance_sq` for diffBragg's 'gauss_hkl'."""
    return size_determinant(n_cells, n_offdiag) * torch.exp(-(rad_star_sq / 0.63 * fudge))


def gauss_and_derivatives(hkl, recip: torch.Tensor, n_cells: torch.Tensor, fudge: torch.Tensor,
                          n_offdiag: torch.Tensor, shape_rows: bool = True):
    """The C program's Gaussian spots (`lattice_factor` "gauss", the same value bit for bit)
    with their partial derivatives, for hand-written gradients.

    With ``dH'`` the coupled offsets (`coupled_offsets`, ``dH' = M dH``), ``x = dH' R`` (R the
    rows a*, b*, c*), ``rad = |x|^2 (Na Nb Nc)^2`` and ``F = det N exp(-rad fudge/0.63)``:
    ``dF/drad = -F fudge/0.63``, ``dF/dH' = dF/drad 2 (Na Nb Nc)^2 R x``, ``dF/dH = M^T
    dF/dH'``; N and the off-diagonal terms enter through ``det N``, ``(Na Nb Nc)^2`` and M.

    Args:
        hkl: three (*) fractional indices; recip: (3, 3) rows a*, b*, c* (1/Angstrom);
        n_cells: (3,) Na, Nb, Nc; fudge: 0-d; n_offdiag: (3,) Nd, Ne, Nf (cells);
        shape_rows: False leaves out dF/dfudge and dF/dNd Ne Nf (None in their place).
    Returns:
        ``(F, dF/dh (3), dF/dN (3), dF/drecip (9, row-major), dF/dfudge, dF/dNd Ne Nf (3))``,
        each (*) array in a list (the offsets' rounding is held: derivatives a.e.).
    """
    dh = miller_offsets(hkl)
    coupled = coupled_offsets(dh, n_cells, n_offdiag)
    x = _reciprocal_offset(coupled, recip)
    total = _squared(x)  # as `reciprocal_distance_sq`
    product = n_cells.prod(-1)
    rad = total * product ** 2
    damping = torch.exp(-(rad / 0.63 * fudge))
    value = size_determinant(n_cells, n_offdiag) * damping
    d_rad = value * (-fudge / 0.63)
    slope = d_rad * (2.0 * product ** 2)  # dF/dx_j = slope x_j
    y = [slope * (x[0] * recip[..., k, 0] + x[1] * recip[..., k, 1] + x[2] * recip[..., k, 2])
         for k in range(3)]
    na, nb, nc = n_cells.unbind(-1)
    nd, ne, nf = n_offdiag.unbind(-1)
    d_h = [y[0] + y[1] * (nd / nb) + y[2] * (nf / nc), y[0] * (nd / na) + y[1] + y[2] * (ne / nc),
           y[0] * (nf / na) + y[1] * (ne / nb) + y[2]]
    by_size = d_rad * total * (2.0 * product)  # dF/d(Na Nb Nc) through rad
    # through det N, through (Na Nb Nc)^2 in rad, and through M (dH'_i moves by -(...)/N_i^2)
    d_n = [damping * (nb * nc - ne * ne) + by_size * (nb * nc)
           - y[0] * (nd * dh[1] + nf * dh[2]) / (na * na),
           damping * (na * nc - nf * nf) + by_size * (na * nc)
           - y[1] * (nd * dh[0] + ne * dh[2]) / (nb * nb),
           damping * (na * nb - nd * nd) + by_size * (na * nb)
           - y[2] * (nf * dh[0] + ne * dh[1]) / (nc * nc)]
    turned = [slope * c for c in coupled]
    d_recip = [turned[k] * x[j] for k in range(3) for j in range(3)]
    if not shape_rows:
        return value, d_h, d_n, d_recip, None, [None] * 3
    d_fudge = value * rad * (-1.0 / 0.63)
    d_offdiag = [damping * (2.0 * (ne * nf - nc * nd)) + y[0] * dh[1] / na + y[1] * dh[0] / nb,
                 damping * (2.0 * (nd * nf - na * ne)) + y[1] * dh[2] / nb + y[2] * dh[1] / nc,
                 damping * (2.0 * (nd * ne - nb * nf)) + y[0] * dh[2] / na + y[2] * dh[0] / nc]
    return value, d_h, d_n, d_recip, d_fudge, d_offdiag


def gauss_hkl_and_derivatives(hkl, n_cells: torch.Tensor, fudge: torch.Tensor,
                              n_offdiag: torch.Tensor, shape_rows: bool = True):
    """diffBragg's Gaussian spots (`lattice_factor` "gauss_hkl", the same value bit for bit)
    with their partial derivatives, for hand-written gradients.

    With ``V = N dH`` (`miller_distance_sq`, N the symmetric domain-size matrix) and ``F = det
    N exp(-|V|^2 fudge/0.63)``: ``dF/d|V|^2 = -F fudge/0.63 = a``, ``dF/dH = 2 a N V``,
    ``dF/dNa = (Nb Nc - Ne^2) e + 2 a V_1 dh`` (e the exponential; likewise Nb, Nc) and
    ``dF/dNd = 2 (Ne Nf - Nc Nd) e + 2 a (V_1 dk + V_2 dh)`` (likewise Ne, Nf).

    Args:
        hkl: three (*) fractional indices; n_cells: (3,) Na, Nb, Nc; fudge: 0-d; n_offdiag:
        (3,) Nd, Ne, Nf (cells); shape_rows: as `gauss_and_derivatives`.
    Returns:
        ``(F, dF/dh (3), dF/dN (3), dF/dfudge, dF/dNd Ne Nf (3))``, each (*) array in a list
        (the offsets' rounding is held: derivatives a.e.).
    """
    dh = miller_offsets(hkl)
    distance = miller_distance_sq(dh, n_cells, n_offdiag)
    damping = torch.exp(-(distance / 0.63 * fudge))
    value = size_determinant(n_cells, n_offdiag) * damping
    slope = value * (-fudge / 0.63) * 2.0  # 2 dF/d|V|^2
    na, nb, nc = n_cells.unbind(-1)
    nd, ne, nf = n_offdiag.unbind(-1)
    v = (na * dh[0] + nd * dh[1] + nf * dh[2], nd * dh[0] + nb * dh[1] + ne * dh[2],
         nf * dh[0] + ne * dh[1] + nc * dh[2])
    sv = [slope * x for x in v]
    d_h = [sv[0] * na + sv[1] * nd + sv[2] * nf, sv[0] * nd + sv[1] * nb + sv[2] * ne,
           sv[0] * nf + sv[1] * ne + sv[2] * nc]
    d_n = [damping * (nb * nc - ne * ne) + sv[0] * dh[0],
           damping * (na * nc - nf * nf) + sv[1] * dh[1],
           damping * (na * nb - nd * nd) + sv[2] * dh[2]]
    if not shape_rows:
        return value, d_h, d_n, None, [None] * 3
    d_fudge = value * distance * (-1.0 / 0.63)
    d_offdiag = [damping * (2.0 * (ne * nf - nc * nd)) + sv[0] * dh[1] + sv[1] * dh[0],
                 damping * (2.0 * (nd * nf - na * ne)) + sv[1] * dh[2] + sv[2] * dh[1],
                 damping * (2.0 * (nd * ne - nb * nf)) + sv[0] * dh[2] + sv[2] * dh[0]]
    return value, d_h, d_n, d_fudge, d_offdiag


def tophat_lattice(rad_star_sq: torch.Tensor, n_cells: torch.Tensor, fudge: torch.Tensor) -> torch.Tensor:
    """Flat-top spots: ``Na Nb Nc`` inside ``rad*^2 fudge < 0.3969``, 0 outside."""
    inside = rad_star_sq * fudge < 0.3969
    return torch.where(inside, n_cells.prod(-1), torch.zeros_like(rad_star_sq))


def nearest_indices(hkl: torch.Tensor | Components) -> Components:
    """The nearest reflection ``(h0, k0, l0) = ceil(hkl - 1/2)`` (nanoBragg's rounding: halves
    go down), as three components of the shape of the indices."""
    return tuple(torch.ceil(x - 0.5) for x in components(hkl))


def miller_offsets(hkl: torch.Tensor | Components) -> Components:
    """``hkl - (h0, k0, l0)``: the offsets from the nearest reflection (`nearest_indices`),
    three components."""
    return tuple(x - x0 for x, x0 in zip(components(hkl), nearest_indices(hkl)))


def lattice_factor(shape: str, hkl: torch.Tensor | Components, recip: torch.Tensor,
                   n_cells: torch.Tensor, fudge: torch.Tensor,
                   n_offdiag: torch.Tensor | None = None) -> torch.Tensor:
    """F_latt for a crystal ``shape`` in {"square", "round", "gauss", "gauss_hkl", "tophat"}.

    Nearest indices are ``ceil(h - 1/2)`` as in nanoBragg. "gauss" is the C program's
    Gaussian (offset measured in reciprocal space), "gauss_hkl" diffBragg's
    (``det N exp(-|N dH|^2 fudge/0.63)``, offset in Miller units). The off-diagonal size
    terms enter the two Gaussian shapes only (docs/physics.md, "Domain-size tensor"); the
    other shapes ignore them.

    Args:
        hkl: (*, 3) fractional indices or their three components; recip: (3, 3) reciprocal
        cell (1/Angstrom); n_cells: (3,) Na, Nb, Nc; fudge: scalar; n_offdiag: (3,) Nd, Ne,
        Nf (cells) or None for zeros.
    Returns:
        (*) lattice factor (dimensionless).
    """
    if shape == "square":
        return square_lattice(hkl, n_cells)
    dhkl = miller_offsets(hkl)
    if shape == "round":
        return round_lattice(dhkl, n_cells, fudge)
    if shape == "gauss":
        rad = reciprocal_distance_sq(dhkl, recip, n_cells, n_offdiag)
        return gauss_lattice(rad, n_cells, fudge, n_offdiag)
    if shape == "gauss_hkl":
        return gauss_lattice(miller_distance_sq(dhkl, n_cells, n_offdiag), n_cells, fudge, n_offdiag)
    return tophat_lattice(reciprocal_distance_sq(dhkl, recip, n_cells), n_cells, fudge)
