"""Sources (directions and wavelengths) and the Kahn polarization factor."""
from __future__ import annotations

import torch

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


def polarization_factor(incident: torch.Tensor, diffracted: torch.Tensor, polar_axis: torch.Tensor,
                        kahn: torch.Tensor) -> torch.Tensor:
    """Kahn polarization factor ``(1 + cos^2 2theta - K cos(2psi) sin^2 2theta)/2``.

    psi is the azimuth of the diffracted ray about the incident beam, measured from the
    E-vector ``E = unit(i x unit(p x i))``; ``cos(2psi) = (E_out^2 - B_out^2)/(E_out^2 + B_out^2)``
    (taken as 1 when the ray is along the beam, where sin^2 2theta = 0 anyway).

    Args:
        incident, diffracted: (*, 3) unit vectors; polar_axis: (3,) polarization axis p;
        kahn: Kahn factor K (dimensionless).
    Returns:
        (*) factor (dimensionless).
    """
    cos2t = (incident * diffracted).sum(-1)
    sin2t_sq = 1.0 - cos2t**2
    b_in = _unit(torch.linalg.cross(polar_axis.expand(incident.shape), incident))
    e_in = _unit(torch.linalg.cross(incident, b_in))
    e_out = (diffracted * e_in).sum(-1)
    b_out = (diffracted * b_in).sum(-1)
    r2 = e_out**2 + b_out**2
    safe = r2 > 1e-300
    cos2psi = torch.where(safe, (e_out**2 - b_out**2) / torch.where(safe, r2, 1.0), 1.0)
    return 0.5 * (1.0 + cos2t**2 - kahn * cos2psi * sin2t_sq)
