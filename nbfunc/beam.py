"""Sources (directions, wavelengths and weights) and the Kahn polarization factor."""
from __future__ import annotations

import torch

from nbfunc.lattice import components
from nbfunc.params import SourceList
from nbfunc.rotation import rotate_axis
from nbfunc.units import ANGSTROM, MRAD


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def sources(beam) -> tuple[torch.Tensor, torch.Tensor]:
    """Incident unit vectors and wavelengths of every source.

    Grid sources: the vector towards the source, ``-beam``, is turned by ``vdiv`` about the
    polarization axis and then by ``hdiv`` about ``unit(beam x polar)``; wavelength
    ``lambda0*(1 + dispersion*frac)``. Listed sources: their own directions and wavelengths.

    Args:
        beam: `nbfunc.params.Beam`.
    Returns:
        incident (source, 3) unit vectors along the travel of the incident photons;
        wavelengths (source,) in metres.
    """
    src, ref = beam.sources, beam.wavelength
    vec = lambda v: _unit(torch.tensor(v, dtype=ref.dtype, device=ref.device))
    if isinstance(src, SourceList):
        return -_unit(src.directions), src.wavelengths * ANGSTROM
    beam_vec, polar = vec(beam.beam_vector), vec(beam.polar_vector)
    vert = _unit(torch.linalg.cross(beam_vec, polar))
    frac = lambda f: torch.as_tensor(f, dtype=ref.dtype, device=ref.device)
    hdiv = src.hdivrange[..., None] * MRAD * frac(src.hdiv_fracs)
    vdiv = src.vdivrange[..., None] * MRAD * frac(src.vdiv_fracs)
    n = len(src.hdiv_fracs)
    towards = (-beam_vec).expand(vdiv.shape + (3,))
    towards = rotate_axis(towards, polar.expand(towards.shape), vdiv)
    towards = rotate_axis(towards, vert.expand(towards.shape), hdiv)
    wavelengths = beam.wavelength[..., None] * ANGSTROM * (1.0 + src.dispersion[..., None] * frac(src.disp_fracs))
    return -_unit(towards), wavelengths.expand(vdiv.shape[:-1] + (n,))


def source_weights(beam) -> torch.Tensor | None:
    """Per-source weights (source,) (dimensionless) of listed sources, None for a grid.

    A path's term is multiplied by its source's weight (docs/physics.md, "Spectra"); grid
    sources all weigh one, as in nanoBragg, and need no multiplication.

    Args:
        beam: `nbfunc.params.Beam`.
    """
    return beam.sources.weights if isinstance(beam.sources, SourceList) else None


def _cross(u, v):
    return (u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0])


def _dot(u, v):
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


def _normalised(u):
    norm = torch.sqrt(_dot(u, u))
    return tuple(x / norm for x in u)


def polarization_axes(incident, polar_axis: torch.Tensor):
    """The incident beam's E and B unit vectors: ``B = unit(p x i)``, ``E = unit(i x B)``.

    Args:
        incident: (*, 3) unit vectors along the incident photons, or their three (*)
            components; polar_axis: (3,) polarization axis p.
    Returns:
        (E, B), each three components of the shape of the incident components.
    """
    i, p = components(incident), tuple(polar_axis.unbind(-1))
    b_in = _normalised(_cross(p, i))
    return _normalised(_cross(i, b_in)), b_in


def _kahn(cos2t, e_out, b_out, kahn):
    """``(P, cos 2psi, sin^2 2theta, safe, E_out^2 + B_out^2 or 1 where not safe)`` of
    `polarization_factor` from ``cos 2theta = i.d`` and the diffracted ray's components
    ``E_out = d.E``, ``B_out = d.B``; ``safe``: the ray is off the beam axis (else cos 2psi = 1)."""
    sin2t_sq = 1.0 - cos2t**2
    r2 = e_out**2 + b_out**2
    safe = r2 > 1e-300
    safe_r2 = torch.where(safe, r2, 1.0)
    cos2psi = torch.where(safe, (e_out**2 - b_out**2) / safe_r2, 1.0)
    return 0.5 * (1.0 + cos2t**2 - kahn * cos2psi * sin2t_sq), cos2psi, sin2t_sq, safe, safe_r2


def polarization_factor(incident, diffracted, polar_axis: torch.Tensor,
                        kahn: torch.Tensor) -> torch.Tensor:
    """Kahn polarization factor ``(1 + cos^2 2theta - K cos(2psi) sin^2 2theta)/2``.

    psi is the azimuth of the diffracted ray about the incident beam, measured from the
    E-vector ``E = unit(i x unit(p x i))``; ``cos(2psi) = (E_out^2 - B_out^2)/(E_out^2 + B_out^2)``
    (taken as 1 when the ray is along the beam, where sin^2 2theta = 0 anyway).

    Args:
        incident, diffracted: (*, 3) unit vectors, or each their three (*) components;
        polar_axis: (3,) polarization axis p; kahn: Kahn factor K (dimensionless).
    Returns:
        (*) factor (dimensionless).
    """
    i, d = components(incident), components(diffracted)
    e_in, b_in = polarization_axes(i, polar_axis)
    return _kahn(_dot(i, d), _dot(d, e_in), _dot(d, b_in), kahn)[0]


def polarization_and_derivatives(incident, diffracted, e_in, b_in, kahn):
    """`polarization_factor` from the beam's E and B vectors (`polarization_axes`), with its
    derivatives.

    Args:
        incident, diffracted, e_in, b_in: three components each (unit vectors, broadcasting);
        kahn: Kahn factor K.
    Returns:
        (P, dP/dd (three components), dP/d(i.d), dP/d(d.E), dP/d(d.B), dP/dK), each of the
        broadcast shape; dP/dd holds the dependence through all three dot products.
    """
    cos2t, e_out, b_out = _dot(incident, diffracted), _dot(diffracted, e_in), _dot(diffracted, b_in)
    factor, cos2psi, sin2t_sq, safe, r2 = _kahn(cos2t, e_out, b_out, kahn)
    inv_r2 = 1.0 / r2
    d_cos2t = cos2t * (1.0 + kahn * cos2psi)
    d_cos2psi = -0.5 * kahn * sin2t_sq
    # cos 2psi = (e^2 - b^2)/(e^2 + b^2): d/de = 4 e b^2/r^4, d/db = -4 b e^2/r^4
    d_e = torch.where(safe, d_cos2psi * 4.0 * e_out * b_out**2 * inv_r2**2, 0.0)
    d_b = torch.where(safe, d_cos2psi * -4.0 * b_out * e_out**2 * inv_r2**2, 0.0)
    d_d = tuple(d_cos2t * i + d_e * e + d_b * b for i, e, b in zip(incident, e_in, b_in))
    return factor, d_d, d_cos2t, d_e, d_b, -0.5 * cos2psi * sin2t_sq


BYTES_PER_SOURCE = (24, 60)
"""Bytes per source of a tree and its set-up: its static fractions (24 bytes) and, in units
of the float size, the incident vectors, wavelengths, rotation matrices and temporaries of
`sources` (measured: about 470 bytes per source in float64, at validation and in a render)."""


def source_memory_bytes(n_sources: int, itemsize: int) -> int:
    """Bytes ``n_sources`` sources need (`BYTES_PER_SOURCE`), floats of ``itemsize`` bytes."""
    fixed, floats = BYTES_PER_SOURCE
    return int(n_sources) * (fixed + floats * int(itemsize))


def check_source_memory(hsteps: int, vsteps: int, dispsteps: int, itemsize: int,
                        limit_bytes: int) -> None:
    """Refuse up front a grid of ``hsteps x vsteps x dispsteps`` sources (counted before the
    round-divergence cut) that cannot fit in ``limit_bytes`` (`source_memory_bytes`).

    Raises:
        ValueError: one line naming the step flags, the sources, the figure needed, the
            memory there is and the most sources that fit.

    >>> check_source_memory(10**9, 1, 1, 8, 16 << 30)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: -hdivsteps/-vdivsteps/-dispsteps 1000000000 x 1 x 1 = 1000000000 sources need 504.0 GB...
    """
    n = int(hsteps) * int(vsteps) * int(dispsteps)
    need = source_memory_bytes(n, itemsize)
    if need <= limit_bytes:
        return
    from nbfunc.crystal import count_text, gigabytes

    counts = " x ".join(count_text(x) for x in (hsteps, vsteps, dispsteps))
    raise ValueError(f"-hdivsteps/-vdivsteps/-dispsteps {counts} = {count_text(n)} sources need "
                     f"{gigabytes(need)}, more than the {gigabytes(limit_bytes)} of memory here; "
                     "give fewer divergence or dispersion steps (or a larger -hdivstep/-vdivstep), "
                     f"at most about {limit_bytes * n // need} sources")
