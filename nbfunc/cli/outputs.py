"""Files and messages of a command-line run, as the C program writes and prints them.

nanoBragg writes the float image, the SMV int image and (unless -nopgm/-nonoise) a PGM and a
noise image on every run, under default names when no flag names them, and ``Fdump.bin``
after reading an -hkl file. nbfunc writes the same files where C's fopen(name, "wb") would
(through symbolic links; FIFOs and devices in place), all or nothing for regular files: each
is first written to a temporary file next to it, and only when all of them are complete are
they renamed into place. If anything fails or a signal arrives, the files already renamed get
their previous contents back, so an earlier run's output is never left half overwritten
(`commit`, with the leaves in `nbfunc.io.atomic`).

Memory follows the ROI, not the detector: the rendered image is its ROI rectangle
(`RoiImage`; the C program leaves every other pixel at 0), and each output is encoded as a
stream of blocks of at most `BLOCK_BYTES` while it is written (`raster_blocks`).

The statistics follow the C program's main(): float32 pixels summed in double, in raster
order; ``max_I`` is reported at the position (m) of the last sub-pixel of the brightest pixel.
"""
from __future__ import annotations

import math
import os
import time
from fractions import Fraction
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from nbfunc.io import atomic
from nbfunc.io.errors import NbfuncInputError

OPTIONAL = ("fdump",)
"""Outputs whose failure is a warning, not an error (the C program only warns for Fdump.bin)."""


def planned_outputs(f) -> dict[str, str]:
    """Output kind -> file name for this run (C defaults included), in the C program's order."""
    out = {"float": f.float_file, "int": f.int_file}
    if f.write_pgm:
        out["pgm"] = f.pgm_file
    if f.calculate_noise:
        out["noise"] = f.noise_file
    if f.cbf_file is not None:
        out["cbf"] = f.cbf_file
    if f.nxs_file is not None:
        out["nxs"] = f.nxs_file
    if f.params_out is not None:
        out["params"] = f.params_out
    return out


FLAG_OF = {"float": "-floatfile", "int": "-intfile", "pgm": "-pgmfile", "noise": "-noisefile",
           "cbf": "-cbffile", "nxs": "-nxsfile", "params": "-params_out"}
"""The flag that names each output kind."""


def check_formats(params, f) -> None:
    """Fail before any work where an nbfunc output format cannot hold this run: a geometry
    that a miniCBF header cannot describe (`nbfunc.io.cbf.check_geometry`), h5py or
    hdf5plugin missing for -nxsfile (`nbfunc.io.nxmx.check_dependencies`).

    Raises:
        NbfuncInputError: one line naming the flag.
    """
    if f.cbf_file is not None:
        from nbfunc.io.cbf import check_geometry

        try:
            check_geometry(params)
        except ValueError as err:
            raise NbfuncInputError(f"-cbffile {f.cbf_file}: {err}") from err
    if f.nxs_file is not None:
        from nbfunc.io.nxmx import check_dependencies

        try:
            check_dependencies(f.nxs_compression)
        except (ImportError, ValueError) as err:
            raise NbfuncInputError(f"-nxsfile {f.nxs_file}: {err}") from err


def check_writable(files: dict[str, str]) -> None:
    """Fail before any work when an output cannot be written where it is asked for.

    Checks each path as `nbfunc.io.atomic.target_of` classifies it (symbolic links followed).
    Outputs in `OPTIONAL` are not checked: the run goes on without them, as in C.

    Raises:
        NbfuncInputError: the name is empty, a folder, a socket or a read-only file, or its
            folder is missing or read-only.
    """
    for kind, name in files.items():
        flag = FLAG_OF.get(kind, kind)
        if kind in OPTIONAL:
            continue
        if not name:
            raise NbfuncInputError(f"{flag} '': expected a file name for the {kind} image")
        try:
            atomic.target_of(name)
        except atomic.UnwritableError as err:
            raise NbfuncInputError(f"{flag} {name}: cannot write the {kind} image, "
                                   f"{err.reason}") from err


# --------------------------------------------------------------------------------------------
# the rendered image: its ROI rectangle
# --------------------------------------------------------------------------------------------
class RoiImage(NamedTuple):
    """A detector image that is 0 outside one rectangle: the command line's rendered image.

    The C program renders only the ROI and leaves every other pixel at 0 photons (its images
    are calloc'ed), so the rectangle and the detector's shape describe the whole image in
    memory of the ROI's size.

    Attributes:
        pixels: (rows, cols) photons per pixel of the rectangle (float32 for the rendered
            image; uint16 counts for the noise image). Masked pixels are 0.
        origin: (slow, fast) index of ``pixels[0, 0]`` on the detector.
        shape: (spixels, fpixels) of the detector.
    """

    pixels: np.ndarray
    origin: tuple[int, int]
    shape: tuple[int, int]


def roi_rectangle(shape: tuple[int, int], roi: tuple[int, int, int, int]) -> tuple[int, ...]:
    """``(slow0, fast0, rows, cols)`` of the inclusive ROI (xmin, xmax, ymin, ymax), x fast,
    clipped to a (slow, fast) detector; rows or cols are 0 when it lies outside."""
    slow, fast = shape
    x0, x1, y0, y1 = roi
    x0, y0 = min(max(x0, 0), fast), min(max(y0, 0), slow)
    return y0, x0, max(min(y1, slow - 1) - y0 + 1, 0), max(min(x1, fast - 1) - x0 + 1, 0)


def roi_image(values: np.ndarray, flat: np.ndarray, roi: tuple[int, int, int, int],
              shape: tuple[int, int]) -> RoiImage:
    """The rendered pixels placed in their ROI rectangle (float32, 0 where nothing was rendered).

    Args:
        values: (N,) photons per rendered pixel (rounded to float32 here, as C stores them).
        flat: (N,) flat indices ``slow * fpixels + fast``, all inside the ROI.
        roi: (xmin, xmax, ymin, ymax) inclusive. shape: (spixels, fpixels).
    """
    y0, x0, rows, cols = roi_rectangle(shape, roi)
    pixels = np.zeros((rows, cols), dtype=np.float32)
    flat = np.asarray(flat, dtype=np.int64)
    with np.errstate(over="ignore"):  # C stores a float beyond float32 as inf, silently
        pixels[flat // shape[1] - y0, flat % shape[1] - x0] = values
    return RoiImage(pixels, (y0, x0), tuple(shape))


def crop(image: np.ndarray, roi: tuple[int, int, int, int]) -> RoiImage:
    """The ROI rectangle of a whole (slow, fast) image (a view, not a copy)."""
    y0, x0, rows, cols = roi_rectangle(image.shape, roi)
    return RoiImage(image[y0:y0 + rows, x0:x0 + cols], (y0, x0), image.shape)


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
def _c_sum(values: np.ndarray) -> float:
    """Sum in double precision, left to right, as the C loop accumulates it."""
    return float(np.cumsum(values, dtype=np.float64)[-1]) if values.size else 0.0


def _fma(a: float, b: float, c: float) -> float:
    """``a*b + c`` rounded once, as the reference C build computes ``Fdet`` (contracted to a
    fused multiply-add: case pu21 prints 0.0129062 where two roundings give 0.0129063)."""
    return float(Fraction(a) * Fraction(b) + Fraction(c))


def image_statistics(image: RoiImage, mask: np.ndarray | None, pixel_size: float,
                     oversample: int) -> dict:
    """The C program's statistics of the rendered image, from its ROI rectangle.

    mean = sum(I)/n and rms = sqrt(sum(I*I)/(n-1)) over the rendered pixels (ROI and not
    masked; I*I is a float32 product as in C); rmsd = sqrt(sum((I - mean)^2)/(m-1)) over all
    m ROI pixels (the C program's second pass does not test the mask). Pixels outside the
    ROI enter neither sum, so the rectangle alone gives them. max_I is the first pixel in
    raster order above all earlier ones (0 when no pixel is positive), reported at
    ``(Fdet, Sdet)`` of its last sub-pixel, ``(p/o)*(i*o + o - 1) + (p/o)/2`` in metres
    (``p`` pixel size, ``o`` oversample, ``i`` pixel index).

    Args:
        image: the rendered image (`RoiImage`, float32 photons per pixel).
        mask: (slow, fast) bool of the whole detector, True where rendered; None for no mask.
        pixel_size: m. oversample: sub-pixels per pixel edge.
    """
    block = image.pixels
    (y0, x0), (rows, cols) = image.origin, block.shape
    rendered = (np.ones(block.shape, dtype=bool) if mask is None
                else np.asarray(mask[y0:y0 + rows, x0:x0 + cols], dtype=bool))
    values = block[rendered].astype(np.float32)
    n = values.size
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN as C's float sums give them
        mean = _c_sum(values) / max(n, 1)
        rms = math.sqrt(_c_sum(values * values) / (max(n, 2) - 1))
        deviations = block.reshape(-1).astype(np.float64) - mean
        rmsd = math.sqrt(_c_sum(deviations * deviations) / (max(deviations.size, 2) - 1))
    max_i, pixel, at = 0.0, (0, 0), (0.0, 0.0)
    if n and float(values.max()) > 0.0:
        first = int(np.argmax(values))
        slow, fast = (int(i) for i in np.argwhere(rendered)[first] + (y0, x0))
        sub = pixel_size / oversample
        max_i, pixel = float(values[first]), (fast, slow)
        at = (_fma(sub, fast * oversample + oversample - 1, sub / 2.0),
              _fma(sub, slow * oversample + oversample - 1, sub / 2.0))
    return {"max_I": max_i, "max_pixel": pixel, "max_at": at, "mean": mean, "rms": rms,
            "rmsd": rmsd, "sum": _c_sum(values), "n": n}


def statistics_lines(stats: dict) -> list[str]:
    """``max_I = %g  at %g %g`` and ``mean= %g rms= %g rmsd= %g``, as the C program prints them."""
    return [f"max_I = {stats['max_I']:g}  at {stats['max_at'][0]:g} {stats['max_at'][1]:g}",
            f"mean= {stats['mean']:g} rms= {stats['rms']:g} rmsd= {stats['rmsd']:g}"]


# --------------------------------------------------------------------------------------------
# encoding and writing
# --------------------------------------------------------------------------------------------
def smv_fields(info, noise: bool = False):
    """SMV header values of this run (`nbfunc.io.smv.SMVHeaderFields`), from its header
    geometry (`nbfunc.cli.header.header_from_tree`)."""
    from nbfunc.cli.header import smv_fields as fields_of

    return fields_of(info.header, noise)


BLOCK_BYTES = 4 << 20
"""Largest byte block an output is encoded in (4 MiB): an output's encoding holds one block,
besides the ROI rectangle, whatever the detector's size."""


def _zero_run(nbytes: int, zeros: memoryview) -> Iterator[memoryview]:
    """``nbytes`` zero bytes as slices of the shared ``zeros`` block."""
    while nbytes > 0:
        yield zeros[:min(nbytes, len(zeros))]
        nbytes -= len(zeros)


def raster_blocks(image: RoiImage, dtype: str, encode: Callable = lambda rows: rows,
                  block_bytes: int = BLOCK_BYTES) -> Iterator[bytes | memoryview]:
    """The pixel bytes of a whole (slow, fast) image, fast-major, in blocks of at most
    ``block_bytes``: ``encode(rows of image.pixels)`` inside the ROI rectangle and value 0
    outside it (what the C program writes there: its images start zeroed and only ROI pixels
    are set).

    Args:
        image: the ROI rectangle and the detector shape.
        dtype: numpy type of a written pixel (e.g. "<f4", "<u2", "u1").
        encode: (k, cols) pixels -> (k, cols) values to write, called on a few rows at a time.
        block_bytes: bytes per block (at least the size of one ROI row is written at once).
    """
    dtype, (slow, fast) = np.dtype(dtype), image.shape
    (y0, x0), (rows, cols) = image.origin, image.pixels.shape
    zeros = memoryview(bytes(min(block_bytes, slow * fast * dtype.itemsize) or 1))
    if rows == 0 or cols == 0:
        yield from _zero_run(slow * fast * dtype.itemsize, zeros)
        return
    yield from _zero_run((y0 * fast + x0) * dtype.itemsize, zeros)
    step = max(1, block_bytes // (cols * dtype.itemsize))
    for start in range(0, rows, step):
        encoded = np.ascontiguousarray(encode(image.pixels[start:start + step]), dtype=dtype)
        if cols == fast:
            yield encoded.tobytes()
            continue
        for row in range(encoded.shape[0]):
            if start + row:
                yield from _zero_run((fast - cols) * dtype.itemsize, zeros)
            yield encoded[row].tobytes()
    yield from _zero_run(((slow - y0 - rows) * fast + fast - x0 - cols) * dtype.itemsize, zeros)


def _with_header(header: bytes, blocks: Iterable) -> Iterator:
    """``header``, then ``blocks``."""
    yield header
    yield from blocks


def whole_image(image: RoiImage) -> np.ndarray:
    """The (slow, fast) image of a `RoiImage`, 0 outside its rectangle (detector-sized)."""
    full = np.zeros(image.shape, dtype=image.pixels.dtype)
    (y0, x0), (rows, cols) = image.origin, image.pixels.shape
    full[y0:y0 + rows, x0:x0 + cols] = image.pixels
    return full


def encode_outputs(image: RoiImage, stats: dict, info, params=None) -> tuple[dict, dict, list[str]]:
    """Every output as a stream of byte blocks, and the lines the C program prints while
    writing them.

    Each image output of the C program is a generator (`raster_blocks`) that encodes its next
    block only when the writer asks for it, so none is ever held whole; the noise image's
    counts are drawn here, for the ROI only, because its printed line needs their sum. The
    nbfunc formats are built whole, when the writer asks for them: a miniCBF's header gives
    the size and MD5 of the packed pixels before them, and HDF5 is written by h5py in memory.

    Args:
        image: the rendered image, float32 photons per pixel (`RoiImage`).
        stats: from `image_statistics`.
        params: the rendered `nbfunc.Params` (needed for -cbffile, -nxsfile, -params_out).
    Returns:
        (kind -> file name, kind -> `nbfunc.io.atomic.Payload`, printed lines in the C
        program's order).
    """
    from nbfunc.crng import poisson_pixels
    from nbfunc.io.hkl import fdump_bytes
    from nbfunc.io.pgm import pgm_header, pgm_pixels
    from nbfunc.io.smv import auto_int_scale, int_pixels, smv_header

    f = info.flags
    files, payload, lines = {}, {}, []
    if info.hkl_from_file and info.hkl_grid is not None:
        files["fdump"], payload["fdump"] = f.dump_file, fdump_bytes(info.hkl_grid)
        lines.append(f"writing dump file for next time: {f.dump_file}")
    files.update(planned_outputs(f))
    payload["float"] = raster_blocks(image, "<f4")
    lines.append(f"writing {f.float_file} as {image.shape[0] * image.shape[1]} 4-byte floats")
    lines.extend(statistics_lines(stats))
    scale = f.intfile_scale if f.intfile_scale > 0 else auto_int_scale(stats["max_I"])
    lines.append(f"intfile_scale = {scale:g}")
    payload["int"] = _with_header(smv_header(smv_fields(info)), raster_blocks(
        image, "<u2", lambda rows: int_pixels(rows, scale, f.adc_offset)))
    lines.append(f"writing {f.int_file} as 2-byte integers")
    if "pgm" in files:
        pgm_scale = f.pgm_scale
        if pgm_scale <= 0:
            pgm_scale = 250.0 / (5.0 * stats["rmsd"]) if stats["rmsd"] > 0 else scale
        lines.append(f"pgm_scale = {pgm_scale:g}")
        payload["pgm"] = _with_header(pgm_header(image.shape, pgm_scale), raster_blocks(
            image, "u1", lambda rows: pgm_pixels(rows, pgm_scale)))
        lines.append(f"writing {f.pgm_file} as 1-byte integers")
    if "noise" in files:
        seed = f.seed
        if seed is None:
            seed = -int(time.time())
            lines.append(f"noise seed from the clock: -seed {-seed}")
        counts, photons, overloads = poisson_pixels(image.pixels, seed, f.adc_offset)
        lines.append(f"{photons:.0f} photons on noise image ({overloads} overloads)")
        payload["noise"] = _with_header(smv_header(smv_fields(info, noise=True)),
                                        raster_blocks(image._replace(pixels=counts), "<u2"))
        lines.append(f"writing {f.noise_file} as 2-byte integers")
    if "cbf" in files:
        from nbfunc.io.cbf import cbf_bytes

        payload["cbf"] = lambda: (cbf_bytes(whole_image(image), params),)
        lines.append(f"writing {f.cbf_file} as miniCBF, photons rounded to 4-byte integer counts")
    if "nxs" in files:
        from nbfunc.io.nxmx import nxmx_bytes

        payload["nxs"] = lambda: (nxmx_bytes(whole_image(image), params,
                                             compression=f.nxs_compression),)
        lines.append(f"writing {f.nxs_file} as NXmx HDF5, 4-byte float photons")
    if "params" in files:
        payload["params"] = lambda: (params.model_dump_json(indent=1).encode(),)
        lines.append(f"writing {f.params_out} as the parameter tree (JSON, nbfunc.Params.load)")
    return files, payload, lines


def write_all(image: RoiImage, stats: dict, info, params=None) -> list[str]:
    """Write every output of the run, all or nothing; return the lines to print.

    Raises:
        NbfuncInputError: an output could not be written (nothing was changed on disk).
    """
    files, payload, lines = encode_outputs(image, stats, info, params)
    if "fdump" in commit(files, payload):
        lines[0] = f"WARNING: unable to open dump file: {files['fdump']}"
    return lines


def _optional(kind: str, err: BaseException, skipped: list[str]) -> None:
    """Record an optional output as skipped, or re-raise ``err`` for a required one."""
    if kind not in OPTIONAL:
        raise err
    skipped.append(kind)


def _roll_back(placed: list[str], backups: dict[str, str | None]) -> None:
    """Give every replaced file its previous content back; remove the ones that were new."""
    for real in dict.fromkeys(placed):
        backup = backups.pop(real, None)
        if backup:
            os.replace(backup, real)
        else:
            atomic.remove(real)


def commit(files: dict[str, str], payload: dict[str, atomic.Payload]) -> list[str]:
    """Write every payload (bytes, or byte blocks written as they come: `nbfunc.io.atomic.
    Payload`) where C's fopen(name, "wb") would, all or nothing for files.

    Regular files (new or existing, also behind symbolic links) are staged next to the file
    the path resolves to, then all renamed into place; FIFOs and devices are written in place
    after that, in the order of ``files``. On any failure or exception (SIGINT, SIGTERM) the
    staged files are removed and the files already renamed get their previous content back
    (or are removed when they did not exist); bytes already sent to a FIFO or device cannot
    be taken back, so the exception then carries their names in ``streamed``. An exception
    that arrives after everything was written carries ``outputs_written = True``. Outputs in
    `OPTIONAL` that cannot be written are skipped instead.

    Returns:
        the kinds that were skipped.
    Raises:
        NbfuncInputError: for an OSError or an unwritable path; any other exception is
            re-raised after the cleanup.
    """
    skipped, temps, placed, streamed = [], [], [], []
    backups: dict[str, str | None] = {}
    current = ""
    try:
        targets = {}
        for kind, name in files.items():
            current = name
            try:
                targets[kind] = atomic.target_of(name)
            except NbfuncInputError as err:
                _optional(kind, err, skipped)
        staged = []
        for kind, target in targets.items():
            current = target.path
            if target.kind != "stream":
                try:
                    staged.append((kind, target, atomic.stage(target, payload[kind], temps)))
                except OSError as err:
                    _optional(kind, err, skipped)
        with atomic.signals_deferred():
            for kind, target, tmp in staged:
                current = target.path
                if target.real not in backups:
                    backups[target.real] = atomic.keep_copy(target, temps)
                try:
                    os.replace(tmp, target.real)
                except OSError as err:
                    _optional(kind, err, skipped)
                    continue
                placed.append(target.real)
        for kind, target in targets.items():
            current = target.path
            if target.kind == "stream":
                try:
                    atomic.write_in_place(target, payload[kind], streamed)
                except OSError as err:
                    _optional(kind, err, skipped)
    except BaseException as err:
        with atomic.signals_deferred():
            _roll_back(placed, backups)
            for tmp in temps:
                atomic.remove(tmp)
        err.streamed = list(dict.fromkeys(streamed))
        if isinstance(err, OSError):
            reason = err.strerror or str(err)
            done = ("no output was written" if not streamed else "no file output was changed, "
                    f"but {', '.join(err.streamed)} got part of its data")
            raise NbfuncInputError(f"cannot write {current}: {reason}; {done}") from err
        raise
    try:
        with atomic.signals_deferred():
            for tmp in temps:
                atomic.remove(tmp)
    except BaseException as err:
        err.outputs_written = True
        raise
    return skipped


# --------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------
def print_summary(params, info) -> None:
    """Short geometry summary: convention, pivot, beam centre, sources, domains, steps."""
    h, p = info.header, params
    print(f"{h.convention} convention, pivot {h.pivot}; "
          f"beam centre Fbeam={h.fbeam_mm:g} Sbeam={h.sbeam_mm:g} mm, "
          f"distance={h.distance_mm:g} mm, close_distance={h.close_distance_mm:g} mm")
    print(f"  {p.detector.fpixels}x{p.detector.spixels} pixels of {h.pixel_size_mm:g} mm; "
          f"{p.beam.sources.n_sources} sources, {p.crystal.mosaic_domains} mosaic domains, "
          f"{p.crystal.phisteps} phi steps, {p.sampling.oversample}x{p.sampling.oversample} "
          f"sub-pixels, {p.detector.thicksteps} sensor layers")
    for line in info.notes:
        print(f"  {line}")
    info.notes.clear()
