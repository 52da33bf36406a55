"""SMV (ADSC) images: reading headers and pixels, and writing the C program's int/noise files.

An SMV file is a text header ``{ KEY=VALUE; ... }`` padded to ``HEADER_BYTES`` bytes,
followed by SIZE1 * SIZE2 unsigned 16-bit pixels, fast index (SIZE1) varying fastest.
The C program writes a 512-byte header with a fixed key list, numbers printed with ``%g``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from nbfunc.io.atomic import atomic_write_bytes
from nbfunc.io.errors import file_error, open_input, read_up_to
from nbfunc.io.matrix import c_atof

HEADER_BYTES = 512


@dataclass(frozen=True)
class SMVImage:
    """An SMV file's contents.

    Attributes:
        header: key -> value text, in file order (a repeated key keeps its last value).
        data: uint16 (SIZE2, SIZE1) = (slow, fast) pixels, native byte order.
        header_text: the raw header (HEADER_BYTES characters, latin-1).
    """

    header: dict
    data: np.ndarray
    header_text: str


def header_value(header: str | Mapping, key: str) -> float | None:
    """Numeric value of ``key`` as the C program's ``ValueOf`` reads it.

    C finds the *last* occurrence of ``key`` anywhere in the header text (so ``DISTANCE``
    matches the later ``CLOSE_DISTANCE=`` of a nanoBragg header, and ``ORGX`` matches
    ``XDS_ORGX=``), then converts the text after the next ``=`` with ``atof``.

    Args:
        header: raw header text, or a header dict (read as ``KEY=VALUE;`` lines in order).
        key: keyword to look for.

    Returns:
        the value; None when ``key`` does not occur (C's NaN); 0.0 when no ``=`` follows it
        or the text after it is not a number (as ``atof``).
    """
    if not isinstance(header, str):
        header = "".join(f"{k}={v};\n" for k, v in header.items())
    if not key:
        return None
    at, nxt = -1, header.find(key)
    while nxt >= 0:  # the last non-overlapping occurrence, scanning forward as C does
        at, nxt = nxt, header.find(key, nxt + len(key))
    if at < 0:
        return None
    eq = header.find("=", at + len(key))
    if eq < 0:
        return 0.0
    return c_atof(header, eq + 1)[0]


def _parse_header(text: str) -> dict:
    """Key -> value text of the ``{ ... }`` block (entries end with ``;`` or a newline)."""
    body = text[1 : text.find("}")] if "}" in text else text[1:]
    out: dict = {}
    for line in body.split("\n"):
        for entry in line.split(";"):
            if "=" in entry:
                key, value = entry.split("=", 1)
                out[key.strip()] = value.strip()
    return out


def _positive_int(path, header_text: str, key: str, fallback: str | None = None) -> int:
    """A positive integer header value (C: ``(int) ValueOf(key)``), or else ``fallback``'s."""
    given = value = header_value(header_text, key)
    if (value is None or (math.isfinite(value) and int(value) == 0)) and fallback is not None:
        value = header_value(header_text, fallback)
    if value is None or not math.isfinite(value) or int(value) <= 0:
        raise file_error(
            path, f"header {key} is {given}, expected a positive pixel count "
            f"(SIZE1 = fast pixels, SIZE2 = slow pixels)",
        )
    return int(value)


def read_smv(path: str | os.PathLike) -> SMVImage:
    """Read an SMV image (unsigned 16-bit, little- or big-endian as BYTE_ORDER says).

    Returns:
        SMVImage with data of shape (SIZE2, SIZE1) = (slow, fast).

    Raises:
        NbfuncInputError: missing file, no ``{`` header with HEADER_BYTES, a TYPE other than
            unsigned_short, unknown BYTE_ORDER, bad SIZE1/SIZE2, or fewer data bytes than
            SIZE1 * SIZE2 pixels.
    """
    raw = _read_bounded(path)
    first = raw[:HEADER_BYTES].decode("latin-1")
    size = header_value(first, "HEADER_BYTES") if first.startswith("{") else None
    if size is None or not math.isfinite(size) or not 0 < int(size) <= len(raw):
        raise file_error(
            path, f"starts with {raw[:16]!r}, expected an SMV header '{{\\nHEADER_BYTES=...;' "
            f"of at most the file size ({len(raw)} bytes)",
        )
    text = raw[: int(size)].decode("latin-1")
    header = _parse_header(text)
    kind = header.get("TYPE", "unsigned_short")
    if kind != "unsigned_short":
        raise file_error(path, f"TYPE={kind}, expected unsigned_short (16-bit pixels)")
    order = header.get("BYTE_ORDER", "little_endian")
    if order not in ("little_endian", "big_endian"):
        raise file_error(path, f"BYTE_ORDER={order}, expected little_endian or big_endian")
    fast = _positive_int(path, text, "SIZE1", "DETECTOR_DIMENSIONS")
    slow = _positive_int(path, text, "SIZE2", "DETECTOR_DIMENSIONS")
    need = 2 * fast * slow
    if len(raw) - int(size) < need:
        raise file_error(
            path, f"found {len(raw) - int(size)} data bytes after the {int(size)}-byte header, "
            f"expected {need} for SIZE1={fast} x SIZE2={slow} 16-bit pixels; the file is truncated",
        )
    dtype = "<u2" if order == "little_endian" else ">u2"
    start = int(size)
    data = np.frombuffer(raw[start : start + need], dtype=dtype).reshape(slow, fast)
    return SMVImage(header, data.astype(np.uint16), text)


MAX_HEADER_BYTES = 1 << 20
"""Largest SMV header read: real headers hold 512 bytes to a few KiB."""
MAX_PIXELS = 2**31 - 1
"""Most pixels an image may declare (the C program counts pixels in a C int)."""


def _read_bounded(path: str | os.PathLike) -> bytes:
    """The header and the pixel bytes its SIZE1 and SIZE2 announce, and nothing more: a
    device, FIFO or oversized file (``-img /dev/zero``) is read no further than a real image
    would be. Malformed headers come back as read, for `read_smv`'s checks and messages."""
    what, hint = "SMV image", "check the path"
    fd = open_input(path, what, hint)
    try:
        raw = read_up_to(fd, path, what, hint, HEADER_BYTES)
        first = raw.decode("latin-1")
        size = header_value(first, "HEADER_BYTES") if first.startswith("{") else None
        if size is None or not math.isfinite(size) or not 0 < size <= MAX_HEADER_BYTES:
            return raw
        raw += read_up_to(fd, path, what, hint, max(int(size) - len(raw), 0))
        text = raw[: int(size)].decode("latin-1")
        pixels = [header_value(text, key) or header_value(text, "DETECTOR_DIMENSIONS")
                  for key in ("SIZE1", "SIZE2")]
        if not all(v is not None and math.isfinite(v) and v >= 1 for v in pixels):
            return raw
        if int(pixels[0]) * int(pixels[1]) > MAX_PIXELS:
            raise file_error(path, f"header declares {int(pixels[0])} x {int(pixels[1])} pixels, "
                             f"more than {MAX_PIXELS}; {hint}")
        return raw + read_up_to(fd, path, what, hint, int(size) + 2 * int(pixels[0]) * int(pixels[1])
                                - len(raw))
    finally:
        os.close(fd)


@dataclass(frozen=True)
class SMVHeaderFields:
    """The numbers of the C program's SMV header, already in header units.

    Lengths in mm, wavelength in Angstrom, angles in degrees, XDS origin in pixels.
    ``dials_origin_mm`` is (x, y, z).
    """

    fpixels: int
    spixels: int
    pixel_size_mm: float
    distance_mm: float
    wavelength_A: float
    beam_center_x_mm: float
    beam_center_y_mm: float
    adxv_center_x_mm: float
    adxv_center_y_mm: float
    mosflm_center_x_mm: float
    mosflm_center_y_mm: float
    denzo_x_beam_mm: float
    denzo_y_beam_mm: float
    dials_origin_mm: tuple
    xds_orgx: float
    xds_orgy: float
    close_distance_mm: float
    phi_deg: float
    osc_start_deg: float
    osc_range_deg: float
    twotheta_deg: float


def smv_fields_mm(
    *, fpixels: int, spixels: int, pixel_size_mm: float, distance_mm: float, wavelength_A: float,
    beam_x_mm: float, beam_y_mm: float, fbeam_mm: float, sbeam_mm: float, dials_origin_mm: tuple,
    orgx: float, orgy: float, close_distance_mm: float, phi_deg: float, osc_deg: float,
    twotheta_deg: float, detsize_s_mm: float | None = None, noise_image: bool = False,
) -> SMVHeaderFields:
    """Header numbers from geometry already in header units (mm, Angstrom, deg, pixels).

    ``beam_x_mm``, ``beam_y_mm`` are written as BEAM_CENTER_X/Y; ``fbeam_mm``, ``sbeam_mm``
    (where the direct beam meets the detector, fast and slow from the corner of pixel (0, 0))
    give the ADXV, MOSFLM and DENZO lines as the C program forms them:
    ``ADXV = (f, detsize_s - s)``, ``MOSFLM = (s - pixel/2, f - pixel/2)``,
    ``DENZO = (s -+ 0.0*pixel, f -+ 0.0*pixel)``. ``detsize_s_mm`` is the detector's height
    (default ``spixels * pixel``). ``noise_image`` selects the noise file's ``+ 0.0*pixel``
    instead of the int file's ``- 0.0*pixel`` (they differ only for a beam centre of -0.0).
    """
    zero = (0.0 if noise_image else -0.0) * pixel_size_mm
    if detsize_s_mm is None:
        detsize_s_mm = pixel_size_mm * spixels
    return SMVHeaderFields(
        fpixels=int(fpixels), spixels=int(spixels), pixel_size_mm=pixel_size_mm,
        distance_mm=distance_mm, wavelength_A=wavelength_A,
        beam_center_x_mm=beam_x_mm, beam_center_y_mm=beam_y_mm,
        adxv_center_x_mm=fbeam_mm, adxv_center_y_mm=detsize_s_mm - sbeam_mm,
        mosflm_center_x_mm=sbeam_mm - 0.5 * pixel_size_mm,
        mosflm_center_y_mm=fbeam_mm - 0.5 * pixel_size_mm,
        denzo_x_beam_mm=sbeam_mm + zero, denzo_y_beam_mm=fbeam_mm + zero,
        dials_origin_mm=tuple(float(v) for v in dials_origin_mm),
        xds_orgx=orgx, xds_orgy=orgy, close_distance_mm=close_distance_mm,
        phi_deg=phi_deg, osc_start_deg=phi_deg, osc_range_deg=osc_deg, twotheta_deg=twotheta_deg,
    )


def smv_header_text(fields: SMVHeaderFields) -> bytes:
    """The text of the C program's SMV header, ``{`` to ``}\\f``, before its padding to 512
    bytes (`smv_header`); numbers printed with C's ``%g``."""
    f = fields
    ox, oy, oz = f.dials_origin_mm
    return (
        "{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=little_endian;\nTYPE=unsigned_short;\n"
        "SIZE1=%d;\nSIZE2=%d;\nPIXEL_SIZE=%g;\nDISTANCE=%g;\n"
        % (f.fpixels, f.spixels, f.pixel_size_mm, f.distance_mm)
        + "WAVELENGTH=%g;\n" % f.wavelength_A
        + "BEAM_CENTER_X=%g;\nBEAM_CENTER_Y=%g;\n" % (f.beam_center_x_mm, f.beam_center_y_mm)
        + "ADXV_CENTER_X=%g;\nADXV_CENTER_Y=%g;\n" % (f.adxv_center_x_mm, f.adxv_center_y_mm)
        + "MOSFLM_CENTER_X=%g;\nMOSFLM_CENTER_Y=%g;\n"
        % (f.mosflm_center_x_mm, f.mosflm_center_y_mm)
        + "DENZO_X_BEAM=%g;\nDENZO_Y_BEAM=%g;\n" % (f.denzo_x_beam_mm, f.denzo_y_beam_mm)
        + "DIALS_ORIGIN=%g,%g,%g\n" % (ox, oy, oz)
        + "XDS_ORGX=%g;\nXDS_ORGY=%g;\n" % (f.xds_orgx, f.xds_orgy)
        + "CLOSE_DISTANCE=%g;\n" % f.close_distance_mm
        + "PHI=%g;\nOSC_START=%g;\nOSC_RANGE=%g;\n" % (f.phi_deg, f.osc_start_deg, f.osc_range_deg)
        + "TWOTHETA=%g;\n" % f.twotheta_deg
        + "DETECTOR_SN=000;\nBEAMLINE=fake;\n}\f"
    ).encode("ascii")


def smv_header(fields: SMVHeaderFields) -> bytes:
    """The C program's 512-byte SMV header for ``-intfile`` / ``-noisefile`` (little-endian).

    Raises:
        ValueError: the text does not fit in 512 bytes.
    """
    text = smv_header_text(fields)
    if len(text) > HEADER_BYTES:
        raise ValueError(
            f"SMV header text is {len(text)} bytes, expected at most {HEADER_BYTES}; "
            "check the header numbers for absurd values"
        )
    return text + b" " * (HEADER_BYTES - len(text))


def write_smv(path: str | os.PathLike, fields: SMVHeaderFields, data: np.ndarray) -> None:
    """Write an SMV file (C program header, little-endian uint16 pixels), atomically.

    Args:
        data: uint16 (spixels, fpixels) matching ``fields``.
    """
    data = np.asarray(data)
    if data.shape != (fields.spixels, fields.fpixels) or data.dtype != np.uint16:
        raise file_error(
            path, f"pixels are {data.dtype} {data.shape}, expected uint16 "
            f"({fields.spixels}, {fields.fpixels}) = (spixels, fpixels); convert with int_image",
        )
    atomic_write_bytes(path, smv_header(fields) + data.astype("<u2").tobytes())


def auto_int_scale(max_I: float) -> float:
    """The C program's automatic ``-scale``: 55000 / max_I, or 1 when max_I <= 0."""
    return 55000.0 / max_I if max_I > 0.0 else 1.0


def c_unsigned_cast(values: np.ndarray, bits: int) -> np.ndarray:
    """C's float -> unsigned conversion on x86-64 (truncate, keep the low bits; NaN -> 0)."""
    ok = np.isfinite(values) & (np.abs(values) < 2.0**31)
    whole = np.trunc(np.where(ok, values, 0.0)).astype(np.int64)
    return whole & ((1 << bits) - 1)


def roi_mask(shape: tuple, roi: tuple) -> np.ndarray:
    """Boolean (slow, fast) mask of the inclusive ROI (xmin, xmax, ymin, ymax), x fast."""
    xmin, xmax, ymin, ymax = roi
    fast = np.arange(shape[1])
    slow = np.arange(shape[0])[:, None]
    return (fast >= xmin) & (fast <= xmax) & (slow >= ymin) & (slow <= ymax)


def int_pixels(float_pixels: np.ndarray, scale: float, adc_offset: float) -> np.ndarray:
    """The C program's ``-intfile`` value of each pixel (pixels inside the ROI).

    ``test = float32 pixel * scale + adc_offset`` (double), clamped to [0, 65535], then
    ``floorf(test + 0.5)`` (the sum is rounded to float32 before the floor).

    Args:
        float_pixels: photons per pixel, any shape (read as float32).
        scale: counts per photon. adc_offset: counts added to every pixel.

    Returns:
        uint16 counts of the same shape.

    Example:
        >>> int_pixels(np.array([0.0, 2.0, 1e9]), 10.0, 40.0).tolist()
        [40, 60, 65535]
    """
    img = np.asarray(float_pixels, dtype=np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # inf pixels give NaN here, as in C
        test = img.astype(np.float64) * float(scale) + float(adc_offset)
        test = np.where(test > 65535.0, 65535.0, test)
        test = np.where(test < 0.0, 0.0, test)
        rounded = np.floor((test + 0.5).astype(np.float32)).astype(np.float64)
    return c_unsigned_cast(rounded, 16).astype(np.uint16)


def int_image(float_image: np.ndarray, scale: float, adc_offset: float, roi: tuple) -> np.ndarray:
    """The C program's ``-intfile`` pixels of a whole (slow, fast) image: `int_pixels` inside
    the inclusive ROI (xmin, xmax, ymin, ymax), 0 outside it.

    Args:
        float_image: (slow, fast) photons per pixel (read as float32).

    Returns:
        uint16 (slow, fast).
    """
    img = np.asarray(float_image, dtype=np.float32)
    return np.where(roi_mask(img.shape, roi), int_pixels(img, scale, adc_offset), np.uint16(0))
