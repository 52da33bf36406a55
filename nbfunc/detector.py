"""Detector placement, pixel positions, solid angle and sensor absorption.

Lengths are metres and angles radians inside these functions; `detector_frame` converts the
tree's mm and degrees.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from nbfunc.rotation import rotate_axis, xyz_rotation_matrix
from nbfunc.units import DEG, MM


class DetectorFrame(NamedTuple):
    """Placed detector: unit axes and origin in the lab frame.

    fdet, sdet, odet: (3,) fast, slow and normal unit vectors after all rotations.
    pix0: (3,) vector from the sample to the corner of pixel (0, 0) (m).
    close_distance: distance from the sample to the detector plane (m).
    distance: sample-to-beam-spot distance along the beam, ``close_distance/ratio`` (m).
    pixel_size: pixel edge (m).
    beam: (3,) unit beam direction.
    """

    fdet: torch.Tensor
    sdet: torch.Tensor
    odet: torch.Tensor
    pix0: torch.Tensor
    close_distance: torch.Tensor
    distance: torch.Tensor
    pixel_size: torch.Tensor
    beam: torch.Tensor


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def detector_frame(det, beam_vector: tuple[float, float, float]) -> DetectorFrame:
    """Place the detector as nanoBragg does, for either pivot.

    With R the x-y-z rotation and T the two-theta rotation, ``ratio = beam . (R o0)``; the
    close distance is ``|ratio*distance|`` (``distance_kind="beam"``) or ``distance``
    (``"close"``), and the beam distance is ``close/ratio``. Sample pivot:
    ``pix0 = T R (-Fc f0 - Sc s0 + close o0)``. Beam pivot:
    ``pix0 = -Fb f - Sb s + distance*beam`` with the rotated axes f, s.

    Args:
        det: `nbfunc.params.Detector`.
        beam_vector: beam direction (normalised here).
    """
    ref = det.distance
    vec = lambda v: _unit(torch.tensor(v, dtype=ref.dtype, device=ref.device))
    f0, s0, o0, axis2 = vec(det.fdet_vector), vec(det.sdet_vector), vec(det.odet_vector), vec(det.twotheta_axis)
    beam = vec(beam_vector)
    rot = xyz_rotation_matrix(det.rotx * DEG, det.roty * DEG, det.rotz * DEG)
    twotheta = det.twotheta * DEG
    swing = lambda v: rotate_axis(rot @ v, axis2, twotheta)
    ratio = torch.dot(beam, rot @ o0)
    distance_in = det.distance * MM
    close = torch.abs(ratio * distance_in) if det.distance_kind == "beam" else distance_in
    distance = close / ratio
    fc, sc = det.beam_center_f * MM, det.beam_center_s * MM
    fdet, sdet, odet = swing(f0), swing(s0), swing(o0)
    if det.pivot == "sample":
        pix0 = swing(-fc * f0 - sc * s0 + close * o0)
    else:
        pix0 = -fc * fdet - sc * sdet + distance * beam
    close_distance = torch.dot(pix0, odet)
    return DetectorFrame(fdet, sdet, odet, pix0, close_distance, close_distance / ratio,
                         det.pixel_size * MM, beam)


def subpixel_positions(frame: DetectorFrame, fpix: torch.Tensor, spix: torch.Tensor,
                       sub_f: torch.Tensor, sub_s: torch.Tensor, depth: torch.Tensor,
                       oversample: int, curved: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lab-frame positions of sub-pixel centres (m), as three component tensors.

    ``Fdet = pixel/oversample * (fpix*oversample + sub_f) + pixel/oversample/2``, likewise Sdet,
    ``Odet = depth``; position ``pix0 + Fdet f + Sdet s + Odet o``. A curved detector instead
    starts at ``distance*beam`` and rotates about s by ``y/distance`` then about f by
    ``z/distance`` (y, z: lab components of the flat position), as nanoBragg does.

    Args:
        fpix, spix: pixel indices (float) and sub_f, sub_s: sub-pixel indices, depth: layer
        depth (m), all broadcasting together (the renderer uses (1, P) and (E, 1)).
    Returns:
        (x, y, z), each of the broadcast shape, in metres.
    """
    pos = flat_positions(frame.fdet, frame.sdet, frame.odet, frame.pix0, frame.pixel_size, fpix,
                         spix, sub_f, sub_s, depth, oversample)[0]
    if not curved:
        return pos
    flat = torch.stack(pos, -1)
    start = (frame.distance * frame.beam).expand(flat.shape)
    tilted = rotate_axis(start, frame.sdet.expand(flat.shape), flat[..., 1] / frame.distance)
    return tuple(rotate_axis(tilted, frame.fdet.expand(flat.shape), flat[..., 2] / frame.distance).unbind(-1))


def flat_positions(fdet: torch.Tensor, sdet: torch.Tensor, odet: torch.Tensor, pix0: torch.Tensor,
                   pixel_size: torch.Tensor, fpix, spix, sub_f, sub_s, depth, oversample: int):
    """Sub-pixel centres on the flat detector (the first step of `subpixel_positions`).

    Args:
        fdet, sdet, odet: (3,) unit axes; pix0: (3,) corner of pixel (0, 0) (m);
        pixel_size: 0-d (m); the rest as in `subpixel_positions`.
    Returns:
        ((x, y, z) positions in m, Fdet, Sdet), each of the broadcast shape (m).
    """
    step = pixel_size / oversample
    f = step * (fpix * oversample + sub_f) + step / 2
    s = step * (spix * oversample + sub_s) + step / 2
    pos = tuple(f * fdet[i] + s * sdet[i] + depth * odet[i] + pix0[i] for i in range(3))
    return pos, f, s


def solid_angle(airpath: torch.Tensor, close_distance: torch.Tensor, pixel_size: torch.Tensor,
                point_pixel: bool) -> torch.Tensor:
    """Solid angle of a pixel (sr): ``pixel^2/R^2 * close/R``, or ``1/R^2`` for a point pixel.

    Args:
        airpath: (*) sample-to-sub-pixel distance R (m).
    """
    if point_pixel:
        return 1.0 / airpath**2
    return pixel_size**2 / airpath**2 * close_distance / airpath


def capture_fraction(diffracted, odet: torch.Tensor, layer: torch.Tensor,
                     layer_depth: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Fraction of photons absorbed in sensor layer ``layer``.

    ``exp(-t*dz*mu/rho) - exp(-(t+1)*dz*mu/rho)`` with parallax ``rho = d . o``.

    Args:
        diffracted: (*, 3) unit vectors, or their three components; layer: (*) layer index t;
        layer_depth: dz (m);
        mu: attenuation coefficient (1/m).
    """
    from nbfunc.lattice import components

    d = components(diffracted)
    rho = d[0] * odet[0] + d[1] * odet[1] + d[2] * odet[2]
    attenuation = layer_depth * mu / rho
    return torch.exp(-layer * attenuation) - torch.exp(-(layer + 1) * attenuation)
