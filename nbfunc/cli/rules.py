"""The C program's derivation rules, as small functions of its variables (m, rad, fractions).

Each function reproduces one block of nanoBragg's main(): the automatic step counts of phi,
divergence, dispersion, sensor layers and mosaic domains (`sampling_steps`), the source
fractions of the divergence grid, the convention block (basis vectors, pivot and beam-centre
defaults: `resolve_convention`), the cell from -cell or a MOSFLM matrix, the number of cells
across a crystal size and the ROI defaults. They read and return C's units (`CFlags`); the
builders in `nbfunc.cli.derive` convert the results into the tree's units.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nbfunc.cli.cflags import RTD, CFlags
from nbfunc.cli.flags import FlagError
from nbfunc.cli.header import CONVENTION_AXES
from nbfunc.crystal import oriented_cell
from nbfunc.params import Crystal


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
    """(domains, spread in rad) by the C program's rules; under ``-mosaic_quadrature`` a
    nonzero ``-eta``/``-eta_tensor`` counts as a spread given (the spread itself then 0
    when ``-mosaic`` is not given)."""
    domains, spread = f.mosaic_domains, f.mosaic_spread
    if f.mosaic_quadrature and any(x != 0.0 for x in f.eta) and spread <= 0.0:
        return (10 if domains <= 0 else domains), 0.0
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
    if conv in CONVENTION_AXES:
        vectors = dict(zip(("beam", "fdet", "sdet", "odet", "twotheta_axis", "polar", "spindle"),
                           (tuple(float(x) for x in v) for v in CONVENTION_AXES[conv][0])))
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


_VOLUME_RANGE = (1e-100, 1e100)
"""a*b*c (A^3) accepted: the reciprocal cell (1/volume) and the cubes of lengths met in the
geometry then stay inside float64; real cells are 1e1 to 1e11 A^3."""

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


# --------------------------------------------------------------------------------------------
# ROI and sampling
# --------------------------------------------------------------------------------------------
def resolve_roi(given: tuple[int, int, int, int], fpixels: int, spixels: int) -> tuple[int, int, int, int]:
    """The C program's ROI (xmin, xmax, ymin, ymax; inclusive pixel indices, x fast) from
    -roi: negative entries take C's defaults (0, fpixels, 0, spixels).

    Raises:
        FlagError: an empty ROI.
    """
    roi = list(given)
    roi[0] = 0 if roi[0] < 0 else roi[0]
    roi[1] = fpixels if roi[1] < 0 else roi[1]
    roi[2] = 0 if roi[2] < 0 else roi[2]
    roi[3] = spixels if roi[3] < 0 else roi[3]
    if roi[0] > roi[1] or roi[2] > roi[3]:
        raise FlagError(f"-roi {' '.join(str(x) for x in given)} is empty; expected xmin xmax ymin "
                        "ymax with xmin <= xmax and ymin <= ymax (pixel indices, inclusive)")
    return tuple(roi)


@dataclass(frozen=True)
class Steps:
    """The automatic step counts, in C units: (count, range, step) of phi (rad), horizontal
    and vertical divergence (rad), dispersion (fraction) and sensor layers (m); the sensor's
    attenuation ``mu`` (1/m); mosaic ``domains`` and ``spread`` (rad)."""

    phisteps: int
    osc: float
    phistep: float
    hdiv: tuple
    vdiv: tuple
    disp: tuple
    thick: tuple
    mu: float
    domains: int
    spread: float


def sampling_steps(f: CFlags, warn: list[str]) -> Steps:
    """The C program's automatic step counts (`Steps`) from the flags.

    Raises:
        FlagError: ranges over steps that overflow, an attenuation depth that overflows.
    """
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
    return Steps(phisteps, osc, phistep, fix(hdiv), fix(vdiv), fix(disp), fix(thick), mu,
                 domains, spread)
