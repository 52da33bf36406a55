"""From nanoBragg flags to a validated `nbfunc.Params`, deriving what the C program derives.

`derive` follows the C program's main() in order: SMV header ingestion (-mask, then -img),
the flags, detector size, fluence, beam-centre defaults per convention, basis vectors, the
automatic step counts (phi, divergence, dispersion, sensor layers, mosaic domains), the cell
(from -cell or -mat, misset, random misset), N from crystal sizes, automatic oversampling,
structure factors (-hkl or a Fdump.bin left in the working directory), and the sources.
Every quantity the physics needs ends up in the tree; what only the command line needs
(output names, header values, seeds) goes in `RunInfo`.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from nbfunc.cli.cflags import CFlags
from nbfunc.cli.flags import FlagError, find_header_files, parse_flags
from nbfunc.beam import check_source_memory
from nbfunc.crystal import check_mosaic_memory, mosaic_draw_arrays, oriented_cell, physical_memory
from nbfunc.detector import detector_frame
from nbfunc.io.errors import NbfuncInputError
from nbfunc.params import (Beam, Crystal, Detector, Params, Sampling, SourceGrid, SourceList,
                           photons_bound)

RTD = 180.0 / math.pi


@dataclass
class RunInfo:
    """What the command line needs beyond the physics: outputs, header values, seeds, notes.

    Lengths in mm and angles in degrees, as they go into SMV headers.
    """

    flags: CFlags
    header: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hkl_grid: object = None
    hkl_from_file: bool = False
    oversample: int = 1
    roi: tuple[int, int, int, int] = (0, 0, 0, 0)
    mask: np.ndarray | None = None


# --------------------------------------------------------------------------------------------
# SMV headers (-img, -mask)
# --------------------------------------------------------------------------------------------
def apply_smv_header(start: CFlags, path: str, is_mask: bool) -> tuple[CFlags, np.ndarray]:
    """Initialise C variables from an SMV header, as nanoBragg does for -mask and -img.

    BEAM_CENTER_Y maps to Ybeam = detsize_s - value for a mask, and to value for an image.
    Returns:
        (updated flags, pixel data (slow, fast)).
    """
    from nbfunc.io.smv import header_value, read_smv

    smv = read_smv(path)
    spix, fpix = smv.data.shape
    v = lambda key: header_value(smv.header, key)
    changes = {"fpixels": fpix, "spixels": spix}
    pixel = start.pixel_size
    if v("PIXEL_SIZE") is not None:
        pixel = v("PIXEL_SIZE") / 1000.0
    changes.update(pixel_size=pixel, detsize_f=pixel * fpix, detsize_s=pixel * spix)
    simple = {"DISTANCE": ("distance", 1e-3), "CLOSE_DISTANCE": ("close_distance", 1e-3),
              "WAVELENGTH": ("lambda0", 1e-10), "BEAM_CENTER_X": ("Xbeam", 1e-3),
              "ORGX": ("ORGX", 1.0), "ORGY": ("ORGY", 1.0), "PHI": ("phi0", 1 / RTD),
              "OSC_RANGE": ("osc", 1 / RTD), "TWOTHETA": ("twotheta", 1 / RTD)}
    for key, (name, unit) in simple.items():
        if v(key) is not None:
            changes[name] = v(key) * unit
    if v("BEAM_CENTER_Y") is not None:
        y = v("BEAM_CENTER_Y") / 1000.0
        changes["Ybeam"] = pixel * spix - y if is_mask else y
    return replace(start, **changes), smv.data


# --------------------------------------------------------------------------------------------
# automatic step counts, exactly as the C program decides them
# --------------------------------------------------------------------------------------------
def steps_over(rng: float, step: float, flags: str) -> int:
    """``ceil(rng / step)``, the C program's step count from a range and a step.

    Raises:
        FlagError: the ratio overflows (a step too small for its range), naming ``flags``.
    """
    if not math.isfinite(rng / step):
        raise FlagError(f"{flags}: the range over the step overflows (more steps than any "
                        "number holds); give a step of a real size next to its range")
    return math.ceil(rng / step)


def auto_steps(steps: int, rng: float, step: float, *, steps_only_range: float,
               split_range: bool = False, flags: str = "") -> tuple[int, float, float]:
    """nanoBragg's rule for (count, range, step) of divergence, dispersion and sensor layers.

    ``steps_only_range`` is the range used when only a count is given (1.0 for divergence
    and dispersion, 0.5e-6 m for the sensor). ``split_range`` is the sensor's variant where a
    range alone gives 2 steps of range/2 (divergence and dispersion give 2 steps of range).
    ``flags`` names the range and step flags in errors (`steps_over`).
    """
    if steps <= 0:
        if rng < 0.0:
            if step <= 0.0:
                return 1, 0.0, 0.0
            return 2, step, step
        if step <= 0.0:
            return (2, rng, rng / 2) if split_range else (2, rng, rng)
        return steps_over(rng, step, flags), rng, step
    if rng < 0.0:
        if step <= 0.0:
            return steps, steps_only_range, steps_only_range / steps
        return 2, step, step
    if step <= 0.0:
        steps = max(steps, 2)
        return steps, rng, rng / (steps - 1)
    return steps, rng, step


def phi_steps(f: CFlags) -> tuple[int, float, float]:
    """(phisteps, osc, phistep) by the C program's rules (angles in rad)."""
    steps, osc, step = f.phisteps, f.osc, f.phistep
    if steps < 0:
        if osc < 0.0:
            if step <= 0.0:
                return 1, 0.0, 0.0
            return 2, step, step
        if step <= 0.0:
            return 2, osc, osc / 2.0
        return steps_over(osc, step, "-osc/-phistep"), osc, step
    if steps == 0:
        steps = 1
    if osc < 0.0:
        if step <= 0.0:
            osc = 1.0 / RTD
            return steps, osc, osc / steps
        return 2, step, step
    if step < 0.0:
        return steps, osc, osc / steps
    return steps, osc, step


def mosaic_setting(f: CFlags, warn: list[str]) -> tuple[int, float]:
    """(domains, spread in rad) by the C program's rules."""
    domains, spread = f.mosaic_domains, f.mosaic_spread
    if domains <= 0:
        if spread < 0.0:
            return 1, 0.0
        if spread == 0.0:
            return 1, spread
        warn.append("finite mosaicity with only one domain: using 10 mosaic domains")
        return 10, spread
    if spread < 0.0:
        warn.append("no mosaic spread given: using 1 mosaic domain")
        return 1, 0.0
    if spread == 0.0:
        warn.append("zero mosaic spread given: using 1 mosaic domain")
        return 1, spread
    return domains, spread


def divergence_fractions(f: CFlags, hdiv: tuple, vdiv: tuple,
                         disp: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-source fractions of the divergence ranges and of the dispersion (C loop order).

    Sources run over horizontal steps, then vertical steps (points outside the ellipse are
    dropped when round divergence is on), then wavelengths. Computed as arrays with the C
    loop's float64 operations, element by element (`check_source_memory` has bounded the
    counts): the memory is a few float64 arrays of the (h, v) grid and of the sources.

    Returns:
        (hdiv, vdiv, disp) fractions, each a float64 array of shape (source,).
    """
    (hsteps, hrange, hstep), (vsteps, vrange, vstep), (dsteps, drange, dstep) = hdiv, vdiv, disp
    with np.errstate(all="ignore"):
        h = np.float64(hstep) * np.arange(hsteps, dtype=np.float64) - np.float64(hrange) / 2.0
        v = np.float64(vstep) * np.arange(vsteps, dtype=np.float64) - np.float64(vrange) / 2.0
        if not (np.isfinite(h * h).all() and np.isfinite(v * v).all()):
            raise FlagError(f"-divergence/-hdivrange/-vdivrange/-hdivstep/-vdivstep: "
                            f"ranges {hrange * 1e3:g} x {vrange * 1e3:g} mrad overflow "
                            "when squared; give divergences of a real beam (mrad)")
        if f.round_div:
            h_test = (h * h - hstep * hstep / 4.0 * (1 - hsteps % 2)) / np.float64(hrange) / hrange
            v_test = (v * v - vstep * vstep / 4.0 * (1 - vsteps % 2)) / np.float64(vrange) / vrange
            hi, vi = np.nonzero(~((h_test[:, None] + v_test[None, :]) * 4.0 > 1.1))
        else:
            hi, vi = np.divmod(np.arange(hsteps * vsteps), vsteps)
        hf = h[hi] / hrange if hrange > 0 else np.zeros(len(hi))
        vf = v[vi] / vrange if vrange > 0 else np.zeros(len(vi))
        t = np.arange(dsteps, dtype=np.float64)
        df = (dstep * t - drange / 2.0) / drange if drange > 0 else np.zeros(dsteps)
    return np.repeat(hf, dsteps), np.repeat(vf, dsteps), np.tile(df, len(hi))


# --------------------------------------------------------------------------------------------
# conventions
# --------------------------------------------------------------------------------------------
_BASES = {
    # beam, fdet, sdet, odet, twotheta_axis, polar, spindle
    "ADXV": ((0, 0, 1), (1, 0, 0), (0, -1, 0), (0, 0, 1), (-1, 0, 0), (1, 0, 0), (1, 0, 0)),
    "MOSFLM": ((1, 0, 0), (0, 0, 1), (0, -1, 0), (1, 0, 0), (0, 0, -1), (0, 0, 1), (0, 0, 1)),
    "DENZO": ((1, 0, 0), (0, 0, 1), (0, -1, 0), (1, 0, 0), (0, 0, -1), (0, 0, 1), (0, 0, 1)),
    "XDS": ((0, 0, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 0), (1, 0, 0), (1, 0, 0)),
    "DIALS": ((0, 0, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 0), (0, 1, 0), (0, 1, 0)),
}


def _unitize(v) -> tuple[tuple[float, float, float], float]:
    """(unit vector, length) as C's unitize; (0, 0, 0) for a zero vector.

    Where the squares overflow or underflow (components near 1e+-154 and beyond) the vector
    is scaled first, so a direction such as (1e308, 1, 1) stays a direction.
    """
    mag = math.sqrt(sum(x * x for x in v))
    if (mag == 0.0 or math.isinf(mag)) and any(v):
        scale = max(abs(x) for x in v)
        unit, _ = _unitize(tuple(x / scale for x in v))
        return unit, math.hypot(*v)
    if mag == 0.0:
        return (0.0, 0.0, 0.0), 0.0
    return tuple(x / mag for x in v), mag


def resolve_convention(f: CFlags) -> dict:
    """Basis vectors, pivot and the beam centres (m) after the C convention block."""
    pixel, dsf, dss = f.pixel_size, f.detsize_f, f.detsize_s
    fclose = (f.ORGX - 0.5) * pixel if not math.isnan(f.ORGX) else dsf / 2.0
    sclose = (f.ORGY - 0.5) * pixel if not math.isnan(f.ORGY) else dss / 2.0
    xclose = f.Xclose if not math.isnan(f.Xclose) else fclose
    yclose = f.Yclose if not math.isnan(f.Yclose) else sclose
    xbeam, ybeam = f.Xbeam, f.Ybeam
    conv, pivot = f.beam_convention, f.detector_pivot
    vectors = dict(beam=f.beam_vector, fdet=f.fdet_vector, sdet=f.sdet_vector, odet=f.odet_vector,
                   twotheta_axis=f.twotheta_axis, polar=f.polar_vector, spindle=f.spindle_vector)
    if conv in _BASES:
        vectors = dict(zip(("beam", "fdet", "sdet", "odet", "twotheta_axis", "polar", "spindle"),
                           (tuple(float(x) for x in v) for v in _BASES[conv])))
    if conv == "ADXV":
        xbeam = (dsf + pixel) / 2.0 if math.isnan(xbeam) else xbeam
        ybeam = (dss - pixel) / 2.0 if math.isnan(ybeam) else ybeam
        fbeam, sbeam, pivot = xbeam, dss - ybeam, "BEAM"
    elif conv in ("MOSFLM", "DENZO"):
        xbeam = (dss + pixel) / 2.0 if math.isnan(xbeam) else xbeam
        ybeam = (dsf + pixel) / 2.0 if math.isnan(ybeam) else ybeam
        shift = 0.5 * pixel if conv == "MOSFLM" else 0.0
        fbeam, sbeam, pivot = ybeam + shift, xbeam + shift, "BEAM"
    else:
        xbeam = xclose if math.isnan(xbeam) else xbeam
        ybeam = yclose if math.isnan(ybeam) else ybeam
        fbeam, sbeam = xbeam, ybeam
        if conv in ("XDS", "DIALS"):
            pivot = "SAMPLE"
        else:
            fclose, sclose = xbeam, ybeam
    unit = {k: _unitize(v)[0] for k, v in vectors.items()}
    odet, mag = _unitize(vectors["odet"])
    if mag != 1.0:
        fd, sd = unit["fdet"], unit["sdet"]
        cross = (fd[1] * sd[2] - fd[2] * sd[1], fd[2] * sd[0] - fd[0] * sd[2], fd[0] * sd[1] - fd[1] * sd[0])
        odet = _unitize(cross)[0]
    unit["odet"] = odet
    return dict(vectors=unit, pivot=pivot, xbeam=xbeam, ybeam=ybeam, fbeam=fbeam, sbeam=sbeam,
                fclose=fclose, sclose=sclose, xclose=xclose, yclose=yclose)


# --------------------------------------------------------------------------------------------
# cell
# --------------------------------------------------------------------------------------------
def cell_from_matrix(recip: np.ndarray) -> tuple[tuple[float, ...], np.ndarray]:
    """Cell constants and the orientation of a reciprocal basis (rows a*, b*, c*, 1/Angstrom).

    Returns:
        ((a, b, c in Angstrom, alpha, beta, gamma in deg), base orientation U (3, 3)) such that
        the default-frame reciprocal cell of those constants, turned by U, is ``recip``.
    """
    v_star = float(np.dot(recip[0], np.cross(recip[1], recip[2])))
    real = np.stack([np.cross(recip[1], recip[2]), np.cross(recip[2], recip[0]),
                     np.cross(recip[0], recip[1])]) / v_star
    lengths = np.linalg.norm(real, axis=1)
    cosines = [np.dot(real[1], real[2]) / lengths[1] / lengths[2],
               np.dot(real[0], real[2]) / lengths[0] / lengths[2],
               np.dot(real[0], real[1]) / lengths[0] / lengths[1]]
    angles = [math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in cosines]
    cell = tuple(float(x) for x in lengths) + tuple(angles)
    crystal = Crystal(cell_a=cell[0], cell_b=cell[1], cell_c=cell[2], cell_alpha=cell[3],
                      cell_beta=cell[4], cell_gamma=cell[5])
    _, default = oriented_cell(crystal)
    # U @ default_row_i = recip_row_i  ->  U = recip^T (default^T)^-1
    u = recip.T @ np.linalg.inv(default.numpy().T)
    return cell, u


# --------------------------------------------------------------------------------------------
# bad input: one line naming the flag or file, before any tensor is built
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def reading(flag: str, hint: str = ""):
    """Prefix the one-line error of a file reader with the flag that named the file."""
    try:
        yield
    except NbfuncInputError as err:
        raise NbfuncInputError(f"{flag} {err}{hint}".strip()) from err


def header_origins(before: CFlags, after: CFlags, flag: str, name: str) -> dict[str, str]:
    """C variables an SMV header changed -> where they came from (for error messages)."""
    return {fd.name: f"{flag} {name} (its header)" for fd in fields(CFlags)
            if fd.name != "warnings" and getattr(before, fd.name) != getattr(after, fd.name)}


_POSITIVE = (
    # C variable, flag, what, scale to the flag's unit, unit
    ("pixel_size", "-pixel", "pixel size", 1e3, "mm"),
    ("distance", "-distance", "detector distance", 1e3, "mm"),
    ("close_distance", "-close_distance", "close distance", 1e3, "mm"),
    ("lambda0", "-lambda/-energy", "wavelength", 1e10, "Angstrom"),
)


def check_physical(f: CFlags, start: CFlags, origins: dict[str, str]) -> None:
    """Reject values that have no physical meaning and that C would divide by or render.

    Flag values are range-checked as they are read (`nbfunc.cli.flags`); this catches what
    came from an -img/-mask header and the combinations of flags.
    Raises:
        FlagError: naming the flag, or the header file, that gave the value.
    """
    for name, flag, what, scale, unit in _POSITIVE:
        value = getattr(f, name)
        if name == "close_distance" and math.isnan(value):
            continue
        if not (math.isfinite(value) and value > 0):
            source = origins.get(name) if value == getattr(start, name) else None
            fix = f"; give {flag.split('/')[0]} to override it" if source else ""
            raise FlagError(f"{source or flag}: {what} is {value * scale:g} {unit}, expected a "
                            f"value greater than 0{fix}")
    if f.flux != 0.0 and f.exposure > 0.0 and f.beamsize == 0.0:
        raise FlagError("-beamsize 0 with -flux: fluence = flux*exposure/beamsize^2 would be "
                        "infinite; give -beamsize in mm (greater than 0) or -fluence")


def check_vectors(f: CFlags, vectors: dict) -> None:
    """Zero-length axes of the CUSTOM convention (named conventions replace every vector)."""
    if f.beam_convention != "CUSTOM":
        return
    flags = {"beam": ("-beam_vector", f.beam_vector), "fdet": ("-fdet_vector", f.fdet_vector),
             "sdet": ("-sdet_vector", f.sdet_vector), "polar": ("-polar_vector", f.polar_vector),
             "spindle": ("-spindle_axis", f.spindle_vector),
             "twotheta_axis": ("-twotheta_axis", f.twotheta_axis)}
    for key, (flag, given) in flags.items():
        if not any(vectors[key]):
            shown = " ".join(f"{x:g}" for x in given)
            raise FlagError(f"{flag} {shown} is a zero-length vector; expected a direction "
                            "(x y z, not all 0)")
    normal = np.cross(vectors["fdet"], vectors["sdet"])
    if float(np.linalg.norm(normal)) < 1e-12:
        raise FlagError("-fdet_vector and -sdet_vector are parallel, so the pixels do not span "
                        "a plane; give perpendicular fast and slow axes")


_VOLUME_RANGE = (1e-100, 1e100)
"""a*b*c (A^3) accepted: the reciprocal cell (1/volume) and the cubes of lengths met in the
geometry then stay inside float64; real cells are 1e1 to 1e11 A^3."""

_EXTENT_MAX_MM = 1e100
"""Largest detector side (mm) accepted; cubes of lengths in the geometry stay inside float64."""


def cell_from_flags(f: CFlags) -> tuple[float, ...]:
    """(a, b, c in Angstrom, alpha, beta, gamma in deg) of -cell, with C's defaults.

    As in C, b and c default to a, and angles of 0 to 90 degrees.
    Raises:
        FlagError: a is not positive, or the angles enclose no volume.
    """
    if not f.cell_a > 0:
        raise FlagError(f"-cell expects a cell edge a greater than 0 Angstrom, got {f.cell_a:g}")
    b = f.cell_b if f.cell_b > 0 else f.cell_a
    c = f.cell_c if f.cell_c > 0 else f.cell_a
    angles = [x if x > 0 else math.pi / 2 for x in (f.alpha, f.beta, f.gamma)]
    s = sum(angles) / 2
    skew = math.sin(s) * math.sin(s - angles[0]) * math.sin(s - angles[1]) * math.sin(s - angles[2])
    degrees = tuple(math.degrees(x) for x in angles)
    if max(degrees) >= 180.0 or not skew > 0:
        shown = " ".join(f"{x:g}" for x in degrees)
        raise FlagError(f"-cell angles alpha beta gamma = {shown} deg enclose no volume; expected "
                        "each below 180, each smaller than the sum of the other two, and a sum "
                        "below 360")
    volume = f.cell_a * b * c
    if not _VOLUME_RANGE[0] < volume < _VOLUME_RANGE[1]:
        raise FlagError(f"-cell edges a b c = {f.cell_a:g} {b:g} {c:g} Angstrom give a*b*c = "
                        f"{volume:g} A^3, outside what float64 geometry can hold (1e-100 to "
                        "1e100); give the edges of a real cell in Angstrom")
    return (f.cell_a, b, c) + degrees


_TREE_PATHS = {"Beam": "beam", "SourceGrid": "beam.sources", "SourceList": "beam.sources",
               "Detector": "detector", "Crystal": "crystal", "Sampling": "sampling", "Params": ""}

_TREE_FLAGS = {
    "detector.distance": "-distance/-close_distance", "detector.pixel_size": "-pixel",
    "detector.fpixels": "-detpixels_f", "detector.spixels": "-detpixels_s",
    "detector.beam_center_f": "-Xbeam/-Ybeam/-ORGX/-Xclose",
    "detector.beam_center_s": "-Xbeam/-Ybeam/-ORGY/-Yclose",
    "detector.rotx": "-detector_rotx", "detector.roty": "-detector_roty",
    "detector.rotz": "-detector_rotz", "detector.twotheta": "-twotheta",
    "detector.thickness": "-detector_thick", "detector.mu": "-detector_abs/-detector_thick",
    "detector.thicksteps": "-detector_thicksteps", "detector.fdet_vector": "-fdet_vector",
    "detector.sdet_vector": "-sdet_vector", "detector.odet_vector": "-odet_vector",
    "detector.twotheta_axis": "-twotheta_axis",
    "beam.wavelength": "-lambda/-energy", "beam.kahn_factor": "-polar",
    "beam.fluence": "-fluence/-flux", "beam.beam_vector": "-beam_vector",
    "beam.polar_vector": "-polar_vector", "beam.sources.dispersion": "-dispersion",
    "beam.sources.hdivrange": "-hdivrange/-divergence",
    "beam.sources.vdivrange": "-vdivrange/-divergence",
    "crystal.misset": "-misset", "crystal.Na": "-Na/-N", "crystal.Nb": "-Nb/-N",
    "crystal.Nc": "-Nc/-N", "crystal.fudge": "-fudge", "crystal.mosaic_spread": "-mosaic",
    "crystal.phi_start": "-phi", "crystal.phi_step": "-phistep/-osc",
    "crystal.default_F": "-default_F", "crystal.fhkl": "-hkl", "crystal.water_size": "-water",
    "crystal.spindle_axis": "-spindle_axis", "crystal.phisteps": "-phisteps",
    "crystal.mosaic_domains": "-mosaic_dom", "sampling.oversample": "-oversample",
    "sampling.dmin": "-dmin", "sampling.chunk": "-chunk", "sampling.mask": "-mask",
    "sampling.roi": "-roi",
}
_MODEL_FLAGS = {"SourceGrid": "-divergence/-dispersion", "SourceList": "-sourcefile",
                "Params": "-roi/-mask"}


_GROUPS = ("beam", "detector", "crystal", "sampling")
_MESSAGE_CHARS = 160  # a tree message is cut here so the whole line stays under 300 characters


def _error_path(group: str, model: str, loc: tuple, message: str) -> str:
    """Dotted tree path of a validation error; a model-level error names it in its message."""
    if loc:
        return ".".join(x for x in (group, str(loc[0])) if x)
    import nbfunc.params

    lead = re.match(r"[A-Za-z_][\w.]*", message)
    word = lead.group(0).rstrip(".") if lead else ""
    if word.split(".")[0] in _GROUPS:
        return word
    names = getattr(getattr(nbfunc.params, model, None), "model_fields", {})
    return ".".join(x for x in (group, word if word in names else "") if x)


def tree_error(err, cell_flag: str) -> FlagError:
    """A pydantic ValidationError of the parameter tree as one line naming the flag."""
    first = err.errors()[0]
    group = _TREE_PATHS.get(err.title, err.title.lower())
    message = " ".join(str(first["msg"]).removeprefix("Value error, ").split())
    where = _error_path(group, err.title, tuple(first["loc"]), message)
    if where.startswith("crystal.cell_") or where in ("crystal", "crystal.base_orientation"):
        flag = cell_flag
    else:
        flag = (_TREE_FLAGS.get(where) or _TREE_FLAGS.get(".".join(where.split(".")[:2]))
                or _MODEL_FLAGS.get(err.title) or "the flags")
    if len(message) > _MESSAGE_CHARS:
        message = message[:_MESSAGE_CHARS - 3] + "..."
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return FlagError(f"{flag}: {message}{more} [{where or 'params'} in the parameter tree]")


@contextlib.contextmanager
def building_tree(cell_flag: str):
    """Turn validation errors raised while the tree is built into `tree_error` lines."""
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as err:
        raise tree_error(err, cell_flag) from None


def fdump_unusable(path: str) -> str | None:
    """Why the C program could not read the Fdump.bin at ``path`` ("is a folder", ...), or None.

    nanoBragg opens Fdump.bin when no -hkl is given; a file it cannot open counts as absent
    (it then renders with -default_F), and a folder yields no values.
    """
    if os.path.isdir(path):
        return "is a folder"
    if not os.access(path, os.R_OK):
        return "cannot be read" if os.path.exists(path) else "is a broken link"
    return None


def cells_across(size_m: float, length_m: float, axis: str) -> int:
    """Unit cells across a crystal of ``size_m`` with cell edge ``length_m`` (both m), as C.

    Raises:
        FlagError: more cells than a C int holds, naming the crystal-size flags of ``axis``.
    """
    cells = size_m / length_m if length_m > 0 else math.inf
    if not cells <= 2**31 - 1:
        raise FlagError(f"-sample_{axis}/-xtal_{axis}/-xtalsize/-samplesize: a crystal of "
                        f"{size_m * 1e3:g} mm is {cells:g} unit cells along {axis}, more than a C int "
                        "holds; give the crystal size in mm (e.g. 0.01)")
    return math.ceil(cells)


def check_frame(frame) -> None:
    """The beam must meet the detector plane where the geometry puts it (finite distances)."""
    values = torch.stack([frame.distance, frame.close_distance, *frame.pix0])
    squares = torch.stack([frame.distance, frame.close_distance]) ** 2  # solid angles need them
    if bool(torch.isfinite(values).all()) and bool(((squares > 0) & squares.isfinite()).all()):
        return
    cos = float(torch.dot(frame.beam, frame.odet))
    if abs(cos) > 1e-6:
        raise FlagError(f"-distance/-close_distance: the detector is "
                        f"{float(frame.close_distance) * 1e3:g} mm from the sample, too near or "
                        "too far to square in float64 (solid angles need it); give the distance "
                        "of a real detector in mm")
    raise FlagError(f"-beam_vector/-odet_vector/-twotheta/-detector_rot*: the beam runs along the "
                    f"detector plane (beam . detector normal = {cos:.3g}) and never reaches it; "
                    "give a beam direction and detector angles that face each other")


def check_sampling_memory(f: CFlags, hsteps: int, vsteps: int, dispsteps: int, domains: int,
                          phisteps: int, dtype: torch.dtype) -> None:
    """Refuse up front sources or mosaic orientations that cannot fit in this machine's memory
    (`nbfunc.beam.check_source_memory`, `nbfunc.crystal.check_mosaic_memory`), before any of
    them is generated. The sources are counted before the round-divergence cut and at 8-byte
    floats (the tree is validated in float64 before any conversion); a -sourcefile is bounded
    by its size limit instead.

    Raises:
        NbfuncInputError: one line naming the flags, the memory needed and the fix.
    """
    try:
        if f.source_file is None:
            check_source_memory(hsteps, vsteps, dispsteps, 8, physical_memory())
        check_mosaic_memory(domains, phisteps, torch.finfo(dtype).bits // 8, physical_memory())
    except ValueError as err:
        raise NbfuncInputError(str(err)) from None


def facing_away(frame) -> str | None:
    """A warning when the detector's normal points back at the sample (negative close
    distance), else None.

    The C program then renders every pixel negative: the solid angle ``pixel^2 close /
    airpath^3`` takes the sign of the close distance. A swing past 90 degrees about the
    direct-beam spot (-twotheta with the beam pivot of the MOSFLM, DENZO and ADXV
    conventions) turns the detector over in place rather than moving it behind the sample.
    """
    close = float(frame.close_distance)
    if not close < 0:
        return None
    return (f"the detector faces away from the sample (close distance {close * 1e3:g} mm): "
            "solid angles and pixel values come out negative, as in nanoBragg; to swing the "
            "detector around the sample, pivot about the sample (-xds, -dials, or custom vectors "
            "with -pivot sample)")


def check_oversample(recommended: float, xtal_m: float, frame, f: CFlags) -> None:
    """Automatic oversampling needs a sub-pixel count that a C int holds."""
    if f.oversample > 0 or recommended <= 2**31 - 1:
        return
    raise FlagError(f"-oversample: automatic oversampling would need {recommended:g} sub-pixels "
                    f"per axis (crystal {xtal_m * 1e3:g} mm, distance "
                    f"{float(frame.distance) * 1e3:g} mm, -pixel {f.pixel_size * 1e3:g} mm); give "
                    "-oversample N, or check -distance, -pixel and the detector angles")


# --------------------------------------------------------------------------------------------
# main entry
# --------------------------------------------------------------------------------------------
def derive(argv: list[str], dtype: torch.dtype | None = None, cwd: str | None = None) -> tuple[Params, RunInfo]:
    """Parse nanoBragg flags and derive the full parameter tree as the C program does.

    Args:
        argv: the flags, without the program name.
        dtype: floating dtype of the leaves (default: the -dtype flag, float64).
        cwd: directory where relative file names and Fdump.bin are looked up (default: the
            current directory).
    Returns:
        (params, run information for the command line).
    Raises:
        nbfunc.cli.flags.FlagError, NbfuncInputError: bad flags, values or files.
    """
    path = lambda name: name if cwd is None or os.path.isabs(name) else os.path.join(cwd, name)
    img_file, mask_file = find_header_files(argv)
    start, mask, origins = CFlags(), None, {}
    if mask_file is not None:
        with reading("-mask"):
            header, mask_data = apply_smv_header(start, path(mask_file), is_mask=True)
        origins.update(header_origins(start, header, "-mask", mask_file))
        start, mask = header, mask_data != 0
    if img_file is not None:
        with reading("-img"):
            header, _ = apply_smv_header(start, path(img_file), is_mask=False)
        origins.update(header_origins(start, header, "-img", img_file))
        start = header
    f = parse_flags(list(argv), start)
    check_physical(f, start, origins)
    if f.device.split(":")[0] == "meta":
        raise FlagError(f"-device {f.device}: the meta device holds shapes, not values, so no "
                        "image could be written; use -device cpu or cuda")
    info = RunInfo(flags=f, warnings=list(f.warnings))
    warn = info.warnings

    # detector size
    if f.fpixels:
        f.detsize_f = f.pixel_size * f.fpixels
    if f.spixels:
        f.detsize_s = f.pixel_size * f.spixels
    if not max(f.detsize_f, f.detsize_s) * 1e3 <= _EXTENT_MAX_MM:
        raise FlagError(f"-pixel/-detsize: the detector is {max(f.detsize_f, f.detsize_s) * 1e3:g}"
                        f" mm wide, too large to compute with (at most {_EXTENT_MAX_MM:g} mm); give "
                        "-pixel in mm and -detpixels of a real detector")
    counts = (f.detsize_f / f.pixel_size, f.detsize_s / f.pixel_size)
    if not max(counts) < 2**31 - 1:
        raise FlagError(f"-detpixels/-detsize: {counts[0]:g}x{counts[1]:g} pixels are more than a C "
                        "int can count (2147483647); give a smaller -detsize or a larger -pixel")
    fpixels = math.ceil(counts[0] - 0.5)
    spixels = math.ceil(counts[1] - 0.5)
    if fpixels <= 0 or spixels <= 0:
        raise FlagError(f"-detpixels/-detsize: the detector has {fpixels}x{spixels} pixels; give "
                        "-detpixels N (N > 0) or a -detsize larger than -pixel")
    if fpixels * spixels > 2**31 - 1:
        raise FlagError(f"-detpixels/-detsize: {fpixels}x{spixels} pixels are more than a C int "
                        "can count (2147483647); give a smaller detector, or -roi to render part")
    if mask is not None and mask.shape != (spixels, fpixels):
        raise NbfuncInputError(f"-mask {mask_file}: {mask.shape[1]}x{mask.shape[0]} pixels but the "
                               f"detector has {fpixels}x{spixels}; give a mask of the detector's size")

    # fluence and sample clipping
    if f.flux != 0.0 and f.exposure > 0.0 and f.beamsize >= 0:
        f.fluence = f.flux * f.exposure / f.beamsize / f.beamsize
        if not math.isfinite(f.fluence):
            raise FlagError(f"-flux/-exposure/-beamsize: fluence = flux*exposure/beamsize^2 = "
                            f"{f.flux:g}*{f.exposure:g}/({f.beamsize * 1e3:g} mm)^2 overflows; "
                            "give a real flux (photons/s), exposure (s) and beam size (mm)")
    if f.beamsize >= 0:
        if f.beamsize < f.sample_y:
            warn.append(f"clipping sample ({f.sample_y:g} m high) with beam ({f.beamsize:g} m)")
            f.sample_y = f.beamsize
        if f.beamsize < f.sample_z:
            warn.append(f"clipping sample ({f.sample_z:g} m wide) with beam ({f.beamsize:g} m)")
            f.sample_z = f.beamsize

    conv = resolve_convention(f)
    check_vectors(f, conv["vectors"])
    roi = list(f.roi)
    roi[0] = 0 if roi[0] < 0 else roi[0]
    roi[1] = fpixels if roi[1] < 0 else roi[1]
    roi[2] = 0 if roi[2] < 0 else roi[2]
    roi[3] = spixels if roi[3] < 0 else roi[3]
    if roi[0] > roi[1] or roi[2] > roi[3]:
        raise FlagError(f"-roi {' '.join(str(x) for x in f.roi)} is empty; expected xmin xmax ymin "
                        "ymax with xmin <= xmax and ymin <= ymax (pixel indices, inclusive)")

    # sampling rules
    phisteps, osc, phistep = phi_steps(f)
    hdiv = auto_steps(f.hdivsteps, f.hdivrange, f.hdivstep, steps_only_range=1.0,
                      flags="-hdivrange/-hdivstep")
    vdiv = auto_steps(f.vdivsteps, f.vdivrange, f.vdivstep, steps_only_range=1.0,
                      flags="-vdivrange/-vdivstep")
    disp = auto_steps(f.dispsteps, f.dispersion, f.dispstep, steps_only_range=1.0,
                      flags="-dispersion")
    thick = auto_steps(f.detector_thicksteps, f.detector_thick, f.detector_thickstep,
                       steps_only_range=0.5e-6, split_range=True,
                       flags="-detector_thick")
    mu = f.detector_mu
    if thick[1] > 0.0 and mu < 0.0:
        mu = 1.0 / thick[1]
        warn.append(f"setting detector attenuation depth to {mu:g} m")
    if not math.isfinite(mu):
        raise FlagError(f"-detector_abs/-detector_thick: the attenuation depth (or the sensor "
                        f"thickness, {thick[1] * 1e6:g} um) is so small that 1/depth overflows; "
                        "give a depth in um (or 0 or inf for no absorption) and a real thickness")
    domains, spread = mosaic_setting(f, warn)
    fix = lambda s: s if (s[1] > 0.0 and s[2] > 0.0 and s[0] > 0) else (1, 0.0, 0.0)
    hdiv, vdiv, disp, thick = fix(hdiv), fix(vdiv), fix(disp), fix(thick)
    if dtype is None:
        dtype = torch.float32 if f.dtype == "float32" else torch.float64
    check_sampling_memory(f, hdiv[0], vdiv[0], disp[0], domains, phisteps, dtype)

    # interpolation (decided before N is derived from crystal sizes)
    interpolate = f.interpolate
    if interpolate > 1:
        interpolate = 1 if (f.Na <= 2 or f.Nb <= 2 or f.Nc <= 2) else 0

    # cell and orientation
    base_orientation = np.eye(3)
    cell_flag = "-cell" if f.mat_file is None else f"-mat {f.mat_file}"
    if f.mat_file is not None:
        from nbfunc.io.matrix import read_mosflm_matrix

        with reading("-mat"):
            recip = read_mosflm_matrix(path(f.mat_file)) * (1e-10 / f.lambda0)
        with building_tree(cell_flag):
            cell, base_orientation = cell_from_matrix(recip)
        if f.user_cell:
            warn.append("-cell and -mat both given: using the cell and orientation of the -mat file")
    elif f.user_cell:
        cell = cell_from_flags(f)
    else:
        raise NbfuncInputError("no unit cell: give -cell a b c alpha beta gamma (Angstrom, deg) "
                               "or -mat FILE with a MOSFLM orientation matrix")
    misset = f.misset
    if f.misset_mode == -1:
        from nbfunc.crng import random_misset

        seed = f.misset_seed if f.misset_seed is not None else f.seed
        if seed is None:
            seed = -int(time.time())
            warn.append(f"-misset random without a seed: using -misset_seed {-seed}")
        misset = random_misset(seed)
        info.notes.append("random orientation misset angles: "
                          + " ".join(f"{math.degrees(x):f}" for x in misset) + " deg")
    elif f.misset_mode != 1:
        misset = (0.0, 0.0, 0.0)

    cell_kwargs = dict(cell_a=cell[0], cell_b=cell[1], cell_c=cell[2], cell_alpha=cell[3],
                       cell_beta=cell[4], cell_gamma=cell[5],
                       misset=[math.degrees(x) for x in misset],
                       base_orientation=tuple(tuple(float(x) for x in row) for row in base_orientation))
    with building_tree(cell_flag):
        crystal0 = Crystal(**cell_kwargs)
    real, _ = oriented_cell(crystal0)
    lengths = torch.linalg.vector_norm(real, dim=-1).tolist()
    n_cells = [f.Na, f.Nb, f.Nc]
    for i, size in enumerate((f.sample_x, f.sample_y, f.sample_z)):
        if size > 0:
            n_cells[i] = cells_across(size, lengths[i], "xyz"[i])
    n_cells = [max(1.0, float(n)) for n in n_cells]

    # structure factors
    from nbfunc.io.hkl import read_fdump, read_hkl

    grid = None
    if f.hkl_file is not None:
        with reading("-hkl"):
            grid = read_hkl(path(f.hkl_file), f.default_F)
        warn.extend(grid.warnings)
        info.hkl_from_file = True
    elif os.path.lexists(path(f.dump_file)) and fdump_unusable(path(f.dump_file)):
        why = fdump_unusable(path(f.dump_file))
        if f.default_F == 0.0:
            raise NbfuncInputError(f"no structure factors: {f.dump_file} in the working directory "
                                   f"{why} and neither -hkl FILE nor -default_F F was given; give "
                                   f"one of them, or remove {f.dump_file}")
        warn.append(f"{f.dump_file} {why}: ignoring it and using -default_F {f.default_F:g} for "
                    "every reflection")
    elif os.path.exists(path(f.dump_file)):
        with reading("", " (read as no -hkl was given, as nanoBragg does)"):
            grid = read_fdump(path(f.dump_file))
        info.notes.append(f"reading Fs from {f.dump_file}")
    elif f.default_F == 0.0:
        raise NbfuncInputError("no structure factors: give -hkl FILE, or -default_F F (> 0) for "
                               "a constant F, or run where a Fdump.bin from an earlier run exists")
    info.hkl_grid = grid
    if grid is None or getattr(grid, "count", 1) == 0:
        interpolate = 0

    # detector tree
    pivot = conv["pivot"].lower()
    close_given = not math.isnan(f.close_distance)
    centre = (conv["fbeam"], conv["sbeam"]) if pivot == "beam" else (conv["fclose"], conv["sclose"])
    v = conv["vectors"]
    with building_tree(cell_flag):
        detector = Detector(
            distance=(f.close_distance if close_given else f.distance) * 1e3,
            distance_kind="close" if close_given else "beam",
            beam_center_f=centre[0] * 1e3, beam_center_s=centre[1] * 1e3,
            rotx=math.degrees(f.detector_rotx), roty=math.degrees(f.detector_roty),
            rotz=math.degrees(f.detector_rotz), twotheta=math.degrees(f.detector_twotheta),
            pixel_size=f.pixel_size * 1e3, fpixels=fpixels, spixels=spixels, pivot=pivot,
            fdet_vector=v["fdet"], sdet_vector=v["sdet"], odet_vector=v["odet"],
            twotheta_axis=v["twotheta_axis"], curved=f.curved_detector,
            point_pixel=f.point_pixel,
            thicksteps=thick[0], thickness=thick[1] * 1e3,
            thick_step_fraction=(thick[2] / thick[1]) if thick[1] > 0 else 0.0,
            mu=max(mu, 0.0) * 1e-3, absorption=thick[1] != 0.0)
    frame = detector_frame(detector, v["beam"])
    check_frame(frame)
    facing = facing_away(frame)
    if facing:
        warn.append(facing)

    # automatic oversampling
    xtal_max = max(lengths[i] * n_cells[i] for i in range(3))
    reciprocal_pixel = f.lambda0 * float(frame.distance) / f.pixel_size
    ratio = 3.0 * xtal_max / reciprocal_pixel
    check_oversample(ratio, xtal_max, frame, f)
    recommended = max(1, math.ceil(ratio)) if ratio <= 2**31 - 1 else 2**31 - 1
    oversample = f.oversample if f.oversample > 0 else recommended
    if f.oversample <= 0:
        info.notes.append(f"auto-selected {oversample}-fold oversampling")
    elif oversample < recommended:
        warn.append(f"intensity may vary across a pixel: recommend -oversample {recommended}")

    # amorphous-scattering table: unused, but C reads it and stops when it cannot (exit 9)
    if f.stol_file is not None:
        from nbfunc.io.stol import read_stol

        with reading({1e10: "-stol", 1e10 / 4: "-4stol"}.get(f.stol_file_mult, "-Q")):
            read_stol(path(f.stol_file), f.stol_file_mult)

    # sources
    if f.source_file is not None:
        from nbfunc.io.sources import apply_source_defaults, read_source_file

        with reading("-sourcefile"):
            cols = read_source_file(path(f.source_file))
        directions, _, wavelengths = apply_source_defaults(cols, np.array(v["beam"]), f.lambda0)
        with building_tree(cell_flag):
            sources = SourceList(directions=directions, wavelengths=np.asarray(wavelengths) * 1e10)
    else:
        hf, vf, df = divergence_fractions(f, hdiv, vdiv, disp)
        with building_tree(cell_flag):
            sources = SourceGrid(dispersion=disp[1], hdivrange=hdiv[1] * 1e3,
                                 vdivrange=vdiv[1] * 1e3, hdiv_fracs=hf, vdiv_fracs=vf,
                                 disp_fracs=df)

    fhkl = torch.zeros(0, 0, 0, dtype=torch.float64)
    origin = (0, 0, 0)
    if grid is not None:
        fhkl = torch.as_tensor(np.asarray(grid.F, dtype=np.float64))
        origin = (int(grid.h_min), int(grid.k_min), int(grid.l_min))
    draws = {}
    if domains > 1:
        axes, scales = mosaic_draw_arrays(domains, f.mosaic_seed)
        draws = dict(mosaic_axes=axes, mosaic_scales=scales)
    with building_tree(cell_flag):
        beam = Beam(wavelength=f.lambda0 * 1e10, kahn_factor=f.polarization, fluence=f.fluence,
                    sources=sources, beam_vector=v["beam"], polar_vector=v["polar"],
                    polarization=not f.nopolar)
        crystal = Crystal(
            **cell_kwargs, Na=n_cells[0], Nb=n_cells[1], Nc=n_cells[2], fudge=f.fudge,
            mosaic_spread=math.degrees(spread), phi_start=math.degrees(f.phi0),
            phi_step=math.degrees(phistep), default_F=f.default_F, fhkl=fhkl,
            water_size=f.water_size * 1e6, hkl_origin=origin, shape=f.xtal_shape.lower(),
            interpolate=bool(interpolate), spindle_axis=v["spindle"], phisteps=phisteps,
            mosaic_domains=domains, mosaic_seed=f.mosaic_seed, **draws)
        sampling = Sampling(
            oversample=oversample, oversample_thick=f.oversample_thick,
            oversample_polar=f.oversample_polar, oversample_omega=f.oversample_omega,
            roi=tuple(roi), mask=None if mask is None else torch.from_numpy(mask),
            dmin=f.dmin * 1e10, chunk=getattr(f, "chunk", 0))
        params = Params(beam=beam, detector=detector, crystal=crystal, sampling=sampling)
        params = params.to(dtype=dtype)
    check_float_image(params, frame)

    info.oversample, info.roi, info.mask = oversample, tuple(roi), mask
    info.header = _header_values(f, conv, frame, fpixels, spixels, osc)
    check_smv_header(info.header["smv"])
    return params, info


def check_float_image(params: Params, frame) -> None:
    """Refuse a run whose every pixel could overflow the float image (float32, as C's),
    whatever the dtype it renders in: the bound of a pixel off the Bragg peaks (lattice factor
    1: structure factors, water background, fluence) beyond 3.4e38 photons. A pixel on a
    sharp peak may still reach inf, as in C's float image.

    Raises:
        FlagError: naming the bound (`nbfunc.params.photons_bound`) and the flags that raise it.
    """
    bound = photons_bound(params, float(frame.close_distance), float(frame.distance),
                          lattice_peak=False)
    limit = float(torch.finfo(torch.float32).max)
    if not bound <= limit:
        raise FlagError(f"-default_F/-hkl/-water/-fluence: a pixel off the Bragg peaks could "
                        f"reach {bound:.3g} photons, beyond what the float32 float image holds "
                        f"({limit:.3g}); lower the structure factors, -water or -fluence/-flux")


def check_smv_header(smv: dict) -> None:
    """Refuse geometry whose SMV header (-intfile, -noisefile) does not fit its 512 bytes.

    Only absurd values (``-pixel 1e-320``, a detector 1e10 mm wide) print so long with C's
    ``%g``; the C program then writes the pixels at the wrong offset.
    Args:
        smv: `_header_values`' "smv" entry (lengths in m, angles in rad).
    Raises:
        FlagError: naming the header's length and the flags that set its numbers.
    """
    from nbfunc.io.smv import HEADER_BYTES, smv_fields_from_geometry, smv_header_text

    text = max((smv_header_text(smv_fields_from_geometry(**smv, noise_image=noise))
                for noise in (False, True)), key=len)
    if len(text) > HEADER_BYTES:
        longest = max(text.decode("ascii").split("\n")[5:-3], key=len)
        raise FlagError(f"-pixel/-distance/-lambda/-Xbeam/-Ybeam: the SMV header of the int and "
                        f"noise images would be {len(text)} bytes, more than its {HEADER_BYTES} "
                        f"(e.g. {longest}); give lengths of a real detector in mm")


def _header_values(f: CFlags, conv: dict, frame, fpixels: int, spixels: int, osc: float) -> dict:
    """Geometry facts the C program prints and writes in SMV headers (mm, deg, pixels)."""
    pix0 = frame.pix0.tolist()
    fdet, sdet = frame.fdet.tolist(), frame.sdet.tolist()
    fclose = -sum(a * b for a, b in zip(pix0, fdet))
    sclose = -sum(a * b for a, b in zip(pix0, sdet))
    close = float(frame.close_distance)
    distance = float(frame.distance)
    beam = frame.beam.tolist()
    spot = [distance * b - p for b, p in zip(beam, pix0)]
    fbeam = sum(a * b for a, b in zip(fdet, spot))
    sbeam = sum(a * b for a, b in zip(sdet, spot))
    pixel = f.pixel_size
    return dict(
        smv=dict(fpixels=fpixels, spixels=spixels, pixel_size_m=pixel, distance_m=distance,
                 lambda0_m=f.lambda0, xbeam_m=conv["xbeam"], ybeam_m=conv["ybeam"], fbeam_m=fbeam,
                 sbeam_m=sbeam, detsize_s_m=pixel * spixels,
                 dials_origin_mm=(1e3 * pix0[2], 1e3 * pix0[1], -1e3 * pix0[0]),
                 orgx=fclose / pixel + 0.5, orgy=sclose / pixel + 0.5, close_distance_m=close,
                 phi0_rad=f.phi0, osc_rad=osc, twotheta_rad=f.detector_twotheta),
        convention=f.beam_convention.lower(), pivot=conv["pivot"].lower(),
        fbeam_mm=fbeam * 1e3, sbeam_mm=sbeam * 1e3, distance_mm=distance * 1e3,
        close_distance_mm=close * 1e3, pixel_size_mm=pixel * 1e3)


def params_from_args(argv: list[str], dtype: torch.dtype = torch.float64) -> Params:
    """nanoBragg flags -> validated `nbfunc.Params` (file names relative to the current directory).

    >>> p = params_from_args("-cell 50 50 50 90 90 90 -default_F 100 -N 5 -detpixels 64".split())  # doctest: +SKIP
    """
    return derive(argv, dtype)[0]
