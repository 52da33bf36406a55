"""NXmx (NeXus HDF5) images: photons per pixel with the geometry of the tree that made them.

NXmx is the NeXus application definition for macromolecular crystallography, the format
DIALS/dxtbx, XDS (through the Durin plugin) and most synchrotron pipelines read. One
file holds a stack of frames, the detector placed by a chain of NXtransformations, the beam's
wavelength (and spectrum), the sample's rotation axis with each frame's angle, and a pixel mask.

Frame. NeXus places everything in the McStas frame: z along the beam (from the source towards
the sample and beyond), y up, x completing a right-handed set; lengths from the sample. nbfunc
computes in nanoBragg's lab frame (beam along +x in the MOSFLM convention, along +z in the XDS,
DIALS and ADXV conventions). `lab_to_mcstas` is the one rotation between them; every vector and
position written is that matrix applied to nanoBragg's (`nbfunc.detector.detector_frame`).

What is written (``/entry``; lengths in mm but the pixel sizes in m, angles in degrees,
wavelengths in Angstrom, each with its NeXus ``units`` attribute):

* ``definition = "NXmx"``, ``start_time`` = ``end_time`` (ISO 8601, UTC);
* ``data/data``: (frame, slow, fast) float32 photons per pixel, chunked one frame per chunk;
  ``instrument/detector/data`` is a hard link to it;
* ``instrument/detector`` (NXdetector): ``depends_on`` the module offset; ``distance`` from
  the sample to where the beam meets the detector plane; ``beam_center_x/y`` (pixels from the
  outer corner of pixel (0, 0) along fast/slow); ``x/y_pixel_size`` (m, as Eiger files and
  dxtbx's generic reader have them); ``sensor_material``, ``sensor_thickness`` (the tree's
  ``detector.thickness``); ``pixel_mask`` (uint32, bit 8 "user defined" on pixels the tree
  does not render; always deflated) with ``pixel_mask_applied`` true (the render left those
  pixels at 0; dxtbx's generic reader uses a mask only when it is marked applied) and
  ``saturation_value`` when given;
* ``instrument/detector/module`` (NXdetector_module): ``data_origin``, ``data_size``,
  ``module_offset`` (translation from the sample to the outer corner of pixel (0, 0),
  ``depends_on "."``), ``fast_pixel_direction`` and ``slow_pixel_direction`` (translations of
  one pixel edge along the placed fast and slow axes): the corner of pixel (i, j) (fast i,
  slow j) is ``module_offset + i*pixel*fast + j*pixel*slow``, nanoBragg's
  ``pix0 + i*pixel*fdet + j*pixel*sdet`` in McStas coordinates. The chain holds no rotation:
  the detector's rotations and two-theta swing are already in these vectors, because dxtbx's
  reader of generic NXmx files (FormatNexus) takes the pixel directions as written, without
  turning them by the rotations of their chain;
* ``instrument/beam`` (NXbeam): ``incident_wavelength`` (the tree's central wavelength); where
  the sources have several wavelengths, the spectrum as the variant ``incident_wavelength_1``
  with ``incident_wavelength_1_weight`` (each source weighs the same, as in nanoBragg; the
  singular spelling, which both of dxtbx's readers take, rather than NeXus's newer
  ``_weights``, which only the newer one does);
* ``sample`` (NXsample): ``depends_on`` the rotation axis ``transformations/phi`` about
  nanoBragg's ``spindle_axis`` with each frame's start angle (deg), ``phi_end`` and
  ``phi_increment_set`` (the frame's ``phisteps * phi_step``);
* ``instrument/name``, ``source/name``, ``sample/name``: names saying the data are simulated.

Not written: ``total_flux`` (photons/s, required by NXmx) and ``count_time``: the tree holds the
time-integrated fluence (photons/m^2) and no exposure time, so neither can be derived; DIALS does
not read them.

One geometry per file. NXmx can describe a detector or beam that changes from frame to frame
(per-frame values on every transformation axis, a per-frame ``incident_wavelength``), but
DIALS builds one detector and one beam per file from the first values, so a stack of trees
whose detector or beam differ is refused; write one file per geometry.
"""
from __future__ import annotations

import datetime
import os
import uuid
from typing import NamedTuple

import numpy as np
import torch

from nbfunc.io.atomic import atomic_write_bytes

MOSFLM_TO_MCSTAS = np.array([[0.0, 0.0, -1.0],
                             [0.0, 1.0, 0.0],
                             [1.0, 0.0, 0.0]])
"""McStas coordinates of a vector given in nanoBragg's MOSFLM lab frame: ``v_mcstas = M v``.

The MOSFLM frame has the beam along +x and the spindle along +z; McStas has the beam along +z
and y up. M turns nanoBragg's +x (beam) to McStas +z, keeps y, and turns +z (the spindle) to
McStas -x, so nanoBragg's default detector (fast +z, slow -y) has fast (-1, 0, 0) and slow
(0, -1, 0), the axes of an Eiger in an NXmx file. det M = +1 (a rotation). It is the 180 degree
turn about y of the imgCIF frame of the ``DIALS_ORIGIN`` that nanoBragg's SMV header gives as
``(z, y, -x)``.
"""

USER_MASKED = np.uint32(1 << 8)
"""NXmx ``pixel_mask`` bit 8, "user defined mask": a pixel the tree does not render."""

COMPRESSIONS = (None, "gzip", "bslz4")
"""Accepted values of ``compression``: None (uncompressed, the default: every HDF5 reader
opens it, no filter plugin needed, and writing costs no CPU time), "gzip" (deflate level 4
with byte shuffle: built into every HDF5 library, smaller files), "bslz4" (bitshuffle + LZ4
through hdf5plugin, as Eiger detectors write: fast, needs the filter plugin to read)."""

GEOMETRY_EXEMPT = ("beam.fluence", "beam.kahn_factor")
"""Beam leaves that may differ between the trees of a stack: they do not enter the file."""


# --------------------------------------------------------------------------------------------
# coordinate frames
# --------------------------------------------------------------------------------------------
def _rotation_onto(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The smallest rotation taking unit vector ``u`` onto unit vector ``v`` (3x3).

    About ``u x v`` by the angle between them; by 180 degrees about an axis normal to ``u``
    when they are opposite.
    """
    axis, cos = np.cross(u, v), float(np.dot(u, v))
    sin = float(np.linalg.norm(axis))
    if sin < 1e-12:
        if cos > 0:
            return np.eye(3)
        pole = np.array([0.0, 1.0, 0.0]) if abs(u[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
        axis = np.cross(u, pole)
        axis /= np.linalg.norm(axis)
        return 2.0 * np.outer(axis, axis) - np.eye(3)
    k = axis / sin
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + sin * kx + (1.0 - cos) * kx @ kx


def lab_to_mcstas(beam_vector) -> np.ndarray:
    """The rotation from nanoBragg's lab frame to NeXus's McStas frame (3x3, ``v_mcstas = R v``).

    ``R = MOSFLM_TO_MCSTAS @ S``, S the smallest rotation taking the tree's beam direction onto
    +x. For the MOSFLM and DENZO conventions (beam +x) S is the identity; for XDS, DIALS and
    ADXV (beam +z) R is the identity. Either way R takes the beam onto McStas +z; being one
    rotation of the whole experiment, it keeps every angle and distance.

    Args:
        beam_vector: (3,) beam direction in the lab frame (any length).

    Example:
        >>> lab_to_mcstas((1, 0, 0)) @ np.array([0.0, 0.0, 1.0])   # MOSFLM spindle
        array([-1.,  0.,  0.])
    """
    beam = np.asarray(beam_vector, dtype=np.float64)
    beam = beam / np.linalg.norm(beam)
    return MOSFLM_TO_MCSTAS @ _rotation_onto(beam, np.array([1.0, 0.0, 0.0]))


def _numbers(t: torch.Tensor) -> np.ndarray:
    """A tensor's values as float64 numpy (detached, on the CPU)."""
    return t.detach().to("cpu", torch.float64).numpy()


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


class NXmxGeometry(NamedTuple):
    """The geometry an NXmx file holds, in McStas coordinates.

    Attributes:
        fast, slow: (3,) unit pixel axes of the placed detector.
        module_offset: (3,) outer corner of pixel (0, 0) (mm).
        pixel_size: pixel edge (mm).
        distance: sample to where the beam meets the detector plane, along the beam (mm).
        beam_center: (fast, slow) where the beam meets the detector, in pixels from the outer
            corner of pixel (0, 0) (pixel (i, j) spans [i, i+1) x [j, j+1)).
        spindle: (3,) unit rotation axis of the sample.
        sensor_thickness: (mm).
        wavelength: central wavelength (Angstrom).
        spectrum: ((m,) wavelengths in Angstrom, (m,) weights summing to 1) of the sources.
    """

    fast: np.ndarray
    slow: np.ndarray
    module_offset: np.ndarray
    pixel_size: float
    distance: float
    beam_center: tuple[float, float]
    spindle: np.ndarray
    sensor_thickness: float
    wavelength: float
    spectrum: tuple[np.ndarray, np.ndarray]


def nxmx_geometry(params) -> NXmxGeometry:
    """The file's geometry from one tree (`NXmxGeometry`, McStas frame, mm, deg, Angstrom).

    ``fast = R fdet``, ``slow = R sdet``, ``module_offset = R pix0`` with R = `lab_to_mcstas`
    and nanoBragg's placed detector (`nbfunc.detector.detector_frame`). The beam meets the
    detector plane at ``d * beam`` with ``d = (pix0 . odet) / (beam . odet)``, the distance
    written; with a two-theta swing it differs from `DetectorFrame.distance`, which, as
    nanoBragg, divides by the beam's cosine with the unswung normal.

    Args:
        params: `nbfunc.Params` with 0-d leaves (one tree).
    """
    from nbfunc.beam import sources
    from nbfunc.detector import detector_frame

    det = params.detector
    frame = detector_frame(det, params.beam.beam_vector)
    rot = lab_to_mcstas(params.beam.beam_vector)
    fdet, sdet, pix0 = _numbers(frame.fdet), _numbers(frame.sdet), _numbers(frame.pix0)
    beam, odet = _numbers(frame.beam), _numbers(frame.odet)
    pixel = float(frame.pixel_size)
    distance = float(pix0 @ odet) / float(beam @ odet)
    spot = distance * beam - pix0
    _, wavelengths = sources(params.beam)
    values, counts = np.unique(_numbers(wavelengths).reshape(-1) * 1e10, return_counts=True)
    return NXmxGeometry(
        fast=rot @ fdet, slow=rot @ sdet, module_offset=rot @ pix0 * 1e3,
        pixel_size=pixel * 1e3, distance=distance * 1e3,
        beam_center=(float(fdet @ spot) / pixel, float(sdet @ spot) / pixel),
        spindle=rot @ _unit(params.crystal.spindle_axis),
        sensor_thickness=float(det.thickness), wavelength=float(params.beam.wavelength),
        spectrum=(values, counts / counts.sum()))


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def _frames(images, shape: tuple[int, int]) -> np.ndarray:
    """(frame, slow, fast) float32 photons from one (slow, fast) image or a stack."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    data = np.asarray(images, dtype=np.float32)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3 or data.shape[1:] != shape:
        raise ValueError(f"images has shape {data.shape}; expected (slow, fast) = {shape} or "
                         f"(frames, {shape[0]}, {shape[1]}) for this tree's detector")
    return data


def _same_geometry(params) -> None:
    """Refuse a stack of trees whose detector or beam (other than `GEOMETRY_EXEMPT`) differ."""
    from nbfunc.tree import get_leaf, leaf_paths

    for path in leaf_paths(params):
        if not path.startswith(("detector.", "beam.")) or path in GEOMETRY_EXEMPT:
            continue
        leaf = get_leaf(params, path)
        differs = (leaf != leaf[:1]).reshape(leaf.shape[0], -1).any(dim=1)
        if bool(differs.any()):
            i = int(torch.nonzero(differs)[0])
            raise ValueError(f"params.{path} differs between the stacked trees (tree {i} vs "
                             "tree 0); an NXmx file holds one detector and beam for all frames: "
                             "write one file per geometry (nbfunc.unstack(params))")


def _scan(params, n_frames: int):
    """(one tree with the file's geometry, (frame,) start angles (deg), (frame,) widths (deg)).

    A single tree gives every frame its ``phi_start`` and ``phisteps * phi_step``; a stack of
    trees (`nbfunc.stack`, one per frame) gives each frame its own.
    """
    from nbfunc.tree import unstack

    rank = params.beam.wavelength.dim()
    if rank == 0:
        members = [params] * n_frames
    elif rank == 1 and params.beam.wavelength.shape[0] == n_frames:
        _same_geometry(params)
        members = unstack(params)
    else:
        raise ValueError(f"params is a stack of shape {tuple(params.beam.wavelength.shape)} but "
                         f"images has {n_frames} frame(s); give one tree, or nbfunc.stack of one "
                         "tree per frame")
    start = np.array([float(m.crystal.phi_start) for m in members])
    width = np.array([m.crystal.phisteps * float(m.crystal.phi_step) for m in members])
    return members[0], start, width


def _pixel_mask(params, mask) -> np.ndarray:
    """(slow, fast) uint32 NXmx mask: `USER_MASKED` where ``mask`` is False (default: pixels
    outside the tree's ROI and mask, which `nbfunc.simulate` leaves at 0), 0 elsewhere."""
    from nbfunc.render import rendered_pixels

    shape = (params.detector.spixels, params.detector.fpixels)
    if mask is None:
        valid = np.zeros(shape[0] * shape[1], dtype=bool)
        valid[rendered_pixels(params).numpy()] = True
        valid = valid.reshape(shape)
    else:
        if isinstance(mask, torch.Tensor):
            mask = mask.detach().cpu().numpy()
        valid = np.asarray(mask) != 0
        if valid.shape != shape:
            raise ValueError(f"mask has shape {valid.shape}; expected (slow, fast) = {shape}, "
                             "True (or non-zero) on the pixels that hold data")
    return np.where(valid, np.uint32(0), USER_MASKED).astype(np.uint32)


def _compression(compression) -> dict:
    """h5py dataset keywords for ``compression`` (one of `COMPRESSIONS`)."""
    if compression is None:
        return {}
    if compression == "gzip":
        return dict(compression="gzip", compression_opts=4, shuffle=True)
    if compression == "bslz4":
        try:
            import hdf5plugin
        except ImportError:
            raise ModuleNotFoundError("compression='bslz4' needs hdf5plugin: pip install "
                                      "hdf5plugin (or use compression='gzip')") from None
        return dict(hdf5plugin.Bitshuffle(cname="lz4"))
    raise ValueError(f"compression={compression!r} is not known; give one of "
                     f"{', '.join(repr(c) for c in COMPRESSIONS)}")


def _h5py():
    """h5py, or a one-line error naming its install."""
    try:
        import h5py
    except ImportError:
        raise ModuleNotFoundError("NXmx output needs h5py: pip install h5py") from None
    return h5py


def check_dependencies(compression: str | None = None) -> None:
    """Fail now, in one line, where `nxmx_bytes` with ``compression`` would fail for want of a
    library (h5py; hdf5plugin for "bslz4") or for an unknown compression: a command line can
    call it before rendering.

    Raises:
        ModuleNotFoundError: naming the ``pip install``. ValueError: an unknown compression.
    """
    _h5py()
    _compression(compression)


# --------------------------------------------------------------------------------------------
# groups
# --------------------------------------------------------------------------------------------
def _group(parent, name: str, nx_class: str):
    """A new HDF5 group tagged with its NeXus class."""
    g = parent.create_group(name)
    g.attrs["NX_class"] = nx_class
    return g


def _field(group, name: str, value, units: str | None = None, **attrs):
    """A new dataset with its NeXus ``units`` (when given) and other attributes."""
    d = group.create_dataset(name, data=value)
    if units is not None:
        d.attrs["units"] = units
    for key, v in attrs.items():
        d.attrs[key] = v
    return d


def _axis(group, name: str, value, kind: str, vector, depends_on: str, units: str):
    """An NXtransformations axis: ``kind`` "rotation" or "translation" along unit ``vector``
    (no ``offset``: dxtbx's generic reader converts an offset with the axis's own units)."""
    return _field(group, name, value, units, transformation_type=kind,
                  vector=np.asarray(vector, dtype=np.float64), depends_on=depends_on)


def _write_module(detector, geom: NXmxGeometry, shape) -> str:
    """The NXdetector_module: the data slab and the corner/fast/slow translations (mm).
    Returns the path of the module offset, the root of the detector's chain."""
    module = _group(detector, "module", "NXdetector_module")
    _field(module, "data_origin", np.array([0, 0], dtype=np.int32))
    _field(module, "data_size", np.array(shape, dtype=np.int32))
    _field(module, "data_stride", np.array([1, 1], dtype=np.int32))
    offset = float(np.linalg.norm(geom.module_offset))
    direction = geom.module_offset / offset if offset > 0 else np.array([0.0, 0.0, 1.0])
    corner = _axis(module, "module_offset", offset, "translation", direction, ".", "mm").name
    _axis(module, "fast_pixel_direction", geom.pixel_size, "translation", geom.fast, corner, "mm")
    _axis(module, "slow_pixel_direction", geom.pixel_size, "translation", geom.slow, corner, "mm")
    return corner


def _write_detector(instrument, geom: NXmxGeometry, data, pixel_mask, sensor_material: str,
                    saturation_value) -> None:
    """The NXdetector: fields and the module. The mask is always deflated (4 bytes a pixel,
    mostly zeros: uncompressed it would be as large as a frame)."""
    det = _group(instrument, "detector", "NXdetector")
    det["data"] = data
    _field(det, "description", "nbfunc simulation (nanoBragg): photons per pixel, float32")
    _field(det, "depends_on", _write_module(det, geom, pixel_mask.shape))
    _field(det, "distance", geom.distance, "mm")
    _field(det, "beam_center_x", geom.beam_center[0], "pixel")
    _field(det, "beam_center_y", geom.beam_center[1], "pixel")
    _field(det, "x_pixel_size", geom.pixel_size * 1e-3, "m")
    _field(det, "y_pixel_size", geom.pixel_size * 1e-3, "m")
    _field(det, "sensor_material", sensor_material)
    _field(det, "sensor_thickness", geom.sensor_thickness, "mm")
    det.create_dataset("pixel_mask", data=pixel_mask, **_compression("gzip"))
    _field(det, "pixel_mask_applied", True)
    if saturation_value is not None:
        _field(det, "saturation_value", np.int64(saturation_value))


def _write_beam(instrument, geom: NXmxGeometry) -> None:
    """The NXbeam: central wavelength, and the sources' spectrum as its variant (Angstrom)."""
    beam = _group(instrument, "beam", "NXbeam")
    central = _field(beam, "incident_wavelength", geom.wavelength, "angstrom")
    values, weights = geom.spectrum
    if len(values) > 1:
        central.attrs["variant"] = "incident_wavelength_1"
        _field(beam, "incident_wavelength_1", values, "angstrom")
        _field(beam, "incident_wavelength_1_weight", weights)


def _write_sample(entry, geom: NXmxGeometry, start: np.ndarray, width: np.ndarray) -> None:
    """The NXsample: the phi axis with each frame's start, end and width (deg)."""
    sample = _group(entry, "sample", "NXsample")
    _field(sample, "name", "nbfunc simulated crystal")
    axes = _group(sample, "transformations", "NXtransformations")
    phi = _axis(axes, "phi", start, "rotation", geom.spindle, ".", "deg")
    _field(axes, "phi_end", start + width, "deg")
    _field(axes, "phi_increment_set", width, "deg")
    _field(sample, "depends_on", phi.name)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def nxmx_bytes(images, params, mask=None, *, compression: str | None = None,
               sensor_material: str = "Si", saturation_value: int | None = None,
               timestamp: datetime.datetime | None = None) -> bytes:
    """An NXmx HDF5 file, built in memory, of ``images`` with the geometry of ``params``.

    Args:
        images: (slow, fast) or (frame, slow, fast) photons per pixel, numpy or torch (stored
            as float32).
        params: the `nbfunc.Params` that rendered them: one tree (every frame gets its phi
            start and width), or `nbfunc.stack` of one tree per frame (a phi series or an
            ensemble rendered with ``torch.func.vmap``) whose detector and beam leaves are the
            same in every tree (else ValueError: one file per geometry).
        mask: (slow, fast) True or non-zero on pixels that hold data (the convention of
            ``sampling.mask``); default: the pixels the tree renders (its ROI and mask).
        compression: None (default), "gzip" or "bslz4" (`COMPRESSIONS`).
        sensor_material: NXdetector sensor_material ("Si", "CdTe", "GaAs": the ones DIALS knows);
            the tree holds the sensor's thickness and attenuation but not its material.
        saturation_value: photons per pixel above which data are invalid (written when given).
        timestamp: start_time and end_time (default: now); naive times are taken as UTC.

    Returns:
        the file's bytes (h5py's in-memory "core" driver, no disk access), for an
        all-or-nothing write (`write_nxmx`, `nbfunc.io.atomic`).

    Raises:
        ValueError: images, mask or stack shapes that do not match the tree, trees of a
            stack that differ in geometry, an unknown compression.
        ModuleNotFoundError: h5py (or, for "bslz4", hdf5plugin) is not installed.
    """
    check_dependencies(compression)
    h5py, compress = _h5py(), _compression(compression)
    shape = (params.detector.spixels, params.detector.fpixels)
    frames = _frames(images, shape)
    tree, start, width = _scan(params, frames.shape[0])
    geom = nxmx_geometry(tree)
    pixel_mask = _pixel_mask(tree, mask)
    when = timestamp or datetime.datetime.now(datetime.timezone.utc)
    if when.tzinfo is not None:
        when = when.astimezone(datetime.timezone.utc)
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    with h5py.File(f"nbfunc-{uuid.uuid4().hex}.h5", "w", driver="core",
                   backing_store=False) as f:
        f.attrs["default"], f.attrs["creator"], f.attrs["file_time"] = "entry", "nbfunc", stamp
        entry = _group(f, "entry", "NXentry")
        entry.attrs["default"] = "data"
        _field(entry, "definition", "NXmx")
        _field(entry, "start_time", stamp)
        _field(entry, "end_time", stamp)
        nxdata = _group(entry, "data", "NXdata")
        nxdata.attrs["signal"] = "data"
        data = nxdata.create_dataset("data", data=frames, chunks=(1,) + shape, **compress)
        data.attrs["long_name"] = "photons per pixel"
        instrument = _group(entry, "instrument", "NXinstrument")
        _field(instrument, "name", "nbfunc simulated instrument")
        _write_detector(instrument, geom, data, pixel_mask, sensor_material, saturation_value)
        _write_beam(instrument, geom)
        _write_sample(entry, geom, start, width)
        _field(_group(entry, "source", "NXsource"), "name", "nbfunc simulation")
        f.flush()
        return f.id.get_file_image()


def write_nxmx(path: str | os.PathLike, images, params, mask=None, **options) -> None:
    """Write `nxmx_bytes` (same arguments and keywords) to ``path``, all or nothing
    (`nbfunc.io.atomic.atomic_write_bytes`)."""
    atomic_write_bytes(path, nxmx_bytes(images, params, mask, **options))
