"""Global structure factors: the asymmetric unit, and its map onto every shot's hkl grid.

All shots share one vector ``f_asu`` (n_asu,) of amplitudes (electrons), one per
symmetry-unique reflection with ``d >= dmin`` that the space group does not extinguish.
Each shot renders from a dense grid ``crystal.fhkl`` (nh, nk, nl) over the box
``|h| <= a/dmin, |k| <= b/dmin, |l| <= c/dmin`` (every reflection with ``d >= dmin`` lies in
it); `fhkl_grid` fills it by a gather through the static integer map ``AsuMap.index``, so
Friedel mates and symmetry mates take the value of their representative, and absent
reflections and those beyond ``dmin`` get 0. The gather is linear in ``f_asu``: gradients,
``vmap`` and ``jacfwd`` go through it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from nbfunc.ensemble.symmetry import (SpaceGroup, check_cell, equivalents, laue_rotations,
                                      reciprocal_metric, representatives, resolution,
                                      space_group, systematically_absent)

MAX_ASU = 20000
"""Most unique reflections an `AsuMap` holds: the refinement's global information matrix is
dense, (n_asu, n_asu) float64 (3.2 GB at this size)."""


@dataclass(frozen=True, eq=False)
class AsuMap:
    """Where each grid point of a shot's ``crystal.fhkl`` takes its amplitude from.

    Attributes:
        group: the space group.
        cell: (a, b, c, alpha, beta, gamma) the reference cell (Angstrom, deg) used for d.
        dmin: resolution limit (Angstrom).
        hkl: (n_asu, 3) int64 Miller indices of the representatives, sorted.
        index: (nh, nk, nl) int64, for each grid point the position of its representative in
            ``hkl``, or ``n_asu`` for F = 0 (absent, beyond ``dmin``, or (0, 0, 0)).
        origin: (h_min, k_min, l_min) of the grid, the trees' ``crystal.hkl_origin``.
    """

    group: SpaceGroup
    cell: tuple[float, ...]
    dmin: float
    hkl: torch.Tensor
    index: torch.Tensor
    origin: tuple[int, int, int]

    @property
    def n_asu(self) -> int:
        """Number of unique reflections (the length of ``f_asu``)."""
        return int(self.hkl.shape[0])


def grid_box(cell, dmin: float) -> tuple[int, int, int]:
    """(h_max, k_max, l_max): ``floor(edge / dmin)``, enough for every reflection with
    ``d >= dmin`` (``|h| = |a . s| <= |a| / d``)."""
    return tuple(int(math.floor(edge / dmin + 1e-9)) for edge in cell[:3])


def expected_count(group: SpaceGroup, cell, dmin: float) -> float:
    """About how many unique reflections lie within ``dmin`` (Angstrom): the volume of the
    sphere of radius ``1/dmin`` over that of a reciprocal cell, over the Laue group's order."""
    volume = 1 / math.sqrt(np.linalg.det(reciprocal_metric(cell)))
    return 4 / 3 * math.pi * volume / dmin**3 / len(laue_rotations(group))


def asu_map(group: SpaceGroup | str, cell, dmin: float) -> AsuMap:
    """The asymmetric unit to ``dmin`` and its map onto the hkl grid of every shot.

    Args:
        group: a `SpaceGroup` or its name (`nbfunc.ensemble.symmetry.space_group`).
        cell: (a, b, c, alpha, beta, gamma) Angstrom and deg; must have the group's symmetry.
        dmin: resolution limit (Angstrom, > 0).

    Raises:
        ValueError: a bad dmin, a cell without the group's symmetry, or more than `MAX_ASU`
            reflections (one line each).
    """
    group = space_group(group) if isinstance(group, str) else group
    cell = tuple(float(x) for x in cell)
    if not (math.isfinite(dmin) and dmin > 0):
        raise ValueError(f"dmin = {dmin} is not a resolution; give dmin > 0 (Angstrom)")
    check_cell(group, cell)
    estimate = expected_count(group, cell, dmin)
    if estimate > 2 * MAX_ASU:
        raise ValueError(f"about {estimate:.3g} unique reflections to dmin = {dmin:g} A, more "
                         f"than {MAX_ASU}; give a larger dmin")
    box = grid_box(cell, dmin)
    axes = [np.arange(-m, m + 1) for m in box]
    hkl = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    keep = (resolution(hkl, cell) >= dmin * (1 - 1e-9)) & ~systematically_absent(hkl, group)
    keep &= np.abs(hkl).sum(1) > 0
    reps = representatives(hkl, group)
    unique, inverse = np.unique(reps[keep], axis=0, return_inverse=True)
    if len(unique) > MAX_ASU:
        raise ValueError(f"{len(unique)} unique reflections to dmin = {dmin:g} A, more than "
                         f"{MAX_ASU}; give a larger dmin")
    index = np.full(len(hkl), len(unique), dtype=np.int64)
    index[keep] = inverse.reshape(-1)
    shape = tuple(2 * m + 1 for m in box)
    return AsuMap(group, cell, float(dmin), torch.from_numpy(unique),
                  torch.from_numpy(index.reshape(shape)), tuple(-m for m in box))


def fhkl_grid(f_asu: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The dense grid (nh, nk, nl) of amplitudes (e) from ``f_asu`` (n_asu,) through the
    static map ``index`` (`AsuMap.index`): ``grid[i] = f_asu[index[i]]``, 0 where
    ``index == n_asu``.

    >>> fhkl_grid(torch.tensor([5.0]), torch.tensor([[[0, 1]]])).tolist()
    [[[5.0, 0.0]]]
    """
    padded = torch.cat([f_asu, f_asu.new_zeros(1)])
    return padded[index.to(f_asu.device)]


def asu_values(amap: AsuMap, grid: np.ndarray, origin: tuple[int, int, int],
               fill: float) -> torch.Tensor:
    """(n_asu,) float64 amplitudes of the representatives read from a dense grid
    ``grid[h - origin]`` (an HKL file's, with NaN where it lists nothing): the value of the
    first of each reflection's Laue equivalents (the representative first) that the grid
    holds and that is not NaN; ``fill`` where none is."""
    reps = amap.hkl.numpy()
    eq = np.concatenate([reps[:, None], equivalents(reps, amap.group)], 1) - np.asarray(origin)
    inside = ((eq >= 0) & (eq < np.asarray(grid.shape))).all(-1)
    values = np.full(inside.shape, np.nan)
    values[inside] = grid[tuple(eq[inside].T)]
    known = ~np.isnan(values)
    first = values[np.arange(len(values)), known.argmax(1)]
    return torch.from_numpy(np.where(known.any(1), first, float(fill)))
