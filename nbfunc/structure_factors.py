"""Structure factors F_cell from a grid: nearest neighbour and tricubic interpolation.

The grid ``fhkl`` (h, k, l) holds F for indices ``origin + (i, j, k)``; outside it F is
``default_F``. Interpolation is nanoBragg's: a Lagrange polynomial through the 4 x 4 x 4
integer points ``floor(h) - 1 .. floor(h) + 2`` on each axis.
"""
from __future__ import annotations

import torch

from nbfunc.lattice import Components, components


def _flat_index(idx: Components, shape) -> torch.Tensor:
    return (idx[0] * shape[1] + idx[1]) * shape[2] + idx[2]


def nearest_f(h0: torch.Tensor | Components, fhkl: torch.Tensor, origin: tuple[int, int, int],
              default_f: torch.Tensor) -> torch.Tensor:
    """F at integer indices ``h0``, or ``default_F`` outside the grid.

    Args:
        h0: (*, 3) integer-valued floating tensor of nearest indices, or its components.
        fhkl: (nh, nk, nl) grid (e); origin: (h_min, k_min, l_min).
    """
    h0 = components(h0)
    if fhkl.numel() == 0:
        return default_f.expand(h0[0].shape)
    idx = [x.long() - o for x, o in zip(h0, origin)]
    inside = (idx[0] >= 0) & (idx[0] < fhkl.shape[0]) & (idx[1] >= 0) & (idx[1] < fhkl.shape[1]) \
        & (idx[2] >= 0) & (idx[2] < fhkl.shape[2])
    flat = torch.where(inside, _flat_index(idx, fhkl.shape), 0)
    values = fhkl.reshape(-1)[flat.reshape(-1)].reshape(flat.shape)
    return torch.where(inside, values, default_f)


def interpolation_out_of_range(hkl: torch.Tensor | Components, grid_shape: tuple[int, int, int],
                               origin: tuple[int, int, int]) -> torch.Tensor:
    """True where the 4-point neighbourhood of ``hkl`` (*, 3) leaves the grid.

    nanoBragg's test: ``h - h_min + 3 > h_range`` or ``h - 2 < h_min`` on any axis.
    """
    out = None
    for x, lo, n in zip(components(hkl), origin, grid_shape):
        bad = (x - lo + 3 > n) | (x - 2 < lo)
        out = bad if out is None else out | bad
    return out


def lagrange_weights(x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Weights of the cubic Lagrange polynomial through ``floor(x) - 1 .. floor(x) + 2``.

    Args:
        x: (*) coordinate.
    Returns:
        (first node index as a float tensor (*), four weights, each (*)).
    """
    base = torch.floor(x) - 1
    u = x - base  # nodes at u = 0, 1, 2, 3
    return base, (-(u - 1) * (u - 2) * (u - 3) / 6, u * (u - 2) * (u - 3) / 2,
                  -u * (u - 1) * (u - 3) / 2, u * (u - 1) * (u - 2) / 6)


def tricubic_f(hkl: torch.Tensor | Components, fhkl: torch.Tensor, origin: tuple[int, int, int]) -> torch.Tensor:
    """Tricubic Lagrange interpolation of the grid at fractional ``hkl`` (*, 3) or components.

    ``F = sum_ijk w_i(h) w_j(k) w_k(l) F[h0 - 1 + i, k0 - 1 + j, l0 - 1 + k]``: 64 gathers from
    the flat grid at constant offsets of one start index, which the compiler fuses into one
    loop. The start is clamped into the grid, so points whose neighbourhood is out of range
    give a finite but meaningless value; callers select another F there (see
    `interpolation_out_of_range`). Every grid axis must have at least 4 entries.
    """
    nh, nk, nl = fhkl.shape
    bases, weights = zip(*(lagrange_weights(x) for x in components(hkl)))
    idx = [(b.long() - o).clamp(0, n - 4) for b, o, n in zip(bases, origin, (nh, nk, nl))]
    start = (idx[0] * nk + idx[1]) * nl + idx[2]
    flat = fhkl.reshape(-1)
    total = None
    for i in range(4):
        for j in range(4):
            wij = weights[0][i] * weights[1][j]
            row = start + (i * nk + j) * nl
            for k in range(4):
                term = wij * weights[2][k] * flat[row + k]
                total = term if total is None else total + term
    return total
