"""Unit cell, orientation, phi rotation and mosaic domains.

Real-space cell vectors are held as the rows of a (3, 3) matrix ``M = [a; b; c]`` in metres,
so that fractional Miller indices are ``hkl = M @ q`` for a scattering vector ``q`` (1/m).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from nbfunc.rotation import axis_rotation_matrix, xyz_rotation_matrix
from nbfunc.units import ANGSTROM, DEG


def reciprocal_cell(a, b, c, alpha, beta, gamma) -> torch.Tensor:
    """Reciprocal cell vectors in nanoBragg's default frame (a* along x, b* in the xy plane).

    Args:
        a, b, c: cell edges (Angstrom), 0-d tensors.
        alpha, beta, gamma: cell angles (rad), 0-d tensors.
    Returns:
        (3, 3) tensor, rows a*, b*, c* (1/Angstrom).
    """
    s = (alpha + beta + gamma) / 2
    skew = torch.abs(torch.sin(s) * torch.sin(s - alpha) * torch.sin(s - beta) * torch.sin(s - gamma))
    volume = 2.0 * a * b * c * torch.sqrt(skew)
    a_len = b * c * torch.sin(alpha) / volume
    b_len = c * a * torch.sin(beta) / volume
    c_len = a * b * torch.sin(gamma) / volume
    ca, cb, cg = torch.cos(alpha), torch.cos(beta), torch.cos(gamma)
    cos_alpha_s = (cb * cg - ca) / (torch.sin(beta) * torch.sin(gamma))
    cos_beta_s = (cg * ca - cb) / (torch.sin(gamma) * torch.sin(alpha))
    cos_gamma_s = (ca * cb - cg) / (torch.sin(alpha) * torch.sin(beta))
    sin_gamma_s = c / volume / a_len / b_len
    zero = torch.zeros_like(a)
    a_star = torch.stack([a_len, zero, zero])
    b_star = torch.stack([b_len * cos_gamma_s, b_len * sin_gamma_s, zero])
    c_star = torch.stack([c_len * cos_beta_s,
                          c_len * (cos_alpha_s - cos_beta_s * cos_gamma_s) / sin_gamma_s,
                          c_len * volume / (a * b * c * sin_gamma_s)])
    return torch.stack([a_star, b_star, c_star])


def cell_volume(a, b, c, alpha, beta, gamma) -> torch.Tensor:
    """Cell volume (Angstrom^3) from edges (Angstrom) and angles (rad), nanoBragg's formula."""
    s = (alpha + beta + gamma) / 2
    skew = torch.abs(torch.sin(s) * torch.sin(s - alpha) * torch.sin(s - beta) * torch.sin(s - gamma))
    return 2.0 * a * b * c * torch.sqrt(skew)


def oriented_cell(crystal) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and reciprocal cell of a `nbfunc.params.Crystal` after base orientation and misset.

    Follows nanoBragg: reciprocal vectors from the cell constants, rotated by the base
    orientation and the misset angles; real vectors ``a = |a| unit(b* x c*)`` etc.; reciprocal
    vectors regenerated as ``a* = (b x c)/V``.

    Returns:
        real (3, 3) rows a, b, c in metres; reciprocal (3, 3) rows a*, b*, c* in 1/Angstrom.
    """
    cr = crystal
    lengths = torch.stack([cr.cell_a, cr.cell_b, cr.cell_c])
    angles = [cr.cell_alpha * DEG, cr.cell_beta * DEG, cr.cell_gamma * DEG]
    recip = reciprocal_cell(cr.cell_a, cr.cell_b, cr.cell_c, *angles)
    base = torch.tensor(cr.base_orientation, dtype=recip.dtype, device=recip.device)
    misset = xyz_rotation_matrix(*(cr.misset * DEG).unbind(-1))
    recip = recip @ (misset @ base).transpose(-1, -2)
    a_s, b_s, c_s = recip.unbind(-2)
    crosses = torch.stack([torch.linalg.cross(b_s, c_s), torch.linalg.cross(c_s, a_s),
                           torch.linalg.cross(a_s, b_s)], -2)
    real = crosses / torch.linalg.vector_norm(crosses, dim=-1, keepdim=True) * lengths[..., None]
    volume = cell_volume(cr.cell_a, cr.cell_b, cr.cell_c, *angles)
    a, b, c = real.unbind(-2)
    recip = torch.stack([torch.linalg.cross(b, c), torch.linalg.cross(c, a),
                         torch.linalg.cross(a, b)], -2) / volume
    return real * ANGSTROM, recip


def phi_angles(crystal) -> torch.Tensor:
    """Spindle angles of the phi steps, ``phi_start + i*phi_step`` (rad), shape (phi,)."""
    steps = torch.arange(crystal.phisteps, dtype=crystal.phi_start.dtype, device=crystal.phi_start.device)
    return (crystal.phi_start[..., None] + steps * crystal.phi_step[..., None]) * DEG


def phi_rotations(crystal) -> torch.Tensor:
    """Rotation matrices about the spindle axis for every phi step, shape (phi, 3, 3)."""
    phi = phi_angles(crystal)
    axis = torch.tensor(crystal.spindle_axis, dtype=phi.dtype, device=phi.device)
    axis = axis / torch.linalg.vector_norm(axis)
    return axis_rotation_matrix(axis.expand(phi.shape + (3,)), phi)


def mosaic_rotations(crystal) -> torch.Tensor:
    """Rotation matrices of the mosaic domains, shape (mosaic, 3, 3).

    Domain ``m`` turns by ``mosaic_spread * mosaic_scales[m]`` (rad) about ``mosaic_axes[m]``,
    the random draws that nanoBragg's ``mosaic_rotation_umat`` makes from ``mosaic_seed``;
    domain 0 is the identity.
    """
    spread = crystal.mosaic_spread * DEG
    if crystal.mosaic_domains == 1:
        return torch.eye(3, dtype=spread.dtype, device=spread.device)[None]
    axes = torch.tensor(crystal.mosaic_axes, dtype=spread.dtype, device=spread.device)
    scales = torch.tensor(crystal.mosaic_scales, dtype=spread.dtype, device=spread.device)
    return axis_rotation_matrix(axes, spread[..., None] * scales)


def orientation_matrices(spindle_cells: torch.Tensor, mosaic_rot: torch.Tensor) -> torch.Tensor:
    """Cell matrices for every (phi, mosaic) pair: ``U_m a_p`` for each spindle-rotated cell vector.

    Args:
        spindle_cells: (phi, 3, 3) rows a, b, c (m) after each phi step's spindle rotation
            (``real @ R_p^T``, or the carried orientations of nanoBragg's phi=0 reuse).
        mosaic_rot: (mosaic, 3, 3) domain rotations.
    Returns:
        (phi * mosaic, 3, 3) matrices whose rows are the rotated a, b, c (m), phi-major.
    """
    return (spindle_cells[:, None] @ mosaic_rot.transpose(-1, -2)[None]).reshape(-1, 3, 3)


def mosaic_draws(domains: int, seed: int) -> tuple[tuple[tuple[float, float, float], ...], tuple[float, ...]]:
    """The random axes and angle scales of nanoBragg's mosaic domains.

    Reproduces ``mosaic_rotation_umat(mosaic_spread, umat, &mosaic_seed)`` for each domain
    (three ``ran1`` deviates r1, r2, r3; axis ``(sqrt(1-r2^2) sin(pi r1), sqrt(1-r2^2) cos(pi r1), r2)``;
    angle ``spread * powf(1 - r3^2, 1/3)`` in single precision) and forces domain 0 to the
    identity.

    Args:
        domains: number of domains (>= 1).
        seed: the C program's internal (negative) seed, ``-mosaic_seed`` flag value.
    Returns:
        (axes, scales): ``domains`` unit axes and dimensionless angle scales.
    """
    from nbfunc.crng import CRandom, ran1

    rng = CRandom(int(seed))
    axes, scales = [], []
    for _ in range(domains):
        r1 = 2.0 * ran1(rng) - 1.0
        r2 = 2.0 * ran1(rng) - 1.0
        r3 = 2.0 * ran1(rng) - 1.0
        xyrad = math.sqrt(1.0 - r2 * r2)
        axes.append((xyrad * math.sin(math.pi * r1), xyrad * math.cos(math.pi * r1), r2))
        scales.append(float(np.power(np.float32(1.0 - r3 * r3), np.float32(1.0 / 3.0))))
    axes[0], scales[0] = (0.0, 0.0, 1.0), 0.0
    return tuple(axes), tuple(scales)
