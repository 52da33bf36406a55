"""miniCBF images (Pilatus style): integer counts with the geometry of a parameter tree.

A miniCBF file is a CIF text block whose ``_array_data.header_contents`` holds the Pilatus
header lines (``# Wavelength 1 A``, ``# Beam_xy (512.5, 480.25) pixels``, ...), followed by one
binary section: signed 32-bit pixels, fast index varying fastest, packed with CBF's
``x-CBF_BYTE_OFFSET`` compression. dxtbx (DIALS) reads such a file with ``FormatCBFMini``
(header convention ``GENERIC_MINI``, any size) or ``FormatCBFMiniPilatus`` (``PILATUS_1.2``,
written only for real Pilatus sizes, see `header_convention`); fabio reads both. Numbers are
written with 15 significant digits.

The frame dxtbx builds from the header (its lab frame: beam along -z, fast along +x, slow along
-y, rotation axis +x) is nanoBragg's MOSFLM frame rotated by ``(x, y, z) -> (z, y, -x)``:

* ``Detector_distance`` (m) is the perpendicular distance from the sample to the pixel plane;
* ``Beam_xy`` is the direct-beam spot in pixels, (fast, slow), measured from the outer corner of
  pixel (0, 0): the centre of the first pixel is (0.5, 0.5);
* ``Pixel_size`` (m), ``Wavelength`` (Angstrom), ``Start_angle`` and ``Angle_increment`` (deg,
  the spindle angle of the first phi step and the whole oscillation of the image).

The header cannot express a detector that does not face the beam, a pixel grid that is the
mirror image of dxtbx's (fast x slow against the beam, as in the ADXV convention), a curved
detector, or a rotation axis other than the fast axis: dxtbx would read such a file with a
silently wrong geometry, so `cbf_bytes` refuses those trees and names the value to change.
NXmx files record any geometry.

Pixels are counts (int32). An integer image is written as it is; a floating image (photons)
is rounded to the nearest count, halves up: ``floor(x + 0.5)`` in float64, the rule of the
C program's SMV ``-intfile`` without its float32 step and its clipping to 0..65535.
dxtbx trusts counts from 0 (Pilatus marks gaps and bad pixels with -1 and -2) up to
``Count_cutoff``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from nbfunc.detector import detector_frame
from nbfunc.io.atomic import atomic_write_bytes
from nbfunc.params import PARALLEL_SINE
from nbfunc.units import HC_EV_ANGSTROM, MM

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
COUNT_CUTOFF = INT32_MAX
"""Default ``Count_cutoff`` (counts): the largest int32, so no simulated pixel is an overload."""
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
"""Default header timestamp: fixed, so equal inputs give equal files."""
DETECTOR_NAME = "nbfunc simulated photon-counting detector, S/N 0"
"""The ``# Detector:`` line. It names no vendor, so no beamline-specific dxtbx class claims
the file (those match PILATUS, EIGER, ADSC or TIMEPIX with serial numbers)."""
PILATUS_MODULE = (487, 195, 7, 17)
"""Pilatus module width and height and the gaps between modules (pixels), fast then slow."""
PADDING = 4095
"""Zero bytes after the compressed pixels, as Pilatus detectors write them (readers that
decode a few bytes ahead never run past the file)."""
STARTER = b"\x0c\x1a\x04\xd5"
"""The four bytes that open a CBF binary section."""
EOL = "\r\n"


@dataclass(frozen=True)
class CBFHeaderFields:
    """The numbers of a miniCBF header, in header units.

    Attributes:
        fpixels, spixels: pixels along the fast and slow axes.
        pixel_size_m: pixel edge (m).
        distance_m: sample to pixel plane along the beam (m).
        beam_x_px, beam_y_px: direct-beam spot (pixels) along fast and slow from the outer
            corner of pixel (0, 0).
        wavelength_A: central wavelength (Angstrom).
        thickness_m: sensor thickness (m).
        start_angle_deg: spindle angle of the first phi step (deg).
        angle_increment_deg: oscillation of the image, phi_step * phisteps (deg).
        exposure_time_s: exposure time and exposure period (s).
        count_cutoff: largest trusted count (counts).
        threshold_eV: counting threshold, half the photon energy (eV).
        timestamp: start of the exposure.
    """

    fpixels: int
    spixels: int
    pixel_size_m: float
    distance_m: float
    beam_x_px: float
    beam_y_px: float
    wavelength_A: float
    thickness_m: float
    start_angle_deg: float
    angle_increment_deg: float
    exposure_time_s: float
    count_cutoff: int
    threshold_eV: int
    timestamp: datetime.datetime


def _value(tensor, name: str) -> float:
    """One number from a tree leaf; an ensemble (batched) leaf is refused."""
    t = torch.as_tensor(tensor)
    if t.numel() != 1:
        raise ValueError(f"params.{name} has shape {tuple(t.shape)}, expected one value; a "
                         "miniCBF holds one image: write one file per tree of the ensemble")
    return float(t.reshape(()))


def _vec(v) -> np.ndarray:
    return np.asarray(torch.as_tensor(v).detach().cpu(), dtype=np.float64).reshape(3)


def _sine(u: np.ndarray, v: np.ndarray) -> float:
    """Sine of the angle between two vectors (dimensionless)."""
    return float(np.linalg.norm(np.cross(u, v)) / (np.linalg.norm(u) * np.linalg.norm(v)))


def _angle_deg(u: np.ndarray, v: np.ndarray) -> float:
    cos = float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def _shown(v) -> str:
    return "(" + ", ".join(f"{float(x):.6g}" for x in v) + ")"


_HEADER_LEAVES = {
    "detector": ("distance", "beam_center_f", "beam_center_s", "rotx", "roty", "rotz",
                 "twotheta", "pixel_size", "thickness"),
    "beam": ("wavelength",), "crystal": ("phi_start", "phi_step"),
}
"""The leaves a miniCBF header is made from: one value each (no ensemble axis)."""


def check_geometry(params) -> None:
    """Refuse a tree whose geometry a miniCBF header cannot carry (one-line ValueError).

    Accepted: one image's tree (no ensemble axis on the `_HEADER_LEAVES`); a flat detector
    whose pixel rows are perpendicular and whose plane faces the beam (normal and ``odet``
    within a sine of `nbfunc.params.PARALLEL_SINE` of the beam) with fast x slow along the
    beam; and for an image that oscillates (phi_step * phisteps != 0) a spindle axis along
    +fast, the rotation axis dxtbx assumes. A detector spun about the beam is accepted: only
    the spindle is tied to the pixel axes.
    """
    det, cry = params.detector, params.crystal
    for group, names in _HEADER_LEAVES.items():
        for name in names:
            _value(getattr(getattr(params, group), name), f"{group}.{name}")
    if det.curved:
        raise ValueError("params.detector.curved = True, but a miniCBF header describes a flat "
                         "detector; render with curved=False or write NXmx (-nxsfile)")
    frame = detector_frame(det, params.beam.beam_vector)
    fdet, sdet, odet, beam = (_vec(v) for v in (frame.fdet, frame.sdet, frame.odet, frame.beam))
    if abs(float(np.dot(fdet, sdet))) >= PARALLEL_SINE:
        raise ValueError(f"params.detector: the fast and slow axes {_shown(fdet)}, {_shown(sdet)} "
                         f"are {_angle_deg(fdet, sdet):.6g} deg apart, but a miniCBF has square "
                         "pixel rows (90 deg); give perpendicular fdet_vector and sdet_vector")
    normal = np.cross(fdet, sdet)
    tilt = max(_angle_deg(normal, beam), _angle_deg(odet, beam))
    if _sine(normal, beam) >= PARALLEL_SINE or _sine(odet, beam) >= PARALLEL_SINE or tilt > 90:
        angles = ", ".join(f"{_value(getattr(det, n), 'detector.' + n):.6g}"
                           for n in ("rotx", "roty", "rotz", "twotheta"))
        if _sine(normal, beam) < PARALLEL_SINE and float(np.dot(odet, beam)) > 0:
            raise ValueError(f"params.detector: fast x slow = {_shown(normal)} points against the "
                             f"beam {_shown(beam)} (fdet_vector {_shown(fdet)}, sdet_vector "
                             f"{_shown(sdet)}, as in the ADXV convention), the mirror image of "
                             "the miniCBF frame; use the MOSFLM or XDS convention, or NXmx")
        raise ValueError(f"params.detector: the detector is turned {tilt:.6g} deg from the beam "
                         f"(rotx, roty, rotz, twotheta = {angles} deg), but a miniCBF header "
                         "describes a detector facing the beam; set them to 0 or write NXmx")
    osc = _value(cry.phi_step, "crystal.phi_step") * cry.phisteps
    spindle = np.asarray(cry.spindle_axis, dtype=np.float64)
    if osc != 0.0 and (_sine(spindle, fdet) >= PARALLEL_SINE or float(np.dot(spindle, fdet)) < 0):
        raise ValueError(f"params.crystal.spindle_axis = {_shown(spindle)} is not the fast axis "
                         f"{_shown(fdet)}, the rotation axis miniCBF readers assume for this "
                         f"{osc:.6g} deg oscillation; use the MOSFLM or XDS convention, a still "
                         "(osc 0), or NXmx")


def _positive(value, name: str, unit: str) -> float:
    x = float(value)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} = {value!r} {unit}, expected a finite number > 0 {unit}")
    return x


def _count_cutoff(count_cutoff) -> int:
    if count_cutoff is None:
        return COUNT_CUTOFF
    if isinstance(count_cutoff, bool) or not float(count_cutoff).is_integer() \
            or not 1 <= count_cutoff <= INT32_MAX:
        raise ValueError(f"count_cutoff = {count_cutoff!r}, expected a whole number of counts "
                         f"from 1 to {INT32_MAX} (None: {COUNT_CUTOFF})")
    return int(count_cutoff)


def cbf_fields_from_params(params, *, exposure_time_s: float = 1.0, count_cutoff: int | None = None,
                           timestamp: datetime.datetime = EPOCH) -> CBFHeaderFields:
    """The miniCBF header numbers of a tree (after `check_geometry`).

    With the placed detector (pix0 the outer corner of pixel (0, 0), unit axes f, s and
    n = f x s along the beam b): distance ``D = pix0 . n``, spot ``D b``, Beam_xy
    ``((D b - pix0) . f, (D b - pix0) . s) / pixel``.

    Args:
        params: `nbfunc.Params` of one image (no ensemble dimension).
        exposure_time_s: exposure time (s), > 0.
        count_cutoff: largest trusted count, 1..2^31-1; None gives `COUNT_CUTOFF`.
        timestamp: start of the exposure, written to the millisecond.

    Raises:
        ValueError: a geometry the header cannot express, a detector behind the sample, or
            a bad exposure time or count cutoff (one line naming the value).
    """
    check_geometry(params)
    exposure = _positive(exposure_time_s, "exposure_time_s", "s")
    cutoff = _count_cutoff(count_cutoff)
    det, cry = params.detector, params.crystal
    frame = detector_frame(det, params.beam.beam_vector)
    fdet, sdet, pix0, beam = (_vec(v) for v in (frame.fdet, frame.sdet, frame.pix0, frame.beam))
    normal = np.cross(fdet, sdet)
    distance = float(np.dot(pix0, normal))
    if not distance > 0:
        raise ValueError(f"params.detector: the pixel plane is {distance:.6g} m along the beam, "
                         "behind the sample; give a detector downstream (distance > 0)")
    pixel = _value(det.pixel_size, "detector.pixel_size") * MM
    spot = distance * beam - pix0
    wavelength = _value(params.beam.wavelength, "beam.wavelength")
    return CBFHeaderFields(
        fpixels=int(det.fpixels), spixels=int(det.spixels), pixel_size_m=pixel,
        distance_m=distance, beam_x_px=float(np.dot(spot, fdet)) / pixel,
        beam_y_px=float(np.dot(spot, sdet)) / pixel, wavelength_A=wavelength,
        thickness_m=_value(det.thickness, "detector.thickness") * MM,
        start_angle_deg=_value(cry.phi_start, "crystal.phi_start"),
        angle_increment_deg=_value(cry.phi_step, "crystal.phi_step") * cry.phisteps,
        exposure_time_s=exposure, count_cutoff=cutoff,
        threshold_eV=int(round(HC_EV_ANGSTROM / wavelength / 2)), timestamp=timestamp)


def header_convention(fpixels: int, spixels: int) -> str:
    """``PILATUS_1.2`` for the pixel counts of a real Pilatus (n x 487 + (n-1) x 7 by
    m x 195 + (m-1) x 17), ``GENERIC_MINI`` otherwise.

    dxtbx reads PILATUS_1.2 with ``FormatCBFMiniPilatus``, which masks the gaps between
    modules and fails on other sizes; GENERIC_MINI (dxtbx's convention for simulated
    detectors) is read by ``FormatCBFMini`` from the same header lines, without the mask.

    >>> header_convention(2463, 2527), header_convention(16, 16)
    ('PILATUS_1.2', 'GENERIC_MINI')
    """
    module_f, module_s, gap_f, gap_s = PILATUS_MODULE
    n_f, rest_f = divmod(fpixels + gap_f, module_f + gap_f)
    n_s, rest_s = divmod(spixels + gap_s, module_s + gap_s)
    return "PILATUS_1.2" if n_f >= 1 and n_s >= 1 and rest_f == rest_s == 0 else "GENERIC_MINI"


def _g(x: float) -> str:
    """A header number: 15 significant digits, every value's precision (a decimal typed by
    the user, such as 0.1234 m, comes back as typed)."""
    return format(x, ".15g")


def pilatus_header_lines(fields: CBFHeaderFields) -> list[str]:
    """The ``# ...`` lines of ``_array_data.header_contents``, without line ends.

    Exposure_period equals Exposure_time and Tau (dead time) is 0: a simulated detector
    reads out instantly. N_excluded_pixels is 0. The oscillation is written both as
    Start_angle/Angle_increment (what dxtbx reads) and Phi/Phi_increment, about axis X.
    """
    f = fields
    ts = f.timestamp
    return [
        f"# Detector: {DETECTOR_NAME}",
        f"# {ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond // 1000:03d}",
        f"# Pixel_size {_g(f.pixel_size_m)} m x {_g(f.pixel_size_m)} m",
        f"# Silicon sensor, thickness {_g(f.thickness_m)} m",
        f"# Exposure_time {_g(f.exposure_time_s)} s",
        f"# Exposure_period {_g(f.exposure_time_s)} s",
        "# Tau = 0 s",
        f"# Count_cutoff {f.count_cutoff} counts",
        f"# Threshold_setting: {f.threshold_eV} eV",
        "# N_excluded_pixels = 0",
        f"# Wavelength {_g(f.wavelength_A)} A",
        f"# Detector_distance {_g(f.distance_m)} m",
        f"# Beam_xy ({_g(f.beam_x_px)}, {_g(f.beam_y_px)}) pixels",
        f"# Start_angle {_g(f.start_angle_deg)} deg.",
        f"# Angle_increment {_g(f.angle_increment_deg)} deg.",
        "# Detector_2theta 0 deg.",
        f"# Phi {_g(f.start_angle_deg)} deg.",
        f"# Phi_increment {_g(f.angle_increment_deg)} deg.",
        "# Oscillation_axis X",
        "# N_oscillations 1",
    ]


def count_image(image) -> np.ndarray:
    """Pixels as int32 counts, (slow, fast) kept.

    An integer array is taken as counts; a floating one (photons) is rounded with
    ``floor(x + 0.5)`` in float64.

    Args:
        image: numpy array or torch tensor, integer or floating.

    Raises:
        ValueError: a non-numeric or boolean image, a non-finite pixel, or a count outside
            int32 (-2^31..2^31-1), naming the first such pixel.

    >>> count_image(np.array([[0.49, 0.5, -0.5, 2.5]])).tolist()
    [[0, 1, 0, 3]]
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    data = np.asarray(image)
    if data.dtype == bool or not (np.issubdtype(data.dtype, np.integer)
                                  or np.issubdtype(data.dtype, np.floating)):
        raise ValueError(f"image is {data.dtype}, expected integer counts or floating photons")
    if np.issubdtype(data.dtype, np.floating):
        values = data.astype(np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"image{list(at)} = {values[at]}, expected a finite photon count; "
                             "mask or replace non-finite pixels before writing")
        values = np.floor(values + 0.5)
    else:
        values = data
    out = (values < INT32_MIN) | (values > INT32_MAX)
    if out.any():
        at = tuple(int(i) for i in np.argwhere(out)[0])
        raise ValueError(f"image{list(at)} = {data[at]} counts, beyond a signed 32-bit CBF pixel "
                         f"({INT32_MIN}..{INT32_MAX}); scale the image down")
    return values.astype(np.int32)


def byte_offset(counts: np.ndarray) -> bytes:
    """CBF ``x-CBF_BYTE_OFFSET`` compression of int32 pixels, in file order.

    Each pixel is stored as its difference d from the previous one (the first from 0), taken
    modulo 2^32 into -2^31..2^31-1 as 32-bit readers (dxtbx, CBFlib, fabio) add it back: one
    signed byte when |d| <= 127; else the byte 0x80 and a little-endian int16 when
    |d| <= 32767; else also 0x8000 and an int32. The one difference this cannot hold,
    d = -2^31 (the int32 escape), is written after 0x80000000 as the exact int64 difference
    (+-2^31), as the format defines; it needs neighbours 2^31 counts apart.

    Args:
        counts: int32 pixels (any shape, read in C order).

    Returns:
        the packed bytes.

    >>> byte_offset(np.array([1, 201, -32000, 2**31 - 1], dtype=np.int32)).hex(" ")
    '01 80 c8 00 80 37 82 80 00 80 ff 7c 00 80'
    """
    values = np.asarray(counts).astype(np.int64).ravel()
    step = np.diff(values, prepend=np.int64(0))
    delta = (step + 2**31) % 2**32 - 2**31
    size = np.abs(delta)
    length = 1 + 2 * (size > 127) + 4 * (size > 32767) + 8 * (delta == INT32_MIN)
    delta = np.where(delta == INT32_MIN, step, delta)
    start = np.cumsum(length) - length
    out = np.zeros(int(length.sum()), dtype=np.uint8)
    little = delta.astype("<i8").view(np.uint8).reshape(-1, 8)
    one = length == 1
    out[start[one]] = little[one, 0]
    out[start[~one]] = 0x80
    for width, offset, escape in ((2, 1, 3), (4, 3, 7), (8, 7, 15)):
        fits = length == escape  # the last field of this entry holds the difference
        longer = length > escape  # this field holds the escape to a wider one
        for k in range(width):
            out[start[fits] + offset + k] = little[fits, k]
        if width < 8:
            out[start[longer] + offset + width - 1] = 0x80
    return out.tobytes()


def _binary_section(counts: np.ndarray) -> bytes:
    """The MIME-like binary section: headers, starter, packed pixels, padding, end marker."""
    packed = byte_offset(counts)
    md5 = base64.b64encode(hashlib.md5(packed).digest()).decode("ascii")
    spixels, fpixels = counts.shape
    head = EOL.join([
        "--CIF-BINARY-FORMAT-SECTION--",
        "Content-Type: application/octet-stream;",
        '     conversions="x-CBF_BYTE_OFFSET"',
        "Content-Transfer-Encoding: BINARY",
        f"X-Binary-Size: {len(packed)}",
        "X-Binary-ID: 1",
        'X-Binary-Element-Type: "signed 32-bit integer"',
        "X-Binary-Element-Byte-Order: LITTLE_ENDIAN",
        f"Content-MD5: {md5}",
        f"X-Binary-Number-of-Elements: {counts.size}",
        f"X-Binary-Size-Fastest-Dimension: {fpixels}",
        f"X-Binary-Size-Second-Dimension: {spixels}",
        f"X-Binary-Size-Padding: {PADDING}",
        "", "",
    ]).encode("ascii")
    tail = (EOL + "--CIF-BINARY-FORMAT-SECTION----" + EOL + ";" + EOL + EOL).encode("ascii")
    return head + STARTER + packed + bytes(PADDING) + tail


def cbf_file_bytes(fields: CBFHeaderFields, counts: np.ndarray) -> bytes:
    """A whole miniCBF file from header numbers and int32 (spixels, fpixels) counts."""
    lines = [
        "###CBF: VERSION 1.5, nbfunc miniCBF writer", "", "data_nbfunc_image", "",
        f'_array_data.header_convention "{header_convention(fields.fpixels, fields.spixels)}"',
        "_array_data.header_contents", ";", *pilatus_header_lines(fields), ";", "",
        "_array_data.data", ";", "",
    ]
    return EOL.join(lines).encode("ascii") + _binary_section(counts)


def cbf_bytes(image, params, *, exposure_time_s: float = 1.0, count_cutoff: int | None = None,
              timestamp: datetime.datetime = EPOCH) -> bytes:
    """A miniCBF file of one (slow, fast) image with the geometry of ``params``.

    Args:
        image: (spixels, fpixels) counts (integer) or photons (floating, rounded halves up),
            numpy array or torch tensor.
        params: `nbfunc.Params` of the image: a flat detector facing the beam (see
            `check_geometry`).
        exposure_time_s: Exposure_time and Exposure_period (s).
        count_cutoff: Count_cutoff, the largest trusted count; None gives 2^31-1.
        timestamp: the header's date and time (default `EPOCH`, for reproducible files).

    Returns:
        the file's bytes (CRLF text header, byte_offset-packed int32 pixels).

    Raises:
        ValueError: one line naming the tree value, the pixel or the argument to change.
    """
    fields = cbf_fields_from_params(params, exposure_time_s=exposure_time_s,
                                    count_cutoff=count_cutoff, timestamp=timestamp)
    counts = count_image(image)
    if counts.shape != (fields.spixels, fields.fpixels):
        raise ValueError(f"image has shape {counts.shape}, expected (spixels, fpixels) = "
                         f"({fields.spixels}, {fields.fpixels}) from params.detector")
    return cbf_file_bytes(fields, counts)


def write_cbf(path: str | os.PathLike, image, params, *, exposure_time_s: float = 1.0,
              count_cutoff: int | None = None, timestamp: datetime.datetime = EPOCH) -> None:
    """Write `cbf_bytes` to ``path`` (all or nothing, as `nbfunc.io.atomic.atomic_write_bytes`).

    Raises:
        ValueError: as `cbf_bytes`, before anything is written.
        NbfuncInputError: the path cannot be written.
    """
    data = cbf_bytes(image, params, exposure_time_s=exposure_time_s, count_cutoff=count_cutoff,
                     timestamp=timestamp)
    atomic_write_bytes(path, data)
