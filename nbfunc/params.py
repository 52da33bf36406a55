"""The nbfunc parameter tree: every quantity of a nanoBragg simulation, validated once.

`Params` is a frozen pydantic model with four groups (`beam`, `detector`, `crystal`,
`sampling`). Continuous quantities are torch tensors: they are the differentiable *leaves* and
are listed, per class, in the class variable ``LEAVES`` (in the fixed order in which the tree
flattens). Everything else (pixel counts, step counts, modes, conventions, seeds, the random
draws made from seeds, the mask) is a *static* setting that travels in the pytree context.

Units are those a crystallographer types: Angstrom for the cell and the wavelength, mm for the
detector, degrees for every angle, mrad for divergence, micrometres for the water layer,
photons/m^2 for fluence. `nbfunc.render` converts them to SI once.

Validation runs only when a tree is built from user input (``Params(...)``,
``model_validate``, ``model_validate_json``, `nbfunc.params_from_args`) and when `Params.to`
changes its dtype. The pytree machinery in `nbfunc.tree` rebuilds trees without validation, so
torch.func transforms can put batched tensors, Jacobian blocks or nested trees in the leaves.

A tree that validates renders a finite image, or validation says why not, in one line naming
the field, its value and the fix: leaves are finite float32 or float64 tensors, one dtype and
one device per tree; directions are finite and non-zero (the polarization axis not along the
beam, the slow axis not along the fast one); orientation matrices are proper rotations;
fractions are finite; a detector has at most `MAX_PIXELS` pixels; the placed detector, the
oriented cell and the sources are finite; and no pixel can overflow the tree's dtype
(`_pixel_bounds`).
"""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nbfunc.tensors import StaticArray, TensorLike, describe
from nbfunc.units import ANGSTROM, AVOGADRO, MM, R_E_SQR, UM, WATER_F, WATER_MW

Vec3 = tuple[float, float, float]


def _t(value):
    """Default factory of a float64 tensor leaf."""
    return lambda: torch.tensor(value, dtype=torch.float64)


class Node(BaseModel):
    """Base of every group of the tree: frozen, tensors allowed, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="forbid",
                              validate_default=True)
    LEAVES: ClassVar[tuple[str, ...]] = ()
    CHILDREN: ClassVar[tuple[str, ...]] = ()

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        return all(_same(getattr(self, n), getattr(other, n)) for n in type(self).model_fields)

    __hash__ = object.__hash__

    @classmethod
    def static_fields(cls) -> tuple[str, ...]:
        """Names of the fields that are static settings (neither leaves nor sub-trees)."""
        dynamic = set(cls.LEAVES) | set(cls.CHILDREN)
        return tuple(name for name in cls.model_fields if name not in dynamic)

    @model_validator(mode="after")
    def _leaves_are_floating(self):
        """Integer and boolean leaves become float64 (`TensorLike` has refused non-finite
        values and floating dtypes other than float32 and float64)."""
        for name in self.LEAVES:
            value = getattr(self, name)
            if not torch.is_floating_point(value):
                object.__setattr__(self, name, value.to(torch.float64))
        return self


def _same(a, b) -> bool:
    """Equality that treats tensors by value (for static settings such as the mask)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu())))
    return a == b


def _check(name: str, value: torch.Tensor, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {describe(value)}")


def _scalar(name: str, value: torch.Tensor) -> torch.Tensor:
    _check(name, value, value.dim() == 0, "a single number")
    return value


def _shown(numbers) -> str:
    """Nested tuples of numbers as short text: ``(1, 0, nan)``."""
    if isinstance(numbers, (tuple, list)):
        return "(" + ", ".join(_shown(x) for x in numbers) + ")"
    return f"{numbers:.6g}"


def _unit(v: Vec3, name: str) -> Vec3:
    """``v`` when it is a direction: finite and non-zero (it is normalised where it is used)."""
    norm = math.sqrt(sum(x * x for x in v)) if all(math.isfinite(x) for x in v) else math.nan
    if not (norm > 0 and math.isfinite(norm)):
        raise ValueError(f"{name} = {_shown(v)} is not a direction; give a finite, non-zero "
                         "3-vector (x, y, z)")
    return v


def _finite_rows(table: torch.Tensor, name: str, fix: str) -> None:
    """Refuse a (n,) static table with a non-finite entry, naming the first as `_finite` does."""
    bad = ~torch.isfinite(table)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        _finite(float(table[i]), f"{name}[{i}]", fix)


def _finite(x: float, name: str, fix: str) -> float:
    """``x`` when it is a finite number, else a ValueError naming ``name`` with ``fix``."""
    if not math.isfinite(x):
        raise ValueError(f"{name} = {x} is not finite; {fix}")
    return x


PARALLEL_SINE = 1e-6
"""Two directions whose angle has a sine below this are parallel: the cross product that
builds the frame from them (polarization, detector plane) vanishes or is rounding noise."""


def _not_parallel(u: Vec3, v: Vec3, name: str, other: str, fix: str) -> None:
    """Refuse directions ``u`` (field ``name``) and ``v`` (field ``other``) that are parallel."""
    a, b = np.asarray(u, dtype=float), np.asarray(v, dtype=float)
    sine = float(np.linalg.norm(np.cross(a, b)) / (np.linalg.norm(a) * np.linalg.norm(b)))
    if not sine >= PARALLEL_SINE:
        raise ValueError(f"{name} = {_shown(u)} is parallel to {other} = {_shown(v)} (sine "
                         f"{sine:.3g} < {PARALLEL_SINE:g}); {fix}")


ROTATION_TOLERANCE = 1e-6
"""Largest entry of ``|U U^T - I|`` accepted for an orientation matrix U: the rounding of a
matrix computed in float64 or typed with 7 significant digits, far below any deliberate
deformation (the cell is built from the cell constants, so U may only rotate it)."""


def _rotation(u, name: str):
    """``u`` (3x3, rows) when it is a proper rotation: orthonormal within `ROTATION_TOLERANCE`
    and of determinant +1."""
    m = np.asarray(u, dtype=float)
    if m.shape != (3, 3) or not np.isfinite(m).all():
        raise ValueError(f"{name} = {_shown(u)} is not a finite 3x3 matrix; give three rows of "
                         "three finite numbers (a rotation matrix)")
    error = float(np.abs(m @ m.T - np.eye(3)).max())
    det = float(np.linalg.det(m))
    if not (error <= ROTATION_TOLERANCE and det > 0):
        raise ValueError(f"{name} is not a proper rotation (|U U^T - I| = {error:.3g}, tolerance "
                         f"{ROTATION_TOLERANCE:g}; det = {det:.6g}, needs +1); give an orthonormal "
                         f"right-handed matrix; got {_shown(u)}")
    return u


MAX_COUNT = 2**31 - 1
"""Largest step or sample count (oversample, thicksteps, phisteps): a C int, as in the C
program; beyond it torch's index arithmetic overflows or a render never ends."""

MAX_PIXELS = 2**31 - 1
"""Most pixels a detector may have. The C program counts pixels in a C int, and `simulate`
returns the whole (spixels, fpixels) image even for a small ROI: at this size 8 GiB in
float32 and 16 GiB in float64, already more than a workstation renders into."""


# --------------------------------------------------------------------------------------------
# Beam
# --------------------------------------------------------------------------------------------
class SourceGrid(Node):
    """Sources generated from divergence and dispersion ranges, as nanoBragg does.

    Source ``s`` is the beam direction tilted by ``vdiv_s = vdivrange*vdiv_fracs[s]`` about the
    polarization axis and then by ``hdiv_s = hdivrange*hdiv_fracs[s]`` about the axis normal
    to beam and polarization; its wavelength is ``wavelength*(1 + dispersion*disp_fracs[s])``.
    The fractions (dimensionless, static) come from the step counts and the round-divergence cut.
    """

    LEAVES: ClassVar = ("dispersion", "hdivrange", "vdivrange")
    dispersion: TensorLike = Field(default_factory=_t(0.0),
                                   description="full spectral width dlambda/lambda (fraction)")
    hdivrange: TensorLike = Field(default_factory=_t(0.0),
                                  description="horizontal divergence range (mrad)")
    vdivrange: TensorLike = Field(default_factory=_t(0.0),
                                  description="vertical divergence range (mrad)")
    hdiv_fracs: StaticArray = Field((0.0,), description="(source,) fractions of hdivrange")
    vdiv_fracs: StaticArray = Field((0.0,), description="(source,) fractions of vdivrange")
    disp_fracs: StaticArray = Field((0.0,), description="(source,) fractions of dispersion")

    @field_validator("dispersion", "hdivrange", "vdivrange")
    @classmethod
    def _non_negative(cls, v, info):
        _scalar(info.field_name, v)
        _check(info.field_name, v, bool(v >= 0), ">= 0")
        return v

    @field_validator("hdiv_fracs", "vdiv_fracs", "disp_fracs")
    @classmethod
    def _finite_fractions(cls, v, info):
        fix = "give one finite fraction of the range per source"
        if v.dim() != 1:
            raise ValueError(f"{info.field_name} has shape {tuple(v.shape)}; {fix} (a list of numbers)")
        _finite_rows(v, info.field_name, fix)
        return v

    @model_validator(mode="after")
    def _same_lengths(self):
        n = len(self.hdiv_fracs)
        if not (n == len(self.vdiv_fracs) == len(self.disp_fracs)) or n == 0:
            raise ValueError("hdiv_fracs, vdiv_fracs and disp_fracs must have the same non-zero "
                             f"length (one entry per source), got {len(self.hdiv_fracs)}, "
                             f"{len(self.vdiv_fracs)}, {len(self.disp_fracs)}")
        return self

    @property
    def n_sources(self) -> int:
        return len(self.hdiv_fracs)


class SourceList(Node):
    """Explicit sources (``-sourcefile``, a spectrum): a direction, a wavelength and a weight
    per source.

    ``directions`` (source, 3) point from the sample towards each source (they are normalised
    inside the simulation); ``wavelengths`` (source,) are in Angstrom; ``weights`` (source,)
    are dimensionless, default all ones. Source ``s`` contributes ``weights[s]`` times its
    term to every pixel, and the sum is divided by the number of sources, as nanoBragg divides
    by its "steps": a pixel is ``r_e^2 fluence G / steps * (background + sum over paths of
    weights[s] F^2 F_latt^2)`` (docs/physics.md, "Spectra"). With weights of one the image is
    the C program's, which ignores the weight column of a source file; weights with mean 1
    keep ``beam.fluence`` the shot's total fluence. Validated: finite, >= 0, not all zero.
    """

    LEAVES: ClassVar = ("directions", "wavelengths", "weights")
    directions: TensorLike
    wavelengths: TensorLike
    weights: TensorLike = Field(description="per-source weight (dimensionless), default all ones")

    @model_validator(mode="before")
    @classmethod
    def _default_weights(cls, data):
        """Weights of one, in the wavelengths' dtype and device, when none are given."""
        if isinstance(data, dict) and data.get("weights") is None and "wavelengths" in data:
            w = data["wavelengths"]
            if isinstance(w, torch.Tensor):
                ones = torch.ones(w.shape[:1], dtype=w.dtype if w.is_floating_point() else
                                  torch.float64, device=w.device)
            else:
                ones = np.ones(np.shape(w)[:1])
            data = {**data, "weights": ones}
        return data

    @model_validator(mode="after")
    def _shapes(self):
        d, w, g = self.directions, self.wavelengths, self.weights
        _check("directions", d, d.dim() == 2 and d.shape[-1] == 3 and d.shape[0] > 0,
               "an array of shape (sources, 3)")
        _check("wavelengths", w, w.shape == d.shape[:1], f"an array of shape ({d.shape[0]},)")
        _check("wavelengths", w, bool((w > 0).all()), "> 0 Angstrom")
        _check("directions", d, bool((d.norm(dim=-1) > 0).all()), "non-zero vectors")
        _check("weights", g, g.shape == d.shape[:1], f"an array of shape ({d.shape[0]},), one "
               "weight per source")
        _check("weights", g, bool((g >= 0).all()), ">= 0 (dimensionless)")
        _check("weights", g, bool((g > 0).any()), "not all zero; give a positive weight to at "
               "least one source")
        return self

    @property
    def n_sources(self) -> int:
        return int(self.directions.shape[0])


class Beam(Node):
    """Incident beam: wavelength, polarization, fluence and the list of sources."""

    LEAVES: ClassVar = ("wavelength", "kahn_factor", "fluence")
    CHILDREN: ClassVar = ("sources",)
    wavelength: TensorLike = Field(description="central wavelength (Angstrom)")
    kahn_factor: TensorLike = Field(default_factory=_t(0.0),
                                    description="Kahn polarization factor (0 unpolarized, 1 fully)")
    fluence: TensorLike = Field(default_factory=_t(125932015286227086360700780544.0),
                                description="integrated incident fluence (photons/m^2)")
    sources: SourceGrid | SourceList = Field(default_factory=SourceGrid)
    beam_vector: Vec3 = Field((1.0, 0.0, 0.0), description="beam direction, unit vector")
    polar_vector: Vec3 = Field((0.0, 0.0, 1.0), description="E-vector direction, unit vector")
    polarization: bool = Field(True, description="apply the polarization factor (False: -nopolar)")

    @field_validator("wavelength")
    @classmethod
    def _positive(cls, v, info):
        _scalar(info.field_name, v)
        _check(info.field_name, v, bool(v > 0), "> 0 Angstrom")
        return v

    @field_validator("kahn_factor")
    @classmethod
    def _kahn(cls, v, info):
        _scalar(info.field_name, v)
        _check(info.field_name, v, bool((v >= -1) & (v <= 1)), "in [-1, 1]")
        return v

    @field_validator("fluence")
    @classmethod
    def _fluence(cls, v, info):
        _scalar(info.field_name, v)
        _check(info.field_name, v, bool(v >= 0), ">= 0 photons/m^2")
        return v

    @field_validator("beam_vector", "polar_vector")
    @classmethod
    def _vectors(cls, v, info):
        _unit(v, info.field_name)
        if info.field_name == "polar_vector" and "beam_vector" in info.data:
            _not_parallel(v, info.data["beam_vector"], "polar_vector", "beam_vector",
                          "give an E-vector across the beam")
        return v


# --------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------
class Detector(Node):
    """Flat (or curved) pixel-array detector, its placement and its sensor.

    The pivot decides what ``distance`` and the beam centre mean:

    * ``pivot="beam"``: ``beam_center_f/s`` is where the direct beam meets the detector,
      measured from the detector origin along the fast/slow axes (mm); the detector rotates
      about that spot. ``distance`` is the sample-to-spot distance along the beam when
      ``distance_kind="beam"``, or the sample-to-plane distance when ``"close"``.
    * ``pivot="sample"``: ``beam_center_f/s`` is the foot of the perpendicular from the sample
      onto the unrotated detector (mm); the detector rotates about the sample.

    Rotations are applied about the lab x, y, z axes in that order, then two-theta about
    ``twotheta_axis``. Sensor absorption uses layers of ``thickness*thick_step_fraction`` with
    attenuation coefficient ``mu``.
    """

    LEAVES: ClassVar = ("distance", "beam_center_f", "beam_center_s", "rotx", "roty", "rotz",
                        "twotheta", "pixel_size", "thickness", "mu")
    distance: TensorLike = Field(description="detector distance (mm), see distance_kind")
    beam_center_f: TensorLike = Field(description="beam centre along the fast axis (mm)")
    beam_center_s: TensorLike = Field(description="beam centre along the slow axis (mm)")
    rotx: TensorLike = Field(default_factory=_t(0.0), description="rotation about x (deg)")
    roty: TensorLike = Field(default_factory=_t(0.0), description="rotation about y (deg)")
    rotz: TensorLike = Field(default_factory=_t(0.0), description="rotation about z (deg)")
    twotheta: TensorLike = Field(default_factory=_t(0.0),
                                 description="two-theta swing about twotheta_axis (deg)")
    pixel_size: TensorLike = Field(description="pixel edge (mm)")
    thickness: TensorLike = Field(default_factory=_t(0.0),
                                  description="sensor thickness (mm)")
    mu: TensorLike = Field(default_factory=_t(0.0),
                           description="sensor attenuation coefficient (1/mm)")
    fpixels: int = Field(gt=0, description="pixels along the fast axis")
    spixels: int = Field(gt=0, description="pixels along the slow axis")
    pivot: Literal["beam", "sample"] = "beam"
    distance_kind: Literal["beam", "close"] = "beam"
    fdet_vector: Vec3 = (0.0, 0.0, 1.0)
    sdet_vector: Vec3 = (0.0, -1.0, 0.0)
    odet_vector: Vec3 = (1.0, 0.0, 0.0)
    twotheta_axis: Vec3 = (0.0, 0.0, -1.0)
    curved: bool = False
    point_pixel: bool = False
    thicksteps: int = Field(1, gt=0, le=MAX_COUNT, description="sensor layers")
    thick_step_fraction: float = Field(0.0, ge=0, description="layer depth / thickness")
    absorption: bool = Field(False, description="model sensor absorption (thickness > 0)")

    @field_validator("distance", "pixel_size")
    @classmethod
    def _positive(cls, v, info):
        _scalar(info.field_name, v)
        unit = "mm"
        _check(info.field_name, v, bool(v > 0), f"> 0 {unit}")
        return v

    @field_validator("beam_center_f", "beam_center_s", "rotx", "roty", "rotz", "twotheta")
    @classmethod
    def _scalars(cls, v, info):
        return _scalar(info.field_name, v)

    @field_validator("thickness", "mu")
    @classmethod
    def _non_negative(cls, v, info):
        _scalar(info.field_name, v)
        _check(info.field_name, v, bool(v >= 0), ">= 0")
        return v

    @field_validator("fdet_vector", "sdet_vector", "odet_vector", "twotheta_axis")
    @classmethod
    def _vectors(cls, v, info):
        _unit(v, info.field_name)
        if info.field_name == "sdet_vector" and "fdet_vector" in info.data:
            _not_parallel(v, info.data["fdet_vector"], "sdet_vector", "fdet_vector",
                          "give perpendicular fast and slow axes")
        return v

    @field_validator("thick_step_fraction")
    @classmethod
    def _fraction(cls, v, info):
        return _finite(v, info.field_name, "give the layer depth as a finite fraction of thickness")

    @field_validator("spixels")
    @classmethod
    def _pixel_count(cls, v, info):
        fpixels = info.data.get("fpixels")
        if fpixels is not None and fpixels * v > MAX_PIXELS:
            raise ValueError(f"fpixels x spixels = {fpixels} x {v} = {fpixels * v} pixels, more "
                             f"than 2^31 - 1 (a C int; the image alone: "
                             f"{fpixels * v * 4 / 2**30:.3g} GiB in float32); give a smaller detector")
        return v


# --------------------------------------------------------------------------------------------
# Crystal
# --------------------------------------------------------------------------------------------
class Crystal(Node):
    """Unit cell, orientation, size, shape, mosaicity, rotation and structure factors.

    The reciprocal cell is built from the six cell constants in nanoBragg's default frame
    (a* along x), turned by the static ``base_orientation`` (identity for ``-cell``, the
    orientation of a ``-mat`` file otherwise) and then by the ``misset`` rotations about x, y
    and z (deg). ``fhkl[h-h_min, k-k_min, l-l_min]`` holds structure factors (electrons); any
    other reflection has ``default_F``. ``Na, Nb, Nc`` are numbers of cells (continuous for
    differentiation). ``water_size`` (micrometres) sets the constant water background.

    ``Ncells_def`` holds the off-diagonal terms Nd, Ne, Nf of diffBragg's domain-size matrix
    ``N = [[Na, Nd, Nf], [Nd, Nb, Ne], [Nf, Ne, Nc]]`` (cells); only the Gaussian shapes use
    them, and ``N`` must be positive definite. ``shape`` 'gauss' is the C program's Gaussian
    (offset in reciprocal space), 'gauss_hkl' diffBragg's (offset in Miller units,
    ``det N exp(-|N dH|^2 fudge/0.63)``). ``G`` is a per-shot scale (dimensionless) of
    the crystal's photons (not the water background's).

    ``mosaic_model`` picks the mosaic domains: ``"c_random"`` (default) is nanoBragg's random
    draws (``mosaic_axes``, ``mosaic_scales`` from ``mosaic_seed``, angles up to
    ``mosaic_spread``); ``"quadrature"`` is diffBragg-style anisotropic mosaicity made
    deterministic: ``mosaic_domains`` fixed equal-weight points (1, or at least 6) standing for
    Gaussian rotation vectors with covariance ``E E``, where ``E = mosaic_spread * I + eta``
    (deg, lab frame; ``eta`` holds axis spreads xx, yy, zz or a positive semidefinite symmetric
    tensor xx, yy, zz, xy, yz, xz), so the image is a smooth function of both. ``eta`` must be
    zero under ``"c_random"``.

    With ``diffuse`` on, diffBragg's diffuse scattering (``diffuse_gamma``, ``diffuse_sigma``,
    symmetrised over the static ``diffuse_laue_group``) adds to the lattice term; with
    ``bfactor`` on, intensities are multiplied by ``exp(-2 B stol^2)`` (``B`` in Angstrom^2).
    See docs/physics.md.
    """

    LEAVES: ClassVar = ("cell_a", "cell_b", "cell_c", "cell_alpha", "cell_beta", "cell_gamma",
                        "misset", "Na", "Nb", "Nc", "fudge", "mosaic_spread", "phi_start",
                        "phi_step", "default_F", "fhkl", "water_size", "Ncells_def", "G", "eta",
                        "diffuse_gamma", "diffuse_sigma", "B")
    cell_a: TensorLike = Field(description="cell edge a (Angstrom)")
    cell_b: TensorLike = Field(description="cell edge b (Angstrom)")
    cell_c: TensorLike = Field(description="cell edge c (Angstrom)")
    cell_alpha: TensorLike = Field(default_factory=_t(90.0), description="alpha (deg)")
    cell_beta: TensorLike = Field(default_factory=_t(90.0), description="beta (deg)")
    cell_gamma: TensorLike = Field(default_factory=_t(90.0), description="gamma (deg)")
    misset: TensorLike = Field(default_factory=_t([0.0, 0.0, 0.0]),
                               description="misset rotations about x, y, z (deg)")
    Na: TensorLike = Field(default_factory=_t(1.0), description="cells along a")
    Nb: TensorLike = Field(default_factory=_t(1.0), description="cells along b")
    Nc: TensorLike = Field(default_factory=_t(1.0), description="cells along c")
    fudge: TensorLike = Field(default_factory=_t(1.0),
                              description="spot-shape scale of the non-square shapes")
    mosaic_spread: TensorLike = Field(default_factory=_t(0.0),
                                      description="mosaic spread (deg)")
    phi_start: TensorLike = Field(default_factory=_t(0.0),
                                  description="spindle angle of the first phi step (deg)")
    phi_step: TensorLike = Field(default_factory=_t(0.0),
                                 description="spindle rotation per phi step (deg)")
    default_F: TensorLike = Field(default_factory=_t(0.0),
                                  description="structure factor of unlisted reflections (e)")
    fhkl: TensorLike = Field(default_factory=lambda: torch.zeros(0, 0, 0, dtype=torch.float64),
                             description="structure factor grid (e), shape (h, k, l)")
    water_size: TensorLike = Field(default_factory=_t(0.0),
                                   description="water layer size for the background (um)")
    Ncells_def: TensorLike = Field(default_factory=_t([0.0, 0.0, 0.0]),
                                   description="off-diagonal domain-size terms Nd (a-b), Ne "
                                   "(b-c), Nf (a-c) (cells); Gaussian shapes only")
    G: TensorLike = Field(default_factory=_t(1.0),
                          description="per-shot scale of the crystal's photons, not the water's (dimensionless)")
    diffuse_gamma: TensorLike = Field(default_factory=_t([1.0, 1.0, 1.0]),
                                      description="diffuse correlation lengths along lab x, y, z "
                                      "(Angstrom), diffBragg's diffuse_gamma; used when diffuse")
    diffuse_sigma: TensorLike = Field(default_factory=_t([0.01, 0.01, 0.01]),
                                      description="diffuse displacement amplitudes along lab x, y, z "
                                      "(Angstrom), diffBragg's diffuse_sigma; used when diffuse")
    B: TensorLike = Field(default_factory=_t(0.0),
                          description="per-shot isotropic B factor, intensities times exp(-2 B "
                          "stol^2) at the nearest reflection (Angstrom^2); used when bfactor")
    diffuse: bool = False
    diffuse_laue_group: str = "P-1"
    bfactor: bool = False
    hkl_origin: tuple[int, int, int] = (0, 0, 0)
    shape: Literal["square", "round", "gauss", "gauss_hkl", "tophat"] = "square"
    interpolate: bool = False
    base_orientation: tuple[Vec3, Vec3, Vec3] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    spindle_axis: Vec3 = (0.0, 0.0, 1.0)
    phisteps: int = Field(1, gt=0, le=MAX_COUNT)
    mosaic_domains: int = Field(1, gt=0)
    mosaic_seed: int = -12345678
    mosaic_axes: StaticArray = Field((), description="(mosaic, 3) unit rotation axes of the "
                                     "domains; drawn from mosaic_seed when not given")
    mosaic_scales: StaticArray = Field((), description="(mosaic,) angle of each domain as a "
                                       "fraction of mosaic_spread; drawn with mosaic_axes")
    mosaic_model: Literal["c_random", "quadrature"] = Field(
        "c_random", description="mosaic domains: nanoBragg's random draws, or deterministic "
        "Gaussian domains of the spread tensor mosaic_spread*I + eta")
    eta: TensorLike = Field(default_factory=_t([0.0, 0.0, 0.0]),
                            description="anisotropic mosaic spread (deg) in the lab frame: "
                            "axis spreads xx, yy, zz or the symmetric tensor xx, yy, zz, xy, yz, "
                            "xz; quadrature model only")

    @field_validator("cell_a", "cell_b", "cell_c")
    @classmethod
    def _edges(cls, v, info):
        _scalar(info.field_name, v)
        _check(info.field_name, v, bool(v > 0), "> 0 Angstrom")
        return v

    @field_validator("cell_alpha", "cell_beta", "cell_gamma")
    @classmethod
    def _angles(cls, v, info):
        _scalar(info.field_name, v)
        _check(info.field_name, v, bool((v > 0) & (v < 180)), "in (0, 180) degrees")
        return v

    @field_validator("Na", "Nb", "Nc")
    @classmethod
    def _counts(cls, v, info):
        _scalar(info.field_name, v)
        _check(info.field_name, v, bool(v >= 1), ">= 1 unit cells")
        return v

    @field_validator("fudge")
    @classmethod
    def _fudge(cls, v, info):
        _scalar(info.field_name, v)
        _check(info.field_name, v, bool(v > 0), "> 0")
        return v

    @field_validator("mosaic_spread", "water_size")
    @classmethod
    def _non_negative(cls, v, info):
        _scalar(info.field_name, v)
        _check(info.field_name, v, bool(v >= 0), ">= 0")
        return v

    @field_validator("phi_start", "phi_step", "default_F")
    @classmethod
    def _scalars(cls, v, info):
        return _scalar(info.field_name, v)

    @field_validator("G")
    @classmethod
    def _scale(cls, v, info):
        _scalar("G", v)
        _check("G", v, bool((v > 0) & torch.isfinite(v)), "a finite scale > 0 (dimensionless; 1: none)")
        return v

    @field_validator("diffuse_gamma", "diffuse_sigma")
    @classmethod
    def _diffuse(cls, v, info):
        name = info.field_name
        low = "> 0" if name == "diffuse_gamma" else ">= 0"
        _check(name, v, v.shape == (3,) and bool(torch.isfinite(v).all()
                                                  & ((v > 0) if name == "diffuse_gamma" else (v >= 0)).all()),
               f"three finite numbers {low} (Angstrom), along lab x, y, z")
        return v

    @field_validator("B")
    @classmethod
    def _bfactor(cls, v, info):
        _scalar("B", v)
        _check("B", v, bool((v >= 0) & torch.isfinite(v)), "a finite B factor >= 0 (Angstrom^2; 0: none)")
        return v

    @field_validator("diffuse_laue_group")
    @classmethod
    def _laue_group(cls, v, info):
        from nbfunc.diffuse import LAUE_GROUPS

        symbol = v.replace(" ", "")
        if symbol not in LAUE_GROUPS:
            raise ValueError(f"diffuse_laue_group = {v!r} is not a Laue group diffBragg knows; give "
                             f"one of {', '.join(LAUE_GROUPS)}")
        return symbol

    @field_validator("Ncells_def")
    @classmethod
    def _offdiag(cls, v, info):
        _check("Ncells_def", v, v.shape == (3,) and bool(torch.isfinite(v).all()),
               "three finite numbers Nd, Ne, Nf (cells)")
        return v

    @field_validator("eta")
    @classmethod
    def _eta(cls, v, info):
        _check("eta", v, v.shape in ((3,), (6,)),
               "3 axis spreads xx, yy, zz or 6 tensor terms xx, yy, zz, xy, yz, xz (deg)")
        values = tuple(float(x) for x in v)
        if min(values[:3]) < 0:
            raise ValueError(f"crystal.eta = {_shown(values)} has a negative axis spread; give "
                             "spreads xx, yy, zz >= 0 deg")
        if len(values) == 6:
            from nbfunc.crystal import spread_matrix

            eta = v.detach().to(torch.float64)
            tensor = spread_matrix(eta, eta.new_zeros(()))
            lowest = float(torch.linalg.eigvalsh(tensor)[0])
            if lowest < -1e-12 * max(abs(x) for x in values):
                raise ValueError(f"crystal.eta = {_shown(values)} is not positive semidefinite "
                                 f"(smallest eigenvalue {lowest:.4g} deg); give smaller off-diagonal "
                                 "terms")
        return v

    @field_validator("misset")
    @classmethod
    def _misset(cls, v, info):
        _check("misset", v, v.shape == (3,), "three angles (deg)")
        return v

    @field_validator("fhkl")
    @classmethod
    def _fhkl(cls, v, info):
        _check("fhkl", v, v.dim() == 3, "a 3-d grid indexed [h, k, l]")
        return v

    @field_validator("spindle_axis")
    @classmethod
    def _spindle(cls, v, info):
        return _unit(v, info.field_name)

    @field_validator("base_orientation")
    @classmethod
    def _orientation(cls, v, info):
        return _rotation(v, info.field_name)

    @field_validator("mosaic_axes")
    @classmethod
    def _mosaic_axes(cls, v, info):
        if v.numel() == 0:
            return v.reshape(0, 3)
        if v.dim() != 2 or v.shape[1] != 3:
            raise ValueError(f"mosaic_axes has shape {tuple(v.shape)}; give one unit 3-vector "
                             "(x, y, z) per domain, shape (mosaic, 3)")
        norms = torch.linalg.vector_norm(v, dim=1)
        bad = ~(torch.isfinite(v).all(1) & (norms > 0) & torch.isfinite(norms))
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            _unit(tuple(v[i].tolist()), f"mosaic_axes[{i}]")
        off = (norms - 1.0).abs() > ROTATION_TOLERANCE
        if bool(off.any()):
            i = int(torch.nonzero(off)[0])
            raise ValueError(f"mosaic_axes[{i}] = {_shown(tuple(v[i].tolist()))} has length "
                             f"{float(norms[i]):.6g}; give unit vectors (length 1 within "
                             f"{ROTATION_TOLERANCE:g})")
        return v

    @field_validator("mosaic_scales")
    @classmethod
    def _mosaic_scales(cls, v, info):
        fix = "give one finite angle scale per domain"
        if v.dim() != 1:
            raise ValueError(f"mosaic_scales has shape {tuple(v.shape)}; {fix} (a list of numbers)")
        _finite_rows(v, "mosaic_scales", fix)
        return v

    @model_validator(mode="after")
    def _cell_and_mosaic(self):
        angles = [math.radians(float(getattr(self, n))) for n in ("cell_alpha", "cell_beta", "cell_gamma")]
        s = sum(angles) / 2
        skew = math.sin(s) * math.sin(s - angles[0]) * math.sin(s - angles[1]) * math.sin(s - angles[2])
        if not skew > 0:
            raise ValueError("cell angles alpha, beta, gamma = "
                             f"{[round(math.degrees(a), 6) for a in angles]} deg give no cell "
                             "volume: each angle must be smaller than the sum of the other two "
                             "and the three must sum to less than 360 deg")
        drawn = self._random_domains()
        if drawn and self.mosaic_domains > 1 and not len(self.mosaic_axes):
            from nbfunc.crystal import mosaic_draws

            itemsize = self.cell_a.element_size() if self.cell_a.is_floating_point() else 8
            axes, scales = mosaic_draws(self.mosaic_domains, self.mosaic_seed, self.phisteps, itemsize)
            object.__setattr__(self, "mosaic_axes", axes)
            object.__setattr__(self, "mosaic_scales", scales)
        if drawn and self.mosaic_domains > 1 and not (len(self.mosaic_axes) == len(self.mosaic_scales)
                                                      == self.mosaic_domains):
            raise ValueError(f"mosaic_axes and mosaic_scales need {self.mosaic_domains} entries "
                             f"(one per domain), got {len(self.mosaic_axes)} and "
                             f"{len(self.mosaic_scales)}")
        self._size_matrix()
        if not self.bfactor and float(self.B) != 0:
            raise ValueError(f"crystal.B = {float(self.B):.6g} Angstrom^2 is used only with "
                             "crystal.bfactor=True; set bfactor=True, or B = 0")
        return self

    def _random_domains(self) -> bool:
        """Whether the domains are nanoBragg's random draws. Refuses ``eta`` with those;
        and, under ``mosaic_model='quadrature'``, listed draws, a domain count the quadrature
        cannot use, or one that does not fit in memory."""
        from nbfunc.crystal import QUADRATURE_MIN_DOMAINS, check_mosaic_memory, physical_memory

        if self.mosaic_model == "c_random":
            if bool((self.eta != 0).any()):
                raise ValueError(f"crystal.eta = {_shown(tuple(float(x) for x in self.eta))} needs "
                                 "mosaic_model='quadrature'; give zeros for "
                                 "nanoBragg's random domains")
            return True
        if len(self.mosaic_axes) or len(self.mosaic_scales):
            raise ValueError("crystal.mosaic_axes/mosaic_scales list random draws but mosaic_model is "
                             "'quadrature', which makes its own domains; leave them empty, or use "
                             "mosaic_model='c_random'")
        if 1 < self.mosaic_domains < QUADRATURE_MIN_DOMAINS:
            raise ValueError(f"crystal.mosaic_domains = {self.mosaic_domains} is too few for the "
                             f"quadrature mosaic; give 1 (no mosaicity) or at least "
                             f"{QUADRATURE_MIN_DOMAINS} domains (-mosaic_dom)")
        itemsize = self.cell_a.element_size() if self.cell_a.is_floating_point() else 8
        check_mosaic_memory(self.mosaic_domains, self.phisteps, itemsize, physical_memory())
        return False

    def _size_matrix(self) -> None:
        """Refuse off-diagonal size terms on a shape that ignores them, or a domain-size
        matrix N that is not positive definite (Sylvester: leading minors > 0)."""
        nd, ne, nf = (float(x) for x in self.Ncells_def)
        if (nd, ne, nf) == (0.0, 0.0, 0.0):
            return
        shown = _shown((nd, ne, nf))
        if self.shape not in ("gauss", "gauss_hkl"):
            raise ValueError(f"crystal.Ncells_def = {shown} is used only by the Gaussian shape, not "
                             f"'{self.shape}'; give zeros, or shape='gauss_hkl' (-gauss_hkl_xtal, "
                             "diffBragg's) or 'gauss' (-gauss_xtal)")
        na, nb, nc = float(self.Na), float(self.Nb), float(self.Nc)
        minor = na * nb - nd * nd
        det = na * nb * nc + 2 * nd * ne * nf - na * ne * ne - nb * nf * nf - nc * nd * nd
        if not (minor > 0 and det > 0):
            raise ValueError(f"crystal.Ncells_def = {shown} with Na, Nb, Nc = {_shown((na, nb, nc))} "
                             f"makes the domain-size matrix not positive definite (det {det:.4g}, "
                             f"minor {minor:.4g}); give off-diagonal terms small against Na, Nb, Nc")


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
class Sampling(Node):
    """How pixels are sampled: sub-pixels, ROI, mask, d-min cut and normalisation flags.

    ``roi`` is (fast_min, fast_max, slow_min, slow_max), inclusive pixel indices. ``mask``
    (slow, fast) marks with True the pixels to render. ``oversample_thick/polar/omega``
    reproduce nanoBragg's flags of the same names (the factor multiplies the running sum).
    ``chunk`` bounds the number of evaluations held in memory at once (0: automatic,
    `nbfunc.render.DEFAULT_CHUNK` for compiled renders, `nbfunc.render.SMALL_CHUNK` for eager
    ones and for most compiled renders that record an autograd graph).
    """

    oversample: int = Field(1, gt=0, le=MAX_COUNT, description="sub-pixels per pixel edge")
    oversample_thick: bool = False
    oversample_polar: bool = False
    oversample_omega: bool = False
    roi: tuple[int, int, int, int] | None = None
    mask: TensorLike | None = None
    dmin: float = Field(0.0, ge=0, description="resolution cut-off (Angstrom); 0: none")
    chunk: int = Field(0, ge=0, description="evaluations per chunk (0: automatic)")

    @field_validator("dmin")
    @classmethod
    def _dmin(cls, v, info):
        return _finite(v, info.field_name, "give a resolution in Angstrom, or 0 for no cut-off")

    @field_validator("mask")
    @classmethod
    def _mask(cls, v):
        if v is not None:
            _check("mask", v, v.dim() == 2, "a 2-d (slow, fast) array")
            v = v != 0
        return v


def _leaves_with_paths(node: Node, prefix: str = ""):
    """(dotted path, tensor) of every leaf of ``node``, in flattening order."""
    for name in type(node).LEAVES:
        yield prefix + name, getattr(node, name)
    for name in type(node).CHILDREN:
        yield from _leaves_with_paths(getattr(node, name), f"{prefix}{name}.")


def _one_dtype_and_device(tree: Node) -> None:
    """Refuse a tree whose leaves differ in dtype or device (torch does not mix them)."""
    name = lambda t: f"{str(t.dtype).removeprefix('torch.')} on {t.device}"
    (first_path, first), *rest = _leaves_with_paths(tree)
    for path, leaf in rest:
        if leaf.dtype != first.dtype or leaf.device != first.device:
            raise ValueError(f"{path} is {name(leaf)} but {first_path} is {name(first)}; give every "
                             "leaf one dtype and device, e.g. build the tree from numbers and "
                             "convert it with .to(dtype=torch.float32, device=...)")


def _finite_geometry(p: "Params") -> None:
    """Refuse a tree whose placed detector, oriented cell or sources are not finite: no pixel
    of its image would be."""
    from nbfunc.beam import sources
    from nbfunc.crystal import oriented_cell
    from nbfunc.detector import detector_frame

    frame = detector_frame(p.detector, p.beam.beam_vector)
    if not all(bool(torch.isfinite(x).all()) for x in frame):
        ratio = float(torch.dot(frame.beam, frame.odet))
        raise ValueError("detector.odet_vector/rotx/roty/rotz/twotheta: the placed detector is not "
                         f"finite (beam . normal = {ratio:.3g}); turn the detector to face the "
                         "beam, and give a real distance, beam centre and pixel size (mm)")
    real, recip = oriented_cell(p.crystal)
    if not (bool(torch.isfinite(real).all()) and bool(torch.isfinite(recip).all())):
        cell = [float(getattr(p.crystal, f"cell_{n}")) for n in ("a", "b", "c")]
        raise ValueError(f"crystal.cell_a/b/c: the oriented cell overflows; give cell edges of a "
                         f"real crystal (Angstrom); got {_shown(cell)}")
    incident, wavelengths = sources(p.beam)
    if not bool(torch.isfinite(incident).all()):
        raise ValueError("beam.sources.hdivrange/vdivrange: some source directions are not finite; "
                         "give a divergence of a real beam (mrad)")
    if not (bool((wavelengths > 0).all()) and bool(torch.isfinite(wavelengths).all())):
        raise ValueError("beam.sources.dispersion: a source gets the wavelength "
                         f"{float(wavelengths.min()) * 1e10:.3g} Angstrom; give a dispersion below "
                         "2 (a fraction of the wavelength)")
    _no_overflow(p, float(frame.close_distance), float(frame.distance))


OVERFLOW_MARGIN = 16.0
"""Factor between the largest float of the tree's dtype and the largest bound `_no_overflow`
accepts: room for the overshoot of tricubic interpolation (up to 1.25^3 in F) and rounding."""


def _diffuse_bounds(p: "Params") -> tuple[list[tuple[str, float, str]], float]:
    """Upper bounds of what `nbfunc.diffuse.diffuse_forms` and `diffuse_intensity` compute,
    in float64, as `_pixel_bounds` entries, and the bound of ``I_D`` (Angstrom^3).

    With ``p_L = M^T L`` (1/Angstrom) both forms are ``4 pi^2 sum_k s_k^2 (p_L x)_k^2``:
    ``s = sigma``, ``x = H0`` for the exponent ``E_L``, ``|H0_i| <= |a_i| 2/lambda + 1/2``
    (``|q| <= 2/lambda``); ``s = gamma``, ``x = dH``, ``|dH_i| <= 1/2``, for ``W_L``. Every
    intermediate (``s^2``, ``s^2 p``, the form's entries, each term and partial sum of
    `quadratic_form`) is at most ``12 pi^2 max(s)^2 R^2`` with
    ``R = max(1, max_{L,k} sum_i |p_L,ki| max(x_i, 1))``, ``x_i`` the bound of ``|x_i|``; below
    it they cannot reach inf (nor inf - inf). The peak ``8 pi gamma_x gamma_y gamma_z / n`` and its partial products
    are at most ``8 pi max(det Gam, max(gamma)^2)``, and
    ``I_D <= 8 pi det(Gam) / e`` (``E exp(-E) <= 1/e``, ``(1 + W)^-2 <= 1``).
    """
    from nbfunc.beam import sources
    from nbfunc.crystal import oriented_cell
    from nbfunc.diffuse import laue_operators

    cr = p.crystal
    as64 = lambda t: t.detach().to("cpu", torch.float64).numpy()
    gamma, sigma = as64(cr.diffuse_gamma), as64(cr.diffuse_sigma)
    recip = as64(oriented_cell(cr)[1])
    lam = float(sources(p.beam)[1].min()) / ANGSTROM
    ops = np.array(laue_operators(cr.diffuse_laue_group), dtype=np.float64)
    p_abs = np.abs(recip.T @ ops)                                    # (n, 3, 3)
    edges = np.array([float(cr.cell_a), float(cr.cell_b), float(cr.cell_c)])
    with np.errstate(over="ignore", invalid="ignore"):
        reach = np.maximum(edges * 2 / lam + 0.5, 1.0)

        def form(s, x):
            r = np.maximum(1.0, (p_abs @ x).max())
            return float(12 * math.pi**2 * s.max() ** 2 * r * r)

        det = float(np.prod(gamma))
        exponent, correlation = form(sigma, reach), form(gamma, np.ones(3))
        peak = 8 * math.pi * max(det, float(gamma.max() ** 2))

    def say(name, v, term):
        shown = f"{v[0]:.4g}" if (v == v[0]).all() else "(" + ", ".join(f"{x:.4g}" for x in v) + ")"
        return f"crystal.{name} = {shown}: {term}"

    fix = "lower diffuse_{}".format  # short: the command line cuts a tree message at 160 characters
    return [(say("diffuse_sigma", sigma, "4 pi^2 |Sigma Q0|^2"), exponent, fix("sigma")),
            (say("diffuse_gamma", gamma, "4 pi^2 |Gamma dQ|^2"), correlation, fix("gamma")),
            (say("diffuse_gamma", gamma, "8 pi det(Gamma)"), peak, fix("gamma"))], \
        8 * math.pi * det / math.e


def _pixel_bounds(p: "Params", close: float, distance: float,
                  lattice_peak: bool = True) -> list[tuple[str, float, str]]:
    """Upper bounds of the quantities a render multiplies into a pixel, in the order it forms
    them: (name, bound, how to lower it). Computed in float64 (a Python float; inf on overflow).

    A pixel is ``r_e^2 fluence / steps * sum over paths (w F^2 F_latt^2 + background) * capture
    * polarization * omega * G`` (``w``: the path's source weight, bounded here by
    ``max(1, max weight)``) with ``F_latt^2 <= (Na Nb Nc)^2`` (also with off-diagonal
    size terms: ``det N <= Na Nb Nc`` for a positive definite ``N``, Hadamard), capture <= 1,
    polarization ``(1 + cos^2 - K cos(2psi) sin^2)/2 <= 1`` for ``|K| <= 1``, and ``omega <= pixel^2 / min(|close|, |distance|)^2`` (``1/min(...)^2`` for a point
    pixel), lengths in m. ``lattice_peak=False`` takes ``F_latt^2 = 1`` instead: the bound of
    a pixel off the Bragg peaks, which a render with a sharp lattice factor usually keeps to.

    With ``crystal.diffuse`` on (and ``lattice_peak``), ``F_latt^2 + I_D`` takes the place of
    ``F_latt^2``, with ``I_D <= 8 pi det(Gam) / e``, and the diffuse term's own
    intermediates are bounded too (`_diffuse_bounds`). The diffuse term, like ``F_latt^2``,
    peaks at the reflections, so ``lattice_peak=False`` leaves it out.
    """
    cr, det, beam = p.crystal, p.detector, p.beam
    f_max = max(abs(float(cr.default_F)), float(cr.fhkl.abs().max()) if cr.fhkl.numel() else 0.0)
    cells = float(cr.Na) * float(cr.Nb) * float(cr.Nc) if lattice_peak else 1.0
    terms = (det.thicksteps * p.sampling.oversample**2 * beam.sources.n_sources * cr.phisteps
             * cr.mosaic_domains)
    steps = terms / det.thicksteps
    fluence, water = float(beam.fluence), float(cr.water_size) * UM
    background = WATER_F**2 * R_E_SQR * fluence * (water * water * water) * 1e6 * AVOGADRO / WATER_MW
    weight = float(beam.sources.weights.max()) if isinstance(beam.sources, SourceList) else 1.0
    diffuse, spread, also = [], 0.0, ""
    if cr.diffuse and lattice_peak:
        diffuse, spread = _diffuse_bounds(p)
        peak = terms * f_max * f_max * spread * max(weight, 1.0)
        diffuse.append((diffuse[-1][0].replace(": ", ": paths F^2 ") + "/e", peak, diffuse[-1][2]))
        also = ", diffuse_gamma"
    intensity = terms * (f_max * f_max * (cells * cells + spread) * max(weight, 1.0) + background)
    near = min(abs(close), abs(distance))
    pixel = 1.0 if det.point_pixel else float(det.pixel_size) * MM
    omega = pixel * pixel / (near * near) if near * near > 0 else math.inf
    value = R_E_SQR * fluence * float(cr.G) / steps * intensity * omega
    return [("crystal.default_F/fhkl: F^2", f_max * f_max, "lower the structure factors"),
            ("crystal.Na/Nb/Nc: (Na Nb Nc)^2", cells * cells, "lower Na, Nb, Nc"),
            *diffuse,
            ("crystal.water_size: the water background", background,
             "lower water_size (um) or beam.fluence"),
            ("crystal.Na/Nb/Nc/default_F: F^2 F_latt^2 summed over the paths", intensity,
             f"lower the structure factors, Na, Nb, Nc{also} or the number of paths"),
            ("detector.pixel_size: the solid angle of a pixel", omega,
             "give a larger distance or smaller pixels (mm)"),
            ("beam.fluence/crystal.G: a pixel's photons", value,
             f"lower fluence, G, the structure factors, Na, Nb, Nc{also}")]


def photons_bound(p: "Params", close: float, distance: float, lattice_peak: bool = True) -> float:
    """Upper bound of a pixel's photons (`_pixel_bounds`; ``close``, ``distance`` in m)."""
    return _pixel_bounds(p, close, distance, lattice_peak)[-1][1]


def _no_overflow(p: "Params", close: float, distance: float) -> None:
    """Refuse a tree whose pixels could overflow its dtype (`_pixel_bounds`)."""
    dtype = p.crystal.cell_a.dtype
    limit = torch.finfo(dtype).max / OVERFLOW_MARGIN
    wider = ", or render in float64" if dtype != torch.float64 else ""
    for what, bound, fix in _pixel_bounds(p, close, distance):
        if not bound <= limit:
            raise ValueError(f"{what} could reach {bound:.3g}, beyond what "
                             f"{str(dtype).removeprefix('torch.')} holds ({limit:.3g} with a margin "
                             f"of {OVERFLOW_MARGIN:g}); {fix}{wider}")


PARAMS_MAX_BYTES = 4 << 30
"""Largest tree file `Params.load` reads (bytes): a tree's JSON is dominated by its structure
factors, about 20 bytes per grid point, so this holds a grid of some 200 million points, more
than any HKL file within its own 1 GiB limit gives."""


class Params(Node):
    """A complete nanoBragg simulation: the argument of `nbfunc.simulate`.

    Build it from nanoBragg flags with `nbfunc.params_from_args`, or directly::

        p = Params(beam=Beam(wavelength=1.0),
                   detector=Detector(distance=100, beam_center_f=5, beam_center_s=5,
                                     pixel_size=0.1, fpixels=100, spixels=100),
                   crystal=Crystal(cell_a=50, cell_b=50, cell_c=50, Na=5, Nb=5, Nc=5,
                                   default_F=100))
    """

    CHILDREN: ClassVar = ("beam", "detector", "crystal")
    beam: Beam
    detector: Detector
    crystal: Crystal
    sampling: Sampling = Field(default_factory=Sampling)

    @model_validator(mode="after")
    def _consistent(self):
        det, smp = self.detector, self.sampling
        if smp.mask is not None and tuple(smp.mask.shape) != (det.spixels, det.fpixels):
            raise ValueError(f"sampling.mask has shape {tuple(smp.mask.shape)}, expected "
                             f"(spixels, fpixels) = ({det.spixels}, {det.fpixels})")
        if smp.roi is not None:
            x0, x1, y0, y1 = smp.roi
            if not (0 <= x0 <= x1 and 0 <= y0 <= y1):
                raise ValueError(f"sampling.roi {smp.roi} must be (fast_min, fast_max, slow_min, "
                                 "slow_max) with 0 <= min <= max")
        _one_dtype_and_device(self)
        _finite_geometry(self)
        return self

    def leaf_paths(self) -> list[str]:
        """Dotted names of the differentiable leaves, in flattening order."""
        from nbfunc.tree import leaf_paths

        return leaf_paths(self)

    def save(self, path) -> None:
        """Write the tree as JSON (`model_dump_json`: tensors as ``{"dtype", "shape",
        "data"}``, every field in the units its description gives), all or nothing, so that
        `Params.load` gives back the same tree and the same images.

        Raises:
            nbfunc.io.errors.NbfuncInputError: the path cannot be written (one line).
        """
        from nbfunc.io.atomic import atomic_write_bytes

        atomic_write_bytes(path, self.model_dump_json(indent=1).encode())

    @classmethod
    def load(cls, path) -> "Params":
        """Read a tree written by `Params.save` (or any JSON of the same fields), validated
        as a tree built from user input is.

        Raises:
            nbfunc.io.errors.NbfuncInputError: a missing, unreadable, binary or larger than
                `PARAMS_MAX_BYTES` file (one line).
            pydantic.ValidationError: JSON that is not a valid tree (each error names the
                field and the fix).
        """
        from nbfunc.io.errors import read_limited

        raw = read_limited(path, "parameter tree", "give a file written by Params.save or "
                           "-params_out", PARAMS_MAX_BYTES)
        return cls.model_validate_json(raw)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> "Params":
        """Copy with every floating leaf moved to ``dtype`` and ``device``.

        A new dtype is checked again (`_finite_geometry`: what overflows float32 need not
        overflow float64), except for a batched tree or inside a torch.func transform.

        Raises:
            pydantic.ValidationError: the converted tree would not render a finite image.
            TypeError: ``dtype`` is not a floating torch dtype.
            RuntimeError: torch cannot use ``device`` here (one line, e.g. CUDA on a CPU-only
                build).
        """
        from nbfunc.compile import in_functorch_transform
        from nbfunc.tree import tree_map_leaves

        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"Params.to: dtype {dtype!r} is not a floating torch dtype; give "
                            "torch.float64 or torch.float32")
        try:
            out = tree_map_leaves(lambda t: t.to(dtype=dtype if t.is_floating_point() else None,
                                                 device=device), self)
        except (AssertionError, RuntimeError) as err:  # torch's CUDA-less build asserts
            if device is None:
                raise
            reason = " ".join(str(err).split())
            reason = reason if len(reason) <= 100 else reason[:99] + "…"
            raise RuntimeError(f"Params.to: device {str(device)!r} is not usable here: {reason}; "
                               "give 'cpu' or an available device") from None
        if dtype is not None and not in_functorch_transform() and out.beam.wavelength.dim() == 0:
            try:
                _finite_geometry(out)
            except ValueError as err:
                raise ValidationError.from_exception_data("Params", [
                    {"type": "value_error", "loc": (), "input": str(dtype),
                     "ctx": {"error": err}}]) from None
        return out
