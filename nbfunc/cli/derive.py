"""From nanoBragg flags to a validated `nbfunc.Params`, deriving what the C program derives.

`derive` follows the C program's main() in order: SMV header ingestion (-mask, then -img),
the flags, detector size, fluence, beam-centre defaults per convention, basis vectors, the
automatic step counts (phi, divergence, dispersion, sensor layers, mosaic domains), the cell
(from -cell or -mat, misset, random misset), N from crystal sizes, automatic oversampling,
structure factors (-hkl or a Fdump.bin left in the working directory), and the sources.
Every quantity the physics needs ends up in the tree; what only the command line needs
(output names, seeds, messages) goes in `RunInfo`, with the header geometry read back from
the tree (`nbfunc.cli.header.header_from_tree`). `derive` is a short orchestrator over one
function per step and one builder per group of the tree (`build_detector`, `build_beam`,
`build_crystal`, `build_sampling`).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from nbfunc.cli.cflags import RTD, CFlags
from nbfunc.cli.checks import (EXTENT_MAX_MM, building_tree, check_bandwidth_memory, check_device,
                               check_float_image, check_frame, check_oversample, check_physical,
                               check_sampling_memory, check_smv_header, check_spectrum_flags,
                               check_vectors, facing_away, fdump_unusable)
from nbfunc.cli.flags import FlagError, find_header_files, given_flags, parse_flags
from nbfunc.cli.rules import (Steps, cell_from_flags, cell_from_matrix, cells_across,
                              divergence_fractions, resolve_convention, resolve_roi,
                              sampling_steps)
from nbfunc.crystal import mosaic_draw_arrays, oriented_cell
from nbfunc.detector import detector_frame
from nbfunc.io.errors import NbfuncInputError
from nbfunc.cli.header import RunHeader, header_from_tree
from nbfunc.params import Beam, Crystal, Detector, Params, Sampling, SourceGrid, SourceList


@dataclass
class RunInfo:
    """What the command line needs beyond the physics: the flags (outputs, seeds), warnings
    and notes to print, the structure factors to dump, and facts read from the tree: its
    oversampling, ROI (xmin, xmax, ymin, ymax, inclusive), mask (slow, fast) and header
    geometry (`nbfunc.cli.header.RunHeader`: mm, Angstrom, deg).
    """

    flags: CFlags
    header: RunHeader | None = None
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


# --------------------------------------------------------------------------------------------
# main entry: the C program's order, one builder per group of the tree
# --------------------------------------------------------------------------------------------
def derive(argv: list[str], dtype: torch.dtype | None = None, cwd: str | None = None) -> tuple[Params, RunInfo]:
    """Parse nanoBragg flags and derive the full parameter tree as the C program does.

    Units: `CFlags` keeps the C program's metres and radians, because the derivations that
    follow C line by line (detector size, convention defaults of the beam centre, pivots,
    automatic step counts, crystal sizes) compare and combine those values as C does. The
    builders (`build_detector`, `build_beam`, `build_crystal`, `build_sampling`) convert
    them once into the tree's units (mm, Angstrom, deg, mrad, um); from then on the tree is
    the one source: the physics reads it (`nbfunc.detector.detector_frame` converts it to SI
    once) and the header is read from it (`nbfunc.cli.header.header_from_tree`).

    With ``-params FILE`` the tree is read from FILE instead (`nbfunc.cli.tree_run`).

    Args:
        argv: the flags, without the program name.
        dtype: floating dtype of the leaves (default: the -dtype flag, float64; with
            -params, the file's unless -dtype is given).
        cwd: directory where relative file names and Fdump.bin are looked up (default: the
            current directory).
    Returns:
        (params, run information for the command line).
    Raises:
        nbfunc.cli.flags.FlagError, NbfuncInputError: bad flags, values or files.
    """
    path = lambda name: name if cwd is None or os.path.isabs(name) else os.path.join(cwd, name)
    if "-params" in given_flags(argv):
        from nbfunc.cli.tree_run import derive_from_tree

        return derive_from_tree(argv, dtype, path)
    f, mask, mask_file = read_flags(argv, path)
    info = RunInfo(flags=f, warnings=list(f.warnings))
    if f.xtal_shape == "GAUSS" and any(f.Ncells_def):
        info.warnings.append("-Ndef with -gauss_xtal: the C program's Gaussian with diffBragg's "
                             "off-diagonal terms is neither program's model (docs/physics.md, "
                             "'Domain-size tensor'); -gauss_hkl_xtal is diffBragg's")
    fpixels, spixels = detector_pixels(f, mask, mask_file)
    apply_flux(f, info.warnings)
    conv = resolve_convention(f)
    check_vectors(f, conv["vectors"])
    roi = resolve_roi(f.roi, fpixels, spixels)
    steps = sampling_steps(f, info.warnings)
    if dtype is None:
        dtype = torch.float32 if f.dtype == "float32" else torch.float64
    check_sampling_memory(f, steps.hdiv[0], steps.vdiv[0], steps.disp[0], steps.domains,
                          steps.phisteps, dtype)
    cell = cell_setting(f, path, info)
    grid = structure_factors(f, path, info)
    detector, frame = build_detector(f, conv, (fpixels, spixels), steps, cell.flag, info.warnings)
    oversample = choose_oversample(f, cell, frame, info)
    check_stol_file(f, path)
    with building_tree(cell.flag):
        beam = build_beam(f, conv["vectors"], steps, path)
        crystal = build_crystal(f, cell, steps, grid, conv["vectors"]["spindle"])
        sampling = build_sampling(f, oversample, roi, mask)
        params = Params(beam=beam, detector=detector, crystal=crystal, sampling=sampling)
        params = params.to(dtype=dtype)
    check_float_image(params, frame)
    return params, finish_info(info, params, f.beam_convention, mask)


def finish_info(info: RunInfo, params: Params, convention: str, mask: np.ndarray | None) -> RunInfo:
    """``info`` completed from the rendered tree: oversampling, ROI, mask and the header
    (`nbfunc.cli.header.header_from_tree`, checked to fit its 512 bytes)."""
    det, smp = params.detector, params.sampling
    info.oversample, info.mask = smp.oversample, mask
    info.roi = tuple(smp.roi) if smp.roi is not None else (0, det.fpixels, 0, det.spixels)
    info.header = header_from_tree(params, convention)
    check_smv_header(info.header)
    return info


def read_flags(argv: list[str], path) -> tuple[CFlags, np.ndarray | None, str | None]:
    """C's two argument loops: the -mask and -img headers, then the flags over them.

    Returns:
        (flags, the mask (slow, fast) of True for pixels to render or None, the mask's name).
    Raises:
        FlagError, NbfuncInputError: bad flags, unreadable headers, values without meaning.
    """
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
    check_spectrum_flags(given_flags(argv))
    check_device(f.device)
    return f, mask, mask_file


def detector_pixels(f: CFlags, mask: np.ndarray | None, mask_file: str | None) -> tuple[int, int]:
    """(fpixels, spixels) as C derives them from -detpixels, -detsize and -pixel; sets the
    C variables ``detsize_f/s`` (m) as C does.

    Raises:
        FlagError: a detector of no pixels, of more than a C int counts, or too wide.
        NbfuncInputError: a -mask of another size.
    """
    if f.fpixels:
        f.detsize_f = f.pixel_size * f.fpixels
    if f.spixels:
        f.detsize_s = f.pixel_size * f.spixels
    if not max(f.detsize_f, f.detsize_s) * 1e3 <= EXTENT_MAX_MM:
        raise FlagError(f"-pixel/-detsize: the detector is {max(f.detsize_f, f.detsize_s) * 1e3:g}"
                        f" mm wide, too large to compute with (at most {EXTENT_MAX_MM:g} mm); give "
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
    return fpixels, spixels


def apply_flux(f: CFlags, warn: list[str]) -> None:
    """Fluence from -flux/-exposure/-beamsize, and the crystal clipped by the beam, as C does
    (updates ``f.fluence``, ``f.sample_y``, ``f.sample_z``)."""
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


@dataclass(frozen=True)
class CellSetting:
    """The crystal's cell before its group is built: ``kwargs`` of `Crystal` (cell in
    Angstrom and deg, misset in deg, base orientation), the real-space edge ``lengths`` (m),
    ``n_cells`` (Na, Nb, Nc after the crystal sizes) and the ``flag`` that gave the cell."""

    kwargs: dict
    lengths: tuple
    n_cells: tuple
    flag: str


def cell_setting(f: CFlags, path, info: RunInfo) -> CellSetting:
    """The cell from -mat or -cell, the misset (random from its seed) and N from the crystal
    sizes, as C derives them.

    Raises:
        FlagError, NbfuncInputError: no cell, a cell without volume, an unreadable -mat file.
    """
    warn = info.warnings
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
    kwargs = dict(cell_a=cell[0], cell_b=cell[1], cell_c=cell[2], cell_alpha=cell[3],
                  cell_beta=cell[4], cell_gamma=cell[5], misset=[math.degrees(x) for x in misset],
                  base_orientation=tuple(tuple(float(x) for x in row) for row in base_orientation))
    with building_tree(cell_flag):
        real, _ = oriented_cell(Crystal(**kwargs))
    lengths = torch.linalg.vector_norm(real, dim=-1).tolist()
    n_cells = [f.Na, f.Nb, f.Nc]
    for i, size in enumerate((f.sample_x, f.sample_y, f.sample_z)):
        if size > 0:
            n_cells[i] = cells_across(size, lengths[i], "xyz"[i])
    return CellSetting(kwargs, tuple(lengths), tuple(max(1.0, float(n)) for n in n_cells), cell_flag)


def structure_factors(f: CFlags, path, info: RunInfo):
    """The structure-factor grid from -hkl or a Fdump.bin in the working directory, or None
    for -default_F alone (sets ``info.hkl_grid`` and ``info.hkl_from_file``).

    Raises:
        NbfuncInputError: no structure factors at all, or an unreadable file.
    """
    from nbfunc.io.hkl import read_fdump, read_hkl

    grid, warn = None, info.warnings
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
    return grid


def build_detector(f: CFlags, conv: dict, pixels: tuple[int, int], steps: Steps, cell_flag: str,
                   warn: list[str]):
    """The detector group (mm, deg, 1/mm: converted here, once, from C's m and rad) and its
    placed frame (`nbfunc.detector.detector_frame`, SI).

    Args:
        conv: `resolve_convention` of ``f``. pixels: (fpixels, spixels).
    Raises:
        FlagError: a detector the beam never meets, or too near or far to compute with.
    """
    pivot = conv["pivot"].lower()
    close_given = not math.isnan(f.close_distance)
    centre = (conv["fbeam"], conv["sbeam"]) if pivot == "beam" else (conv["fclose"], conv["sclose"])
    v, thick = conv["vectors"], steps.thick
    with building_tree(cell_flag):
        detector = Detector(
            distance=(f.close_distance if close_given else f.distance) * 1e3,
            distance_kind="close" if close_given else "beam",
            beam_center_f=centre[0] * 1e3, beam_center_s=centre[1] * 1e3,
            rotx=math.degrees(f.detector_rotx), roty=math.degrees(f.detector_roty),
            rotz=math.degrees(f.detector_rotz), twotheta=math.degrees(f.detector_twotheta),
            pixel_size=f.pixel_size * 1e3, fpixels=pixels[0], spixels=pixels[1], pivot=pivot,
            fdet_vector=v["fdet"], sdet_vector=v["sdet"], odet_vector=v["odet"],
            twotheta_axis=v["twotheta_axis"], curved=f.curved_detector,
            point_pixel=f.point_pixel,
            thicksteps=thick[0], thickness=thick[1] * 1e3,
            thick_step_fraction=(thick[2] / thick[1]) if thick[1] > 0 else 0.0,
            mu=max(steps.mu, 0.0) * 1e-3, absorption=thick[1] != 0.0)
    frame = detector_frame(detector, v["beam"])
    check_frame(frame)
    facing = facing_away(frame)
    if facing:
        warn.append(facing)
    return detector, frame


def choose_oversample(f: CFlags, cell: CellSetting, frame, info: RunInfo) -> int:
    """-oversample, or C's automatic choice ``ceil(3 * crystal size / reciprocal pixel)``
    (lengths in m)."""
    xtal_max = max(cell.lengths[i] * cell.n_cells[i] for i in range(3))
    reciprocal_pixel = f.lambda0 * float(frame.distance) / f.pixel_size
    ratio = 3.0 * xtal_max / reciprocal_pixel
    check_oversample(ratio, xtal_max, frame, f)
    recommended = max(1, math.ceil(ratio)) if ratio <= 2**31 - 1 else 2**31 - 1
    oversample = f.oversample if f.oversample > 0 else recommended
    if f.oversample <= 0:
        info.notes.append(f"auto-selected {oversample}-fold oversampling")
    elif oversample < recommended:
        info.warnings.append(f"intensity may vary across a pixel: recommend -oversample {recommended}")
    return oversample


def check_stol_file(f: CFlags, path) -> None:
    """Read the amorphous-scattering table: unused, but C reads it and stops when it cannot."""
    if f.stol_file is not None:
        from nbfunc.io.stol import read_stol

        with reading({1e10: "-stol", 1e10 / 4: "-4stol"}.get(f.stol_file_mult, "-Q")):
            read_stol(path(f.stol_file), f.stol_file_mult)


def build_beam(f: CFlags, vectors: dict, steps: Steps, path) -> Beam:
    """The beam group (Angstrom, mrad) with its sources: a -sourcefile's list, a spectrum
    (`spectrum_list`), or the grid of divergence and dispersion steps. Raises pydantic's
    ValidationError (see `building_tree`)."""
    if f.spectrum_file is not None or f.bandwidth >= 0:
        sources = spectrum_list(f, vectors["beam"], path)
    elif f.source_file is not None:
        from nbfunc.io.sources import apply_source_defaults, read_source_file

        with reading("-sourcefile"):
            cols = read_source_file(path(f.source_file))
        directions, _, wavelengths = apply_source_defaults(cols, np.array(vectors["beam"]), f.lambda0)
        sources = SourceList(directions=directions, wavelengths=np.asarray(wavelengths) * 1e10)
    else:
        hf, vf, df = divergence_fractions(f, steps.hdiv, steps.vdiv, steps.disp)
        sources = SourceGrid(dispersion=steps.disp[1], hdivrange=steps.hdiv[1] * 1e3,
                             vdivrange=steps.vdiv[1] * 1e3, hdiv_fracs=hf, vdiv_fracs=vf,
                             disp_fracs=df)
    return Beam(wavelength=f.lambda0 * 1e10, kahn_factor=f.polarization, fluence=f.fluence,
                sources=sources, beam_vector=vectors["beam"], polar_vector=vectors["polar"],
                polarization=not f.nopolar)


BANDWIDTH_STEPS = 7
"""Channels of a -bandwidth spectrum without -bandwidth_steps (1 sigma apart over +-3 sigma)."""


def spectrum_list(f: CFlags, beam_vector, path) -> SourceList:
    """The sources of a spectrum, one per channel along the beam (`nbfunc.io.spectrum`):
    -spectrum's .lam file with its weights divided by their mean (so -fluence stays the
    shot's total), or -bandwidth's Gaussian of relative FWHM ``f.bandwidth`` about -lambda in
    ``f.bandwidth_steps`` channels (`BANDWIDTH_STEPS` by default; one channel at FWHM 0).

    Raises:
        NbfuncInputError: an unreadable or bad -spectrum file, more -bandwidth_steps than
            memory holds.
        FlagError: a -bandwidth whose 3-sigma span reaches the wavelength.
    """
    from nbfunc.io.spectrum import FWHM_PER_SIGMA, gaussian_spectrum, read_spectrum, spectrum_sources

    if f.spectrum_file is not None:
        with reading("-spectrum"):
            wavelengths, weights = read_spectrum(path(f.spectrum_file))
        return spectrum_sources(wavelengths, weights, beam_vector)
    widest = 100.0 * FWHM_PER_SIGMA / 3.0
    if not f.bandwidth * 100.0 < widest:
        raise FlagError(f"-bandwidth {f.bandwidth * 100.0:g} (percent FWHM): the Gaussian's "
                        f"3-sigma span would reach the wavelength; give a FWHM below {widest:.4g} %")
    n = 1 if f.bandwidth == 0 else f.bandwidth_steps if f.bandwidth_steps > 0 else BANDWIDTH_STEPS
    check_bandwidth_memory(n)
    wavelengths, weights = gaussian_spectrum(f.lambda0 * 1e10, n, fwhm=f.bandwidth)
    return spectrum_sources(wavelengths, weights, beam_vector, normalize=False)


def build_crystal(f: CFlags, cell: CellSetting, steps: Steps, grid, spindle) -> Crystal:
    """The crystal group (Angstrom, deg, um) with its structure factors and mosaic draws.

    Interpolation follows C: automatic (-interpolate not given) when some N <= 2 from the
    flags, and off without a structure-factor grid. Raises pydantic's ValidationError.
    """
    interpolate = f.interpolate
    if interpolate > 1:
        interpolate = 1 if (f.Na <= 2 or f.Nb <= 2 or f.Nc <= 2) else 0
    if grid is None or getattr(grid, "count", 1) == 0:
        interpolate = 0
    fhkl, origin = torch.zeros(0, 0, 0, dtype=torch.float64), (0, 0, 0)
    if grid is not None:
        fhkl = torch.as_tensor(np.asarray(grid.F, dtype=np.float64))
        origin = (int(grid.h_min), int(grid.k_min), int(grid.l_min))
    draws = {}
    if f.mosaic_quadrature:
        draws = dict(mosaic_model="quadrature", eta=list(f.eta or (0.0, 0.0, 0.0)))
    elif f.eta:
        raise FlagError("-eta/-eta_tensor need -mosaic_quadrature (nanoBragg's random mosaic "
                        "domains have no anisotropic spread); add it, or drop -eta")
    elif steps.domains > 1:
        axes, scales = mosaic_draw_arrays(steps.domains, f.mosaic_seed)
        draws = dict(mosaic_axes=axes, mosaic_scales=scales)
    n = cell.n_cells
    return Crystal(
        **cell.kwargs, Na=n[0], Nb=n[1], Nc=n[2], fudge=f.fudge,
        mosaic_spread=math.degrees(steps.spread), phi_start=math.degrees(f.phi0),
        phi_step=math.degrees(steps.phistep), default_F=f.default_F, fhkl=fhkl,
        water_size=f.water_size * 1e6, Ncells_def=list(f.Ncells_def), G=f.G,
        hkl_origin=origin, shape=f.xtal_shape.lower(),
        interpolate=bool(interpolate), spindle_axis=spindle, phisteps=steps.phisteps,
        mosaic_domains=steps.domains, mosaic_seed=f.mosaic_seed, **draws, **diffuse_settings(f))


def diffuse_settings(f: CFlags) -> dict:
    """The crystal's diffuse-scattering and B-factor fields from the flags (none when neither
    is asked for, so the tree keeps its defaults). -diffuse_gamma or -diffuse_sigma turns the
    diffuse term on, as -diffuse does (nanoBragg's way: -mosaic, -dispersion and -water turn
    their models on); -laue_group alone does not, since it sets nothing but that term's
    symmetry. -bfactor B sets B and turns the B factor on.

    Raises:
        FlagError: -laue_group without any diffuse flag.
    """
    out = {}
    diffuse = f.diffuse or bool(f.diffuse_gamma) or bool(f.diffuse_sigma)
    if f.laue_group is not None and not diffuse:
        raise FlagError(f"-laue_group {f.laue_group} sets only the symmetry of the diffuse "
                        "scattering (structure factors are not symmetrised); add -diffuse (or "
                        "-diffuse_gamma/-diffuse_sigma), or drop -laue_group")
    if diffuse:
        out["diffuse"] = True
        if f.diffuse_gamma:
            out["diffuse_gamma"] = list(f.diffuse_gamma)
        if f.diffuse_sigma:
            out["diffuse_sigma"] = list(f.diffuse_sigma)
        if f.laue_group is not None:
            out["diffuse_laue_group"] = f.laue_group
    if f.bfactor >= 0:
        out.update(bfactor=True, B=f.bfactor)
    return out


def build_sampling(f: CFlags, oversample: int, roi: tuple, mask: np.ndarray | None) -> Sampling:
    """The sampling group: sub-pixels, ROI, mask, d-min (Angstrom), chunk."""
    return Sampling(
        oversample=oversample, oversample_thick=f.oversample_thick,
        oversample_polar=f.oversample_polar, oversample_omega=f.oversample_omega,
        roi=tuple(roi), mask=None if mask is None else torch.from_numpy(mask),
        dmin=f.dmin * 1e10, chunk=getattr(f, "chunk", 0))


def params_from_args(argv: list[str], dtype: torch.dtype = torch.float64) -> Params:
    """nanoBragg flags -> validated `nbfunc.Params` (file names relative to the current directory).

    >>> p = params_from_args("-cell 50 50 50 90 90 90 -default_F 100 -N 5 -detpixels 64".split())  # doctest: +SKIP
    """
    return derive(argv, dtype)[0]
