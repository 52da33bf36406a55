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
    """Grating function ``sin(n x)/sin(x)``; at ``x = k pi`` its limit ``n cos(n k pi)/cos(k pi)``.

    nanoBragg special-cases only ``x = 0`` (value ``n``). Within 1e-10 rad of another multiple
    of pi, where ``sin(x)`` is pure rounding error, the limit is used instead (for whole ``n``
    it is ``+-n``), so exact Bragg conditions give the peak value and finite gradients.

    Args:
        x: (*) phase (rad), typically ``pi*h``; n: number of cells (broadcast).

    >>> sincg(torch.tensor(0.0), torch.tensor(5.0))
    tensor(5.)
    """
    k = torch.round(x / math.pi)
    near = torch.abs(x - k * math.pi) < 1e-10
    safe_x = torch.where(near, 0.5, x)
    limit = n * torch.cos(n * k * math.pi) * torch.cos(k * math.pi)
    return torch.where(near, limit, torch.sin(n * safe_x) / torch.sin(safe_x))


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


def square_lattice(hkl: torch.Tensor, n_cells: torch.Tensor) -> torch.Tensor:
    """Parallelepiped crystal: product of ``sincg(pi h, Na)`` over the three axes.

    As nanoBragg, an axis with N <= 1 contributes a factor 1.

    Args:
        hkl: (*, 3) fractional Miller indices; n_cells: (3,) Na, Nb, Nc.
    """
    terms = sincg(math.pi * hkl, n_cells)
    terms = torch.where(n_cells > 1, terms, 1.0)
    return terms.prod(-1)


def round_lattice(dhkl: torch.Tensor, n_cells: torch.Tensor, fudge: torch.Tensor) -> torch.Tensor:
    """Ellipsoidal crystal: ``Na Nb Nc 0.7236 sinc3(pi sqrt(fudge sum((dh N)^2)))``.

    Args:
        dhkl: (*, 3) distance to the nearest integer indices, ``h - h0``.
    """
    r2 = ((dhkl * n_cells) ** 2).sum(-1) * fudge
    positive = r2 > 0
    radius = torch.where(positive, torch.sqrt(torch.where(positive, r2, 1.0)), 0.0)
    return n_cells.prod(-1) * ROUND_NORM * sinc3(math.pi * radius)


def reciprocal_distance_sq(dhkl: torch.Tensor, recip: torch.Tensor, n_cells: torch.Tensor) -> torch.Tensor:
    """``|dh a* + dk b* + dl c*|^2 (Na Nb Nc)^2`` with a*, b*, c* in 1/Angstrom (nanoBragg's units).

    Args:
        dhkl: (*, 3); recip: (3, 3) rows a*, b*, c*; n_cells: (3,).
    """
    d = dhkl @ recip
    return (d * d).sum(-1) * n_cells.prod(-1) ** 2


def gauss_lattice(rad_star_sq: torch.Tensor, n_cells: torch.Tensor, fudge: torch.Tensor) -> torch.Tensor:
    """Gaussian spots: ``Na Nb Nc exp(-rad*^2/0.63 * fudge)``."""
    return n_cells.prod(-1) * torch.exp(-(rad_star_sq / 0.63 * fudge))


def tophat_lattice(rad_star_sq: torch.Tensor, n_cells: torch.Tensor, fudge: torch.Tensor) -> torch.Tensor:
    """Flat-top spots: ``Na Nb Nc`` inside ``rad*^2 fudge < 0.3969``, 0 outside."""
    inside = rad_star_sq * fudge < 0.3969
    return torch.where(inside, n_cells.prod(-1), torch.zeros_like(rad_star_sq))


def lattice_factor(shape: str, hkl: torch.Tensor, recip: torch.Tensor, n_cells: torch.Tensor,
                   fudge: torch.Tensor) -> torch.Tensor:
    """F_latt for a crystal ``shape`` in {"square", "round", "gauss", "tophat"}.

    Nearest indices are ``ceil(h - 1/2)`` as in nanoBragg.

    Args:
        hkl: (*, 3) fractional indices; recip: (3, 3) reciprocal cell (1/Angstrom);
        n_cells: (3,) Na, Nb, Nc; fudge: scalar.
    Returns:
        (*) lattice factor (dimensionless).
    """
    if shape == "square":
        return square_lattice(hkl, n_cells)
    dhkl = hkl - torch.ceil(hkl - 0.5)
    if shape == "round":
        return round_lattice(dhkl, n_cells, fudge)
    rad = reciprocal_distance_sq(dhkl, recip, n_cells)
    if shape == "gauss":
        return gauss_lattice(rad, n_cells, fudge)
    return tophat_lattice(rad, n_cells, fudge)
