"""Sources (directions and wavelengths) and the Kahn polarization factor."""
from __future__ import annotations

import torch

from nbfunc.lattice import components
from nbfunc.params import SourceGrid, SourceList
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
    frac = lambda f: torch.tensor(f, dtype=ref.dtype, device=ref.device)
    hdiv = src.hdivrange[..., None] * MRAD * frac(src.hdiv_fracs)
    vdiv = src.vdivrange[..., None] * MRAD * frac(src.vdiv_fracs)
    n = len(src.hdiv_fracs)
    towards = (-beam_vec).expand(vdiv.shape + (3,))
    towards = rotate_axis(towards, polar.expand(towards.shape), vdiv)
    towards = rotate_axis(towards, vert.expand(towards.shape), hdiv)
    wavelengths = beam.wavelength[..., None] * ANGSTROM * (1.0 + src.dispersion[..., None] * frac(src.disp_fracs))
    return -_unit(towards), wavelengths.expand(vdiv.shape[:-1] + (n,))


def _cross(u, v):
    return (u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0])


def _dot(u, v):
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


def _normalised(u):
    norm = torch.sqrt(_dot(u, u))
    return tuple(x / norm for x in u)


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
    p = tuple(polar_axis.unbind(-1))
    cos2t = _dot(i, d)
    sin2t_sq = 1.0 - cos2t**2
    b_in = _normalised(_cross(p, i))
    e_in = _normalised(_cross(i, b_in))
    e_out = _dot(d, e_in)
    b_out = _dot(d, b_in)
    r2 = e_out**2 + b_out**2
    safe = r2 > 1e-300
    cos2psi = torch.where(safe, (e_out**2 - b_out**2) / torch.where(safe, r2, 1.0), 1.0)
    return 0.5 * (1.0 + cos2t**2 - kahn * cos2psi * sin2t_sq)
