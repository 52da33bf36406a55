"""Lattice transforms F_latt of the four crystal shapes.

All functions are elementwise over any batch shape and safe to differentiate at their
removable singularities (both branches of every ``torch.where`` are finite).
"""
from __future__ import annotations

import math

import torch

ROUND_NORM = 0.723601254558268
"""nanoBragg's correction for the volume ratio of a cube and a sphere (dimensionless)."""


def sincg(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Grating function ``sin(n x)/sin(x)``; at ``x = k pi`` its limit ``n (-1)^(k (n - 1))``.

    nanoBragg special-cases only ``x = 0`` (value ``n``). Within 1e-10 rad of another multiple
    of pi, where ``sin(x)`` is pure rounding error, the limit for whole ``n`` (``n`` rounded to
    the nearest whole number for the sign; a non-whole ``n`` has a pole there) is used instead,
    so exact Bragg conditions give the peak value and finite gradients. There
    the limit is multiplied by ``1 - (n^2 - 1) d^2/6`` (``d = x - k pi``), which leaves the value
    unchanged to rounding and gives the correct second derivative ``-n (n^2 - 1)/3`` in x.

    Args:
        x: (*) phase (rad), typically ``pi*h``; n: number of cells (broadcast).

    >>> sincg(torch.tensor(0.0), torch.tensor(5.0))
    tensor(5.)
    """
    k = torch.round(x / math.pi)
    d = x - k * math.pi
    near = torch.abs(d) < 1e-10
    safe_x = torch.where(near, 0.5, x)
    odd = torch.remainder(k * (torch.round(n) - 1.0), 2.0)
    limit = n * (1.0 - 2.0 * odd)
    near_value = limit * (1.0 - (n * n - 1.0) * (d * d) / 6.0)
    return torch.where(near, near_value, torch.sin(n * safe_x) / torch.sin(safe_x))


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
    """Parallelepiped crystal: product of ``sincg(pi h, Na)`` over the three axes.

    As nanoBragg, an axis with N <= 1 contributes a factor 1.

    Args:
        hkl: (*, 3) fractional Miller indices (or their three components); n_cells: (3,).
    """
    result = None
    for x, n in zip(components(hkl), n_cells.unbind(-1)):
        term = torch.where(n > 1, sincg(math.pi * x, n), 1.0)
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


def reciprocal_distance_sq(dhkl: torch.Tensor | Components, recip: torch.Tensor,
                           n_cells: torch.Tensor) -> torch.Tensor:
    """``|dh a* + dk b* + dl c*|^2 (Na Nb Nc)^2`` with a*, b*, c* in 1/Angstrom (nanoBragg's units).

    Args:
        dhkl: (*, 3) or components; recip: (3, 3) rows a*, b*, c*; n_cells: (3,).
    """
    dh, dk, dl = components(dhkl)
    total = 0.0
    for axis in range(3):
        d = dh * recip[..., 0, axis] + dk * recip[..., 1, axis] + dl * recip[..., 2, axis]
        total = total + d * d
    return total * n_cells.prod(-1) ** 2


def gauss_lattice(rad_star_sq: torch.Tensor, n_cells: torch.Tensor, fudge: torch.Tensor) -> torch.Tensor:
    """Gaussian spots: ``Na Nb Nc exp(-rad*^2/0.63 * fudge)``."""
    return n_cells.prod(-1) * torch.exp(-(rad_star_sq / 0.63 * fudge))


def tophat_lattice(rad_star_sq: torch.Tensor, n_cells: torch.Tensor, fudge: torch.Tensor) -> torch.Tensor:
    """Flat-top spots: ``Na Nb Nc`` inside ``rad*^2 fudge < 0.3969``, 0 outside."""
    inside = rad_star_sq * fudge < 0.3969
    return torch.where(inside, n_cells.prod(-1), torch.zeros_like(rad_star_sq))


def lattice_factor(shape: str, hkl: torch.Tensor | Components, recip: torch.Tensor,
                   n_cells: torch.Tensor, fudge: torch.Tensor) -> torch.Tensor:
    """F_latt for a crystal ``shape`` in {"square", "round", "gauss", "tophat"}.

    Nearest indices are ``ceil(h - 1/2)`` as in nanoBragg.

    Args:
        hkl: (*, 3) fractional indices or their three components; recip: (3, 3) reciprocal
        cell (1/Angstrom); n_cells: (3,) Na, Nb, Nc; fudge: scalar.
    Returns:
        (*) lattice factor (dimensionless).
    """
    if shape == "square":
        return square_lattice(hkl, n_cells)
    dhkl = tuple(x - torch.ceil(x - 0.5) for x in components(hkl))
    if shape == "round":
        return round_lattice(dhkl, n_cells, fudge)
    rad = reciprocal_distance_sq(dhkl, recip, n_cells)
    if shape == "gauss":
        return gauss_lattice(rad, n_cells, fudge)
    return tophat_lattice(rad, n_cells, fudge)
