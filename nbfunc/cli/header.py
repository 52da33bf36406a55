"""The geometry a run prints and writes in SMV headers, as a function of the parameter tree.

`header_from_tree` reads what the tree holds in the tree's own units (pixel size in mm,
wavelength in Angstrom, angles in degrees, beam centre in mm) and takes the placed detector
(distance, close distance, where the direct beam lands, the XDS and DIALS origins) from
`nbfunc.detector.detector_frame`, the one place where the tree's units become SI; those SI
values are converted to mm once, here. The only input beyond the tree is the convention's
name, which labels the beam centre (``BEAM_CENTER_X/Y``) and is not physics: MOSFLM and DENZO
place the same detector with the same axes, and differ only in how they name its centre.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from nbfunc.detector import detector_frame

CONVENTION_AXES = {
    # beam, fdet, sdet, odet, twotheta_axis, polar, spindle; then the pivot
    "MOSFLM": (((1, 0, 0), (0, 0, 1), (0, -1, 0), (1, 0, 0), (0, 0, -1), (0, 0, 1), (0, 0, 1)), "beam"),
    "DENZO": (((1, 0, 0), (0, 0, 1), (0, -1, 0), (1, 0, 0), (0, 0, -1), (0, 0, 1), (0, 0, 1)), "beam"),
    "ADXV": (((0, 0, 1), (1, 0, 0), (0, -1, 0), (0, 0, 1), (-1, 0, 0), (1, 0, 0), (1, 0, 0)), "beam"),
    "XDS": (((0, 0, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 0), (1, 0, 0), (1, 0, 0)), "sample"),
    "DIALS": (((0, 0, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 0), (0, 1, 0), (0, 1, 0)), "sample"),
}
"""The C program's named conventions: their seven axes (unit vectors, lab frame) and the pivot
they impose. The first name that fits a tree is its convention (`convention_of`)."""


@dataclass(frozen=True)
class RunHeader:
    """Geometry facts of a run in header units: lengths in mm, wavelength in Angstrom, angles
    in degrees, origins in pixels.

    Attributes:
        convention, pivot: lower-case names ("mosflm", "beam", ...).
        fpixels, spixels: detector size in pixels.
        pixel_size_mm, wavelength_A: as the tree holds them.
        beam_x_mm, beam_y_mm: ``BEAM_CENTER_X/Y``, the tree's beam centre named as the
            convention names it (`beam_centre_labels`).
        fbeam_mm, sbeam_mm: where the direct beam meets the placed detector, along its fast
            and slow axes from the corner of pixel (0, 0).
        distance_mm, close_distance_mm: sample to that spot along the beam; sample to the
            detector plane.
        orgx, orgy: foot of the perpendicular from the sample, in pixels (XDS ORGX/ORGY).
        dials_origin_mm: (x, y, z) of pixel (0, 0)'s corner in the DIALS frame.
        phi_deg, osc_deg, twotheta_deg: spindle start, range swept by the phi steps
            (``phisteps * phi_step``) and the detector's two-theta, as the tree holds them.
    """

    convention: str
    pivot: str
    fpixels: int
    spixels: int
    pixel_size_mm: float
    wavelength_A: float
    beam_x_mm: float
    beam_y_mm: float
    fbeam_mm: float
    sbeam_mm: float
    distance_mm: float
    close_distance_mm: float
    orgx: float
    orgy: float
    dials_origin_mm: tuple[float, float, float]
    phi_deg: float
    osc_deg: float
    twotheta_deg: float


def _same_direction(u, v) -> bool:
    """Whether 3-vectors ``u`` and ``v`` point the same way (within 1e-9 after normalising)."""
    nu, nv = math.hypot(*u), math.hypot(*v)
    return nu > 0 and nv > 0 and all(abs(a / nu - b / nv) <= 1e-9 for a, b in zip(u, v))


def tree_axes(params) -> tuple:
    """The tree's seven axes in `CONVENTION_AXES` order, and its pivot."""
    d, b = params.detector, params.beam
    return ((b.beam_vector, d.fdet_vector, d.sdet_vector, d.odet_vector, d.twotheta_axis,
             b.polar_vector, params.crystal.spindle_axis), d.pivot)


def fits_convention(params, name: str) -> bool:
    """Whether the tree has the axes and the pivot of the named convention ``name``."""
    (mine, pivot), (theirs, wanted) = tree_axes(params), CONVENTION_AXES[name.upper()]
    return pivot == wanted and all(_same_direction(u, v) for u, v in zip(mine, theirs))


def convention_of(params) -> str:
    """The first named convention (`CONVENTION_AXES`) whose axes and pivot the tree has, else
    "custom"; MOSFLM for the axes MOSFLM and DENZO share. Lower-case."""
    return next((n.lower() for n in CONVENTION_AXES if fits_convention(params, n)), "custom")


def beam_centre_labels(convention: str, fcentre_mm: float, scentre_mm: float,
                       pixel_mm: float, spixels: int) -> tuple[float, float]:
    """(BEAM_CENTER_X, BEAM_CENTER_Y) in mm: the tree's beam centre (fast, slow, mm) as the
    convention names it, inverting the C program's convention block.

    MOSFLM ``(s - pixel/2, f - pixel/2)``, DENZO ``(s, f)``, ADXV ``(f, spixels*pixel - s)``;
    XDS, DIALS and custom axes ``(f, s)``.

    >>> beam_centre_labels("mosflm", 5.15, 6.15, 0.3, 64)
    (6.0, 5.0)
    """
    if convention == "mosflm":
        return scentre_mm - 0.5 * pixel_mm, fcentre_mm - 0.5 * pixel_mm
    if convention == "denzo":
        return scentre_mm, fcentre_mm
    if convention == "adxv":
        return fcentre_mm, pixel_mm * spixels - scentre_mm
    return fcentre_mm, scentre_mm


def header_from_tree(params, convention: str | None = None) -> RunHeader:
    """The run's header geometry (`RunHeader`) from the tree alone.

    Args:
        params: `nbfunc.Params` (one tree, any dtype and device).
        convention: the convention naming the beam centre ("mosflm", ...; any case); default
            `convention_of(params)`.
    """
    det, beam, crystal = params.detector, params.beam, params.crystal
    name = (convention or convention_of(params)).lower()
    frame = detector_frame(det, beam.beam_vector)
    pix0 = frame.pix0.tolist()  # m, from here to the end of the SI block
    fdet, sdet, unit_beam = frame.fdet.tolist(), frame.sdet.tolist(), frame.beam.tolist()
    dot = lambda u, v: sum(a * b for a, b in zip(u, v))
    distance, close, pixel_m = float(frame.distance), float(frame.close_distance), float(frame.pixel_size)
    spot = [distance * b - p for b, p in zip(unit_beam, pix0)]
    pixel_mm = float(det.pixel_size)
    x_mm, y_mm = beam_centre_labels(name, float(det.beam_center_f), float(det.beam_center_s),
                                    pixel_mm, det.spixels)
    return RunHeader(
        convention=name, pivot=det.pivot, fpixels=det.fpixels, spixels=det.spixels,
        pixel_size_mm=pixel_mm, wavelength_A=float(beam.wavelength), beam_x_mm=x_mm,
        beam_y_mm=y_mm, fbeam_mm=dot(fdet, spot) * 1e3, sbeam_mm=dot(sdet, spot) * 1e3,
        distance_mm=distance * 1e3, close_distance_mm=close * 1e3,
        orgx=-dot(pix0, fdet) / pixel_m + 0.5, orgy=-dot(pix0, sdet) / pixel_m + 0.5,
        dials_origin_mm=(1e3 * pix0[2], 1e3 * pix0[1], -1e3 * pix0[0]),
        phi_deg=float(crystal.phi_start), osc_deg=crystal.phisteps * float(crystal.phi_step),
        twotheta_deg=float(det.twotheta))


def smv_fields(header: RunHeader, noise_image: bool = False):
    """The SMV header numbers (`nbfunc.io.smv.SMVHeaderFields`) of ``header``; ``noise_image``
    selects the noise file's signed zero of the DENZO lines (`nbfunc.io.smv.smv_fields_mm`)."""
    from nbfunc.io.smv import smv_fields_mm

    h = header
    return smv_fields_mm(
        fpixels=h.fpixels, spixels=h.spixels, pixel_size_mm=h.pixel_size_mm,
        distance_mm=h.distance_mm, wavelength_A=h.wavelength_A, beam_x_mm=h.beam_x_mm,
        beam_y_mm=h.beam_y_mm, fbeam_mm=h.fbeam_mm, sbeam_mm=h.sbeam_mm,
        dials_origin_mm=h.dials_origin_mm, orgx=h.orgx, orgy=h.orgy,
        close_distance_mm=h.close_distance_mm, phi_deg=h.phi_deg, osc_deg=h.osc_deg,
        twotheta_deg=h.twotheta_deg, noise_image=noise_image)
