"""Unit cell, orientation, phi rotation and mosaic domains.

Real-space cell vectors are held as the rows of a (3, 3) matrix ``M = [a; b; c]`` in metres,
so that fractional Miller indices are ``hkl = M @ q`` for a scattering vector ``q`` (1/m).
"""
from __future__ import annotations

import functools
import math
import os

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
    return _reciprocal_and_volume(a, b, c, alpha, beta, gamma)[0]


def _reciprocal_and_volume(a, b, c, alpha, beta, gamma) -> tuple[torch.Tensor, torch.Tensor]:
    """`reciprocal_cell` and `cell_volume` (Angstrom^3) together, from one volume."""
    volume = cell_volume(a, b, c, alpha, beta, gamma)
    sa, sb, sg = torch.sin(alpha), torch.sin(beta), torch.sin(gamma)
    a_len = b * c * sa / volume
    b_len = c * a * sb / volume
    c_len = a * b * sg / volume
    ca, cb, cg = torch.cos(alpha), torch.cos(beta), torch.cos(gamma)
    cos_alpha_s = (cb * cg - ca) / (sb * sg)
    cos_beta_s = (cg * ca - cb) / (sg * sa)
    cos_gamma_s = (ca * cb - cg) / (sa * sb)
    sin_gamma_s = c / volume / a_len / b_len
    zero = torch.zeros_like(a)
    a_star = torch.stack([a_len, zero, zero])
    b_star = torch.stack([b_len * cos_gamma_s, b_len * sin_gamma_s, zero])
    c_star = torch.stack([c_len * cos_beta_s,
                          c_len * (cos_alpha_s - cos_beta_s * cos_gamma_s) / sin_gamma_s,
                          c_len * volume / (a * b * c * sin_gamma_s)])
    return torch.stack([a_star, b_star, c_star]), volume


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
    recip, volume = _reciprocal_and_volume(cr.cell_a, cr.cell_b, cr.cell_c, *angles)
    base = torch.tensor(cr.base_orientation, dtype=recip.dtype, device=recip.device)
    misset = xyz_rotation_matrix(*(cr.misset * DEG).unbind(-1))
    recip = recip @ (misset @ base).transpose(-1, -2)
    a_s, b_s, c_s = recip.unbind(-2)
    crosses = torch.stack([torch.linalg.cross(b_s, c_s), torch.linalg.cross(c_s, a_s),
                           torch.linalg.cross(a_s, b_s)], -2)
    real = crosses / torch.linalg.vector_norm(crosses, dim=-1, keepdim=True) * lengths[..., None]
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

    ``crystal.mosaic_model`` picks the domains:

    * ``"c_random"`` (default, nanoBragg): domain ``m`` turns by ``mosaic_spread *
      mosaic_scales[m]`` (rad) about ``mosaic_axes[m]``, the random draws that nanoBragg's
      ``mosaic_rotation_umat`` makes from ``mosaic_seed`` (listed in the tree by its
      validation, `mosaic_draws`); domain 0 is the identity.
    * ``"quadrature"``: `quadrature_rotations`, the deterministic Gaussian domains of the
      spread tensor ``mosaic_spread * I + eta``.

    Raises:
        ValueError: the tree lists another number of draws than ``mosaic_domains`` (a tree
            changed with ``model_copy`` or ``model_construct``, which skip validation).
    """
    if getattr(crystal, "mosaic_model", "c_random") == "quadrature":
        return quadrature_rotations(crystal)
    spread = crystal.mosaic_spread * DEG
    if crystal.mosaic_domains == 1:
        return torch.eye(3, dtype=spread.dtype, device=spread.device)[None]
    listed = (len(crystal.mosaic_axes), len(crystal.mosaic_scales))
    if listed != (crystal.mosaic_domains,) * 2:
        raise ValueError(f"crystal.mosaic_axes/mosaic_scales list {listed[0]}/{listed[1]} draws but "
                         f"mosaic_domains is {crystal.mosaic_domains}; build the Crystal with "
                         "Crystal(...) or model_validate, which draw them from mosaic_seed")
    axes = torch.as_tensor(crystal.mosaic_axes, dtype=spread.dtype).to(spread.device)
    scales = torch.as_tensor(crystal.mosaic_scales, dtype=spread.dtype).to(spread.device)
    return axis_rotation_matrix(axes, spread[..., None] * scales)


# --------------------------------------------------------------------------------------------
# Deterministic (quadrature) mosaic domains: Gaussian rotation vectors r ~ N(0, E E), E in deg
# --------------------------------------------------------------------------------------------

QUADRATURE_MIN_DOMAINS = 6
"""Fewest domains above one of the quadrature: three antipodal pairs are the fewest points
whose second moments can equal those of a 3-d Gaussian (one domain is the identity)."""


def spread_matrix(eta: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """The symmetric spread tensor ``E = spread * I + sym(eta)`` (deg), shape (*, 3, 3).

    Args:
        eta: (*, 3) axis spreads (xx, yy, zz) or (*, 6) symmetric tensor (xx, yy, zz, xy, yz,
            xz), deg, lab frame.
        spread: (*) isotropic spread (deg), added to the diagonal.
    Returns:
        (*, 3, 3) E; the domains' rotation vectors have covariance ``E @ E`` (deg^2).
    """
    xx, yy, zz = eta[..., 0], eta[..., 1], eta[..., 2]
    if eta.shape[-1] == 6:
        xy, yz, xz = eta[..., 3], eta[..., 4], eta[..., 5]
    else:
        xy = yz = xz = torch.zeros_like(xx)
    rows = [torch.stack([xx + spread, xy, xz], -1), torch.stack([xy, yy + spread, yz], -1),
            torch.stack([xz, yz, zz + spread], -1)]
    return torch.stack(rows, -2)


def maxwell_cdf(x: np.ndarray) -> np.ndarray:
    """CDF of the chi distribution with 3 degrees of freedom (the length of a standard 3-d
    normal vector): ``F(x) = erf(x/sqrt(2)) - sqrt(2/pi) x exp(-x^2/2)``, float64 numpy."""
    x = np.asarray(x, dtype=np.float64)
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return erf(x / math.sqrt(2.0)) - math.sqrt(2.0 / math.pi) * x * np.exp(-x * x / 2)


def maxwell_quantiles(levels: np.ndarray) -> np.ndarray:
    """Quantiles of the chi-3 distribution (`maxwell_cdf`) at probabilities ``levels`` in
    (0, 1), float64: interpolation in a table of the CDF, then Newton steps to round-off.
    Plain numpy (no torch), so that it may run inside torch.func transforms.

    >>> float(maxwell_quantiles(np.array([0.5]))[0])  # doctest: +ELLIPSIS
    1.53817...
    """
    p = np.asarray(levels, dtype=np.float64)
    grid = np.linspace(0.0, 12.0, 24001)
    x = np.interp(p, maxwell_cdf(grid), grid)
    for _ in range(5):
        density = math.sqrt(2.0 / math.pi) * x * x * np.exp(-x * x / 2)
        x = np.clip(x - (maxwell_cdf(x) - p) / np.maximum(density, 1e-300), 0.0, 40.0)
    return x


QUADRATURE_CACHE_DOMAINS = 1 << 16
"""Designs of at most this many domains are kept (`quadrature_points`); larger ones, as large
as the random draws' (32 bytes a domain), are made again for each render."""


def quadrature_points(domains: int) -> np.ndarray:
    """`quadrature_design`, kept for up to `QUADRATURE_CACHE_DOMAINS` domains (read-only)."""
    if int(domains) <= QUADRATURE_CACHE_DOMAINS:
        return _cached_design(int(domains))
    return quadrature_design(int(domains))


@functools.lru_cache(maxsize=16)
def _cached_design(domains: int) -> np.ndarray:
    return quadrature_design(domains)


def quadrature_design(domains: int) -> np.ndarray:
    """A deterministic equal-weight design of ``domains`` points standing for a standard 3-d
    normal vector, float64 (domains, 3), read-only.

    One domain: the origin. Otherwise ``domains // 2`` antipodal pairs ``+-rho_k u_k`` (and
    the origin when ``domains`` is odd): directions ``u_k`` a spherical Fibonacci set on the
    upper hemisphere (heights ``1 - (k + 1/2)/n``, azimuths ``k`` golden angles), radii
    ``rho_k`` the chi-3 quantiles at stratified levels ``(j + 1/2)/n`` assigned to the
    directions in the order of ``frac((k + 1/2) sqrt 2)`` (so radius and height are not
    correlated). The set is then whitened so that its mean is exactly 0 and its second
    moments exactly the identity: ``points.T @ points / domains == I`` to round-off.

    Raises:
        ValueError: ``domains`` is 2 to 5 (fewer than three pairs cannot have identity second
            moments).
    """
    domains = int(domains)
    if domains == 1:
        out = np.zeros((1, 3))
        out.flags.writeable = False
        return out
    if domains < QUADRATURE_MIN_DOMAINS:
        raise ValueError(f"mosaic_domains = {domains} is too few for the quadrature mosaic: give 1 "
                         f"(no mosaicity) or at least {QUADRATURE_MIN_DOMAINS} domains")
    n = domains // 2
    k = np.arange(n, dtype=np.float64)
    height = 1.0 - (k + 0.5) / n
    ring = np.sqrt(np.clip(1.0 - height * height, 0.0, None))
    azimuth = k * math.pi * (3.0 - math.sqrt(5.0))
    u = np.stack([ring * np.cos(azimuth), ring * np.sin(azimuth), height], 1)
    order = np.argsort(np.argsort(np.mod((k + 0.5) * math.sqrt(2.0), 1.0), kind="stable"), kind="stable")
    rho = maxwell_quantiles((order + 0.5) / n)
    half = u * rho[:, None]
    second = 2.0 * half.T @ half / domains
    values, vectors = np.linalg.eigh(second)
    half = half @ (vectors / np.sqrt(values)) @ vectors.T
    parts = [half, -half] + ([np.zeros((1, 3))] if domains % 2 else [])
    out = np.concatenate(parts, 0)
    out.flags.writeable = False
    return out


@torch.compiler.disable
def _points_tensor(domains: int, like: torch.Tensor) -> torch.Tensor:
    """`quadrature_points` as a tensor of ``like``'s dtype and device (a constant)."""
    return torch.from_numpy(np.array(quadrature_points(domains))).to(dtype=like.dtype, device=like.device)


ROTVEC_SERIES_BELOW = 1e-2
"""Squared rotation angle (rad^2) below which `rotation_vector_matrix` uses its Taylor series
(five terms: truncation below 1e-17 there, and no 0/0 at the identity)."""


def rotation_vector_matrix(r: torch.Tensor) -> torch.Tensor:
    """Rotation matrix ``exp([r]x)`` of rotation vectors ``r`` (rad), shape (*, 3) -> (*, 3, 3).

    ``R = I + A(t) K + B(t) K^2`` with ``K = [r]x``, ``t = |r|^2``, ``A = sin(theta)/theta`` and
    ``B = (1 - cos(theta))/theta^2 = 2 sin^2(theta/2)/t``: a right-handed turn by ``|r|`` about
    ``r/|r|`` (as `nbfunc.rotation.axis_rotation_matrix`). ``A`` and ``B`` are smooth
    functions of ``t`` (series below `ROTVEC_SERIES_BELOW`), so every derivative is finite at
    ``r = 0`` (where the turn's axis is undefined).
    """
    t = (r * r).sum(-1)
    small = t < ROTVEC_SERIES_BELOW
    safe = torch.where(small, torch.ones_like(t), t)
    theta = torch.sqrt(safe)
    a_direct = torch.sin(theta) / theta
    b_direct = 2.0 * torch.sin(theta / 2) ** 2 / safe
    s = torch.where(small, t, torch.zeros_like(t))
    a_series = 1 - s / 6 * (1 - s / 20 * (1 - s / 42 * (1 - s / 72)))
    b_series = 0.5 * (1 - s / 12 * (1 - s / 30 * (1 - s / 56 * (1 - s / 90))))
    a = torch.where(small, a_series, a_direct)[..., None, None]
    b = torch.where(small, b_series, b_direct)[..., None, None]
    x, y, z = r.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1),
                     torch.stack([-y, x, zero], -1)], -2)
    eye = torch.eye(3, dtype=r.dtype, device=r.device)
    return eye + a * k + b * (k @ k)


def quadrature_rotations(crystal) -> torch.Tensor:
    """Deterministic Gaussian mosaic domains (``mosaic_model="quadrature"``), (mosaic, 3, 3).

    Domain ``k`` turns by the rotation vector ``r_k = E z_k`` (rad), with ``E`` the spread
    tensor `spread_matrix` (``crystal.eta`` and ``crystal.mosaic_spread``, deg, lab frame)
    and ``z_k`` the fixed design `quadrature_points`: the domains stand for rotation vectors
    ``r ~ N(0, E E)`` with equal weights, and the image is a smooth function of ``eta`` and
    ``mosaic_spread`` (``r`` is linear in them; `rotation_vector_matrix` is smooth at 0).
    One domain is the identity.
    """
    e = spread_matrix(crystal.eta, crystal.mosaic_spread) * DEG
    z = _points_tensor(crystal.mosaic_domains, e)
    return rotation_vector_matrix(z @ e.transpose(-1, -2))


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


MOSAIC_BLOCK = 1 << 16
"""Domains drawn per block by `mosaic_draw_arrays` (the random deviates of one block are the
only per-domain Python objects alive at a time)."""


def mosaic_draw_arrays(domains: int, seed: int, block: int = MOSAIC_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """The random axes and angle scales of nanoBragg's mosaic domains, as arrays.

    Reproduces ``mosaic_rotation_umat(mosaic_spread, umat, &mosaic_seed)`` for each domain
    (three ``ran1`` deviates r1, r2, r3; axis ``(sqrt(1-r2^2) sin(pi r1), sqrt(1-r2^2) cos(pi r1), r2)``;
    angle ``spread * powf(1 - r3^2, 1/3)`` in single precision) and forces domain 0 to the
    identity. The deviates are drawn ``block`` domains at a time into the output arrays, so
    the memory is the arrays (32 bytes per domain) plus one block. The sines and cosines are
    the C library's, element by element; the power is numpy's float32 ``power``.

    Args:
        domains: number of domains (>= 1).
        seed: the C program's internal (negative) seed, ``-mosaic_seed`` flag value.
        block: domains per block (any positive value gives the same arrays).
    Returns:
        (axes, scales): float64 (domains, 3) unit axes and (domains,) dimensionless angle scales.

    >>> axes, scales = mosaic_draw_arrays(3, -12345678)
    >>> axes.shape, float(scales[0])
    ((3, 3), 0.0)
    """
    from nbfunc.crng import CRandom, ran1_block

    if int(domains) < 1:
        raise ValueError(f"mosaic domains: got {domains}, expected at least 1")
    rng = CRandom(int(seed))
    axes = np.empty((int(domains), 3), dtype=np.float64)
    scales = np.empty(int(domains), dtype=np.float64)
    third = np.float32(1.0 / 3.0)
    sin, cos = math.sin, math.cos
    for start in range(0, int(domains), block):
        stop = min(start + block, int(domains))
        r = 2.0 * np.asarray(ran1_block(rng, 3 * (stop - start))).reshape(-1, 3) - 1.0
        xyrad = np.sqrt(1.0 - r[:, 1] * r[:, 1])
        turn = (math.pi * r[:, 0]).tolist()
        axes[start:stop, 0] = xyrad * np.array([sin(x) for x in turn])
        axes[start:stop, 1] = xyrad * np.array([cos(x) for x in turn])
        axes[start:stop, 2] = r[:, 1]
        scales[start:stop] = np.power((1.0 - r[:, 2] * r[:, 2]).astype(np.float32), third)
    axes[0], scales[0] = (0.0, 0.0, 1.0), 0.0
    return axes, scales


def mosaic_draws(domains: int, seed: int, phisteps: int = 1,
                 itemsize: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """`mosaic_draw_arrays` as float64 tensors (the static ``mosaic_axes`` and
    ``mosaic_scales`` of a `nbfunc.params.Crystal`), after `check_mosaic_memory` with this
    machine's memory for a render of ``phisteps`` phi steps in floats of ``itemsize`` bytes.

    Returns:
        (axes, scales): (domains, 3) unit axes and (domains,) dimensionless angle scales,
        sharing the memory of the arrays (32 bytes per domain).
    Raises:
        ValueError: the domains would not fit in this machine's memory (one line, with the figure).
    """
    check_mosaic_memory(domains, phisteps, itemsize, physical_memory())
    axes, scales = mosaic_draw_arrays(domains, seed)
    return torch.from_numpy(axes), torch.from_numpy(scales)


BYTES_PER_DOMAIN = (32, 10)
"""Bytes per mosaic domain of a render's set-up: its draws (axis and scale, 32 bytes, held
by the tree) and, in units of the float size, its rotation matrix and the temporaries that
build it (measured on the eager render: about 110 bytes per domain in float64)."""
FLOATS_PER_ORIENTATION = 48
"""Floats per (phi, mosaic) orientation of a render's set-up: the cell matrices of the
render and of its first evaluation (phi carry) and the temporaries that build them
(measured: about 380 bytes per orientation in float64). The chunks add at most the chunk
size's evaluations, whatever the orientation count."""


def mosaic_memory_bytes(domains: int, phisteps: int, itemsize: int) -> int:
    """Bytes a render of ``domains`` mosaic domains and ``phisteps`` phi steps needs for its
    orientations (`BYTES_PER_DOMAIN`, `FLOATS_PER_ORIENTATION`), beyond its chunks.

    Args:
        itemsize: bytes per float of the render (8 for float64).
    """
    fixed, floats = BYTES_PER_DOMAIN
    per_domain = fixed + floats * itemsize
    return int(domains) * per_domain + int(domains) * int(phisteps) * FLOATS_PER_ORIENTATION * itemsize


def check_mosaic_memory(domains: int, phisteps: int, itemsize: int, limit_bytes: int) -> None:
    """Refuse up front a mosaic that cannot fit in ``limit_bytes`` (`mosaic_memory_bytes`).

    Raises:
        ValueError: one line naming ``-mosaic_dom`` (and ``-phisteps`` when above 1), the
            figure needed, the memory there is and the largest count that fits.

    >>> check_mosaic_memory(10**8, 1, 8, 16 << 30)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: -mosaic_dom 100000000 needs 49.6 GB for the mosaic domains and their orientations ...
    """
    need = mosaic_memory_bytes(domains, phisteps, itemsize)
    if need <= limit_bytes:
        return
    domains, phisteps = int(domains), int(phisteps)
    flags = f"-mosaic_dom {count_text(domains)}"
    flags += f" -phisteps {count_text(phisteps)}" if phisteps > 1 else ""
    if domains * limit_bytes // need >= 1:
        fewer = f"fewer domains (at most about {domains * limit_bytes // need})"
    else:
        fewer = f"fewer phi steps (at most about {max(1, phisteps * limit_bytes // need)})"
    raise ValueError(f"{flags} needs {gigabytes(need)} for the mosaic domains and their "
                     f"orientations ({count_text(phisteps)} phi steps), more than the "
                     f"{gigabytes(limit_bytes)} of memory here; give {fewer}")


def count_text(n: int) -> str:
    """An integer as short text: its digits below 10^15, else ``1.23e+45`` (any size).

    >>> count_text(10**300 + 5), count_text(4096)
    ('1.00e+300', '4096')
    """
    n = int(n)
    if n < 10**15:
        return str(n)
    exponent = len(str(n)) - 1
    return f"{n / 10**exponent:.2f}e+{exponent}"


def gigabytes(n_bytes: int) -> str:
    """Bytes as gigabytes with one decimal (``49.6 GB``), any size (`count_text` from 10^6 GB)."""
    n_bytes = int(n_bytes)
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes < 10**15 else f"{count_text(n_bytes // 10**9)} GB"


def physical_memory() -> int:
    """Bytes of physical memory of this machine (a large value where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 62
