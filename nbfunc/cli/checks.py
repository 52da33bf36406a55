"""Refusals of the command line: values and combinations without physical meaning, and
pydantic validation errors of the tree, as one line naming the flag (or file) and the fix.

Flag values are range-checked as they are read (`nbfunc.cli.flags`); these checks run during
the derivation (`nbfunc.cli.derive`), before anything is rendered or written.
"""
from __future__ import annotations

import contextlib
import math
import os
import re

import numpy as np
import torch

from nbfunc.beam import check_source_memory
from nbfunc.cli.cflags import CFlags
from nbfunc.cli.flags import FlagError
from nbfunc.crystal import check_mosaic_memory, physical_memory
from nbfunc.io.errors import NbfuncInputError
from nbfunc.params import Params, photons_bound


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


_SOURCE_FLAGS = ("-sourcefile", "-dispersion", "-dispsteps", "-divergence", "-hdivrange",
                 "-vdivrange", "-hdivstep", "-vdivstep", "-hdivsteps", "-vdivsteps", "-divsteps")
"""Flags that set the sources another way than a spectrum (C's source file and grid)."""


def check_spectrum_flags(given: dict[str, str]) -> None:
    """A spectrum (``-spectrum`` or ``-bandwidth``) is the run's whole source list: its channels
    all lie along the beam. Refuse it next to another spectrum or to the flags that make the C
    program's sources (``-sourcefile``, the dispersion and divergence grid), and
    ``-bandwidth_steps`` without ``-bandwidth``.

    Args:
        given: `nbfunc.cli.flags.given_flags` of the command line (handler name -> token).
    Raises:
        FlagError: one line naming both flags and the fix.
    """
    if "-bandwidth_steps" in given and "-bandwidth" not in given:
        raise FlagError("-bandwidth_steps without -bandwidth: give -bandwidth FWHM (percent) for "
                        "a Gaussian spectrum, or drop -bandwidth_steps")
    for flag in ("-spectrum", "-bandwidth"):
        if flag not in given:
            continue
        others = [name for name in ("-spectrum", "-bandwidth", *_SOURCE_FLAGS)
                  if name in given and name != flag]
        if others:
            other = given[others[0]]
            raise FlagError(f"{flag} with {other}: a spectrum is the whole source list (its "
                            "channels lie along the beam); give either the spectrum or "
                            f"{other}, not both")


def check_bandwidth_memory(channels: int) -> None:
    """Refuse up front a -bandwidth spectrum of more channels than this machine's memory holds
    as sources (`nbfunc.beam.source_memory_bytes`, 8-byte floats), before any is made.

    Raises:
        NbfuncInputError: one line naming -bandwidth_steps, the memory needed and the most
            channels that fit.
    """
    from nbfunc.beam import source_memory_bytes
    from nbfunc.crystal import gigabytes

    need, limit = source_memory_bytes(channels, 8), physical_memory()
    if need > limit:
        raise NbfuncInputError(f"-bandwidth_steps {channels}: the channels need {gigabytes(need)}, "
                               f"more than the {gigabytes(limit)} of memory here; give at most "
                               f"about {limit * channels // need} channels")


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


EXTENT_MAX_MM = 1e100
"""Largest detector side (mm) accepted; cubes of lengths in the geometry stay inside float64."""


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
    "crystal.mosaic_domains": "-mosaic_dom", "crystal.Ncells_def": "-Ndef", "crystal.G": "-G",
    "beam.sources.weights": "-spectrum", "crystal.eta": "-eta/-eta_tensor",
    "crystal.mosaic_model": "-mosaic_quadrature", "crystal.diffuse_gamma": "-diffuse_gamma",
    "crystal.diffuse_sigma": "-diffuse_sigma", "crystal.diffuse_laue_group": "-laue_group",
    "crystal.diffuse": "-diffuse", "crystal.B": "-bfactor", "crystal.bfactor": "-bfactor",
    "sampling.oversample": "-oversample",
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


def check_device(device: str) -> None:
    """Refuse the meta device, which holds shapes but no values."""
    if device.split(":")[0] == "meta":
        raise FlagError(f"-device {device}: the meta device holds shapes, not values, so no "
                        "image could be written; use -device cpu or cuda")


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


def check_smv_header(header) -> None:
    """Refuse geometry whose SMV header (-intfile, -noisefile) does not fit its 512 bytes.

    Only absurd values (``-pixel 1e-320``, a detector 1e10 mm wide) print so long with C's
    ``%g``; the C program then writes the pixels at the wrong offset.
    Args:
        header: `nbfunc.cli.header.RunHeader` of the run.
    Raises:
        FlagError: naming the header's length and the flags that set its numbers.
    """
    from nbfunc.cli.header import smv_fields
    from nbfunc.io.smv import HEADER_BYTES, smv_header_text

    text = max((smv_header_text(smv_fields(header, noise)) for noise in (False, True)), key=len)
    if len(text) > HEADER_BYTES:
        longest = max(text.decode("ascii").split("\n")[5:-3], key=len)
        raise FlagError(f"-pixel/-distance/-lambda/-Xbeam/-Ybeam: the SMV header of the int and "
                        f"noise images would be {len(text)} bytes, more than its {HEADER_BYTES} "
                        f"(e.g. {longest}); give lengths of a real detector in mm")
