"""The render orchestrator: `simulate`, `simulate_with_carry`, `initial_carry`.

nanoBragg's loops, per pixel and in this order, are: sensor layer ``t``, sub-pixel ``(s, f)``,
source, phi step, mosaic domain. Here the first four form the *path* axis ``E`` (a path is a
ray from the sample to a sub-pixel at one depth, for one source) and the last two the
*orientation* axis ``O``. Chunk tensors are laid out (E, P, O), pixels contiguous so that
the compiled loops vectorise over pixels; order-dependent steps transpose to nanoBragg's
raster order (P, E, O). A chunk evaluates a tile of ``P`` pixels times a block of paths
times all orientations, so memory is bounded by ``sampling.chunk`` evaluations whatever the
loop counts and the image size. Chunks are visited in nanoBragg's raster order, which makes
the order-dependent behaviours of the C program exact:

* the oversample_thick/polar/omega flags multiply the running sum ``I <- (I + term)*factor``;
  a chunk contributes an affine map ``I <- A I + B``;
* without those flags, the factors are the "first/last computed" values: solid angle of the
  first sub-pixel, capture fraction of the last layer, polarization of the first path that
  passes the resolution cut;
* the first evaluation whose tricubic neighbourhood leaves the HKL grid switches
  interpolation off for the rest of the image (nearest neighbour from then on);
* in `simulate_with_carry` only, a phi step of exactly 0 reuses the previous orientation.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch.utils._pytree import tree_leaves

from nbfunc.beam import polarization_axes, polarization_factor, source_weights, sources
from nbfunc.compile import (check_settings, compiled, forward_mode_active, in_functorch_transform,
                            innermost_tangent, only_batching, per_call_under_transforms,
                            report_failure, second_order_active)
from nbfunc.derived import StructuredRules, derived_call
from nbfunc.crystal import mosaic_rotations, orientation_matrices, oriented_cell, phi_angles, phi_rotations
from nbfunc.diffuse import (bfactor_form, debye_waller, diffuse_forms, diffuse_intensity,
                            laue_operators, operator_tensor)
from nbfunc.detector import (DetectorFrame, capture_fraction, detector_frame, solid_angle,
                             subpixel_positions)
from nbfunc.lattice import lattice_factor, nearest_indices
from nbfunc.lattice_sum import (PARTIALS_OPTIONS, PATHS_PER_CALL, SHAPE_ROWS, miller_indices,
                                per_orientation, pixel_partials, pixel_partials_chain,
                                pixel_partials_sum, pixel_partials_tangent, pixel_row_layout,
                                pixel_rows, row_sums)
from nbfunc.params import Params
from nbfunc.structure_factors import interpolation_out_of_range, nearest_f, tricubic_f
from nbfunc.units import ANGSTROM, AVOGADRO, MM, R_E_SQR, UM, WATER_F, WATER_MW

DEFAULT_CHUNK = 1 << 18
"""Evaluations per chunk of the compiled kernel when ``sampling.chunk`` is 0."""
SMALL_CHUNK = 1 << 16
"""Evaluations per chunk, when ``sampling.chunk`` is 0, of the eager kernel (torch.func
transforms, NANOBRAGG_DISABLE_COMPILE, small command-line renders) and of the forward-mode
derivatives of compiled renders outside `PartialsRules`: both make many passes over
per-evaluation arrays, and arrays of 2^16 values stay in the CPU caches (measured on 2 cores:
eager bench_1024 about 2x faster than with 2^18 chunks)."""

PARTIALS_CHUNK = 1 << 21
"""Evaluations per chunk of a compiled render that takes the pixel partial sums
(`PartialsRules`): a render of that size is one call, set-up and sums together
(`ImagePartialsRules`). On the loop-heavy benchmark (1.8 M evaluations, 50 orientations x 9
sources, 64x64 pixels) ``grad`` took 51-53 ms in one call against 78-79 ms in 2^18-evaluation
chunks, and 620 MB peak against 516 MB (the (path, pixel, orientation) arrays of
`nbfunc.lattice_sum._lattice_rows`). Reverse mode only: ``jacfwd`` of 10 leaves took 106 ms
with it against 90 ms with 2^18."""

PARTIALS_BUDGET = 1 << 26
"""Bytes of per-pixel partial sums (`PartialsRules`) that a render whose derivative is taken
may keep for its backward (64 MiB: about 250 000 pixels in float64); larger renders
differentiate the kernel (`nbfunc.derived`)."""


class PhiCarry(NamedTuple):
    """nanoBragg's phi-carryover state: the last spindle-rotated cell, rows a, b, c (m), (3, 3)."""

    orientation: torch.Tensor


class Setup(NamedTuple):
    """Tensors derived once per image from the parameter tree (SI units)."""

    frame: DetectorFrame
    incident: torch.Tensor      # (source, 3)
    wavelengths: torch.Tensor   # (source,) m
    polar_axis: torch.Tensor    # (3,)
    kahn: torch.Tensor
    recip: torch.Tensor         # (3, 3) 1/Angstrom
    n_cells: torch.Tensor       # (3,)
    fudge: torch.Tensor
    default_f: torch.Tensor
    fhkl: torch.Tensor
    water: torch.Tensor         # water size (m)
    layer_depth: torch.Tensor   # m
    mu: torch.Tensor            # 1/m
    n_offdiag: torch.Tensor     # (3,) Nd, Ne, Nf (cells), Gaussian shape only
    weights: torch.Tensor | None = None  # (source,) dimensionless; None: all one
    # diffuse scattering (`nbfunc.diffuse.diffuse_forms`), None when off: (L, 3, 3), (L, 3, 3)
    # dimensionless forms in Miller indices, 0-d Angstrom^3
    diffuse_disorder: torch.Tensor | None = None
    diffuse_correlation: torch.Tensor | None = None
    diffuse_peak: torch.Tensor | None = None
    bfactor_form: torch.Tensor | None = None   # (3, 3) `nbfunc.diffuse.bfactor_form`; None: off


@dataclass(frozen=True)
class Plan:
    """Static description of one render: loop counts, flags and the chunking."""

    fpixels: int
    spixels: int
    oversample: int
    thicksteps: int
    n_sources: int
    n_orient: int
    shape: str
    interpolate: bool
    hkl_origin: tuple[int, int, int]
    ordered: bool
    oversample_thick: bool
    oversample_polar: bool
    oversample_omega: bool
    absorption: bool
    polarization: bool
    curved: bool
    point_pixel: bool
    dmin: float
    tile: int
    block: int
    diffuse_ops: int = 0      # Laue operators of the diffuse term; 0: no diffuse scattering
    bfactor: bool = False     # the per-shot B factor is applied

    @property
    def path_sources(self) -> int:
        """Paths with partial sums of their own source (`PartialsRules`): every path when
        there are several sources, none with one (its direction and wavelength are shared)."""
        return self.n_paths if self.n_sources > 1 else 0

    @property
    def n_paths(self) -> int:
        return self.thicksteps * self.oversample**2 * self.n_sources

    @property
    def capture_path(self) -> int:
        """The path holding the first sub-pixel of the last sensor layer, whose capture
        fraction nanoBragg keeps (without the oversample_thick flag)."""
        return (self.thicksteps - 1) * self.oversample**2 * self.n_sources

    @property
    def single_block(self) -> bool:
        """Whether one chunk holds every path (and every orientation) of its pixels."""
        return self.block >= self.n_paths

    def evaluations(self, n_pixels: int) -> int:
        """(pixel, layer, sub-pixel, source, phi, mosaic) evaluations for ``n_pixels`` pixels."""
        return n_pixels * self.n_paths * self.n_orient

    def chunked(self, budget: int, n_pixels: int) -> "Plan":
        """This plan with the pixel tile and path block that hold at most ``budget``
        evaluations: whole pixels while they fit, else one pixel and a block of its paths.
        A chunk always holds every orientation of its paths, so a path with more
        orientations than ``budget`` makes a chunk of that many evaluations (the
        orientations themselves, (O, 3, 3), are in memory anyway)."""
        per_pixel = self.n_paths * self.n_orient
        tile, block = 1, self.n_paths
        if per_pixel <= budget:
            tile = max(1, min(budget // per_pixel, n_pixels or 1))
        else:
            block = max(1, budget // self.n_orient)
        return dataclasses.replace(self, tile=tile, block=block)

    def chunks(self, n_pixels: int) -> int:
        """Kernel calls (pixel tile x path block) for ``n_pixels`` pixels."""
        return math.ceil(n_pixels / self.tile) * math.ceil(self.n_paths / self.block)


def roi_box(p: Params) -> tuple[int, int, int, int] | None:
    """The rendered rectangle ``(fast_min, fast_max, slow_min, slow_max)`` (inclusive pixel
    indices, clipped to the detector; an empty range when the ROI lies outside it), or None
    when a mask selects the pixels."""
    if p.sampling.mask is not None:
        return None
    fpx, spx = p.detector.fpixels, p.detector.spixels
    x0, x1, y0, y1 = p.sampling.roi if p.sampling.roi is not None else (0, fpx - 1, 0, spx - 1)
    return min(x0, fpx), min(x1, fpx - 1), min(y0, spx), min(y1, spx - 1)


def rendered_pixels(p: Params) -> torch.Tensor:
    """(N,) int64 flat indices ``slow * fpixels + fast`` of the pixels `simulate` renders
    (inside ``sampling.roi`` and ``sampling.mask``), in raster order.

    Memory is of the ROI's size (N indices, and with a mask one bool per ROI pixel), whatever
    the detector's size.
    """
    fpx, spx = p.detector.fpixels, p.detector.spixels
    box = roi_box(p)
    if box is not None:
        x0, x1, y0, y1 = box
        return (torch.arange(y0, y1 + 1)[:, None] * fpx + torch.arange(x0, x1 + 1)).reshape(-1)
    x0, x1, y0, y1 = p.sampling.roi if p.sampling.roi is not None else (0, fpx - 1, 0, spx - 1)
    x0, y0 = max(x0, 0), max(y0, 0)
    rows, cols = torch.nonzero(p.sampling.mask[y0:y1 + 1, x0:x1 + 1].cpu().bool(), as_tuple=True)
    return (rows + y0) * fpx + (cols + x0)


def make_plan(p: Params, large_chunks: bool = True) -> tuple[Plan, torch.Tensor]:
    """Resolve loop counts and chunk sizes, and list the active pixels (`rendered_pixels`).

    ``large_chunks`` selects the default chunk size: `DEFAULT_CHUNK` (compiled renders
    without autograd) or `SMALL_CHUNK`.

    Returns:
        (plan, (N,) int64 flat indices ``slow*fpixels + fast`` of the pixels to render).
    """
    det, cr, smp = p.detector, p.crystal, p.sampling
    fpx, spx = det.fpixels, det.spixels
    pixels = rendered_pixels(p)
    n_orient = cr.phisteps * cr.mosaic_domains
    ordered = smp.oversample_thick or smp.oversample_polar or smp.oversample_omega
    plan = Plan(fpx, spx, smp.oversample, det.thicksteps, p.beam.sources.n_sources, n_orient,
                cr.shape, cr.interpolate and cr.fhkl.numel() > 0, cr.hkl_origin, ordered,
                smp.oversample_thick, smp.oversample_polar, smp.oversample_omega, det.absorption,
                p.beam.polarization, det.curved, det.point_pixel, smp.dmin * ANGSTROM, 0, 0,
                len(laue_operators(cr.diffuse_laue_group)) if cr.diffuse else 0, cr.bfactor)
    return plan.chunked(smp.chunk or (DEFAULT_CHUNK if large_chunks else SMALL_CHUNK), len(pixels)), pixels


def prepare(p: Params) -> tuple[Setup, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image tensors: geometry, sources, cell, and the phi/mosaic rotations.

    Returns:
        (setup, real cell (3, 3) m, phi rotations (phi, 3, 3), mosaic rotations (mosaic, 3, 3)).
    """
    beam, det, cr = p.beam, p.detector, p.crystal
    frame = detector_frame(det, beam.beam_vector)
    incident, wavelengths = sources(beam)
    ref = beam.wavelength
    polar_axis = torch.tensor(beam.polar_vector, dtype=ref.dtype, device=ref.device)
    polar_axis = polar_axis / torch.linalg.vector_norm(polar_axis)
    real, recip = oriented_cell(cr)
    setup = Setup(frame, incident, wavelengths, polar_axis, beam.kahn_factor, recip,
                  torch.stack([cr.Na, cr.Nb, cr.Nc], -1), cr.fudge, cr.default_F, cr.fhkl,
                  cr.water_size * UM, det.thickness * det.thick_step_fraction * MM, det.mu / MM,
                  cr.Ncells_def, source_weights(beam))
    if cr.diffuse:
        setup = setup._replace(**dict(zip(
            ("diffuse_disorder", "diffuse_correlation", "diffuse_peak"),
            diffuse_forms(recip, cr.diffuse_gamma, cr.diffuse_sigma,
                          operator_tensor(cr.diffuse_laue_group, recip)))))
    if cr.bfactor:
        setup = setup._replace(bfactor_form=bfactor_form(recip, cr.B))
    return setup, real, phi_rotations(cr), mosaic_rotations(cr)


def water_background(water: torch.Tensor, fluence: torch.Tensor) -> torch.Tensor:
    """nanoBragg's constant background ``F_bg^2 r_e^2 fluence size^3 1e6 N_A / MW`` (photons/sr).

    The final pixel scale multiplies it by ``r_e^2 fluence`` once more, as in the C program.
    """
    return WATER_F**2 * R_E_SQR * fluence * water**3 * 1e6 * AVOGADRO / WATER_MW


# --------------------------------------------------------------------------------------------
# The chunk kernel
# --------------------------------------------------------------------------------------------
class Paths(NamedTuple):
    """A block of paths (layer, sub-pixel, source), each field with leading shape (E, 1).

    layer, sub_s, sub_f: float indices; incident: (E, 1, 3) unit vectors; wavelength: (E, 1) m;
    weight: (E, 1) the source's weight (dimensionless), or None when every weight is one or
    is folded into the scale (`image_setup`).
    """

    layer: torch.Tensor
    sub_s: torch.Tensor
    sub_f: torch.Tensor
    incident: torch.Tensor
    wavelength: torch.Tensor
    weight: torch.Tensor | None = None


def path_block(setup: Setup, plan: Plan, start: int, stop: int) -> Paths:
    """Paths ``start..stop-1`` in nanoBragg's order (layer, slow sub-pixel, fast sub-pixel, source)."""
    device, dtype = setup.incident.device, setup.incident.dtype
    e = torch.arange(start, stop, device=device)
    os2 = plan.oversample**2
    src = e % plan.n_sources
    sub = (e // plan.n_sources) % os2
    layer = e // (plan.n_sources * os2)
    as_float = lambda x: x.to(dtype)[:, None]
    return Paths(as_float(layer), as_float(sub // plan.oversample), as_float(sub % plan.oversample),
                 setup.incident[src][:, None], setup.wavelengths[src][:, None],
                 None if setup.weights is None else setup.weights[src][:, None])


def path_rays(setup: Setup, plan: Plan, fpix, spix, paths: Paths):
    """Per (pixel, path): diffracted direction, path length, incident direction, q, cut.

    Vectors are tuples of three (E, P) component tensors.

    Args:
        fpix, spix: (1, P) float pixel indices; paths: a block of E paths.
    Returns:
        diffracted unit vector, airpath (E, P) in m, incident (E, 1) components, q in 1/m,
        culled (E, P) bool (beyond the resolution cut).
    """
    pos = subpixel_positions(setup.frame, fpix, spix, paths.sub_f, paths.sub_s,
                             paths.layer * setup.layer_depth, plan.oversample, plan.curved)
    airpath = torch.sqrt(pos[0] * pos[0] + pos[1] * pos[1] + pos[2] * pos[2])
    diffracted = tuple(x / airpath for x in pos)
    incident = tuple(paths.incident[..., i] for i in range(3))
    q = tuple((d - i) / paths.wavelength for d, i in zip(diffracted, incident))
    if plan.dmin > 0:
        stol = 0.5 * torch.sqrt(q[0] * q[0] + q[1] * q[1] + q[2] * q[2])
        culled = (stol > 0) & (plan.dmin * 2 * stol > 1)
    else:
        culled = torch.zeros_like(airpath, dtype=torch.bool)
    return diffracted, airpath, incident, q, culled


def path_factors(setup: Setup, plan: Plan, diffracted, airpath, incident, layer):
    """Solid angle, sensor capture fraction and polarization of the given paths, each (E', P)."""
    f = setup.frame
    omega = solid_angle(airpath, f.close_distance, f.pixel_size, plan.point_pixel)
    if plan.absorption:
        capture = capture_fraction(diffracted, f.odet, layer, setup.layer_depth, setup.mu)
    else:
        capture = torch.ones_like(airpath)
    if plan.polarization:
        polar = polarization_factor(incident, diffracted, setup.polar_axis, setup.kahn)
    else:
        polar = torch.ones_like(airpath)
    return omega, capture, polar


def raster_rank(shape: torch.Size, device) -> torch.Tensor:
    """Position of every entry of an (E, P, ...) chunk in nanoBragg's raster order (P, E, ...)."""
    n_e, n_p, rest = shape[0], shape[1], shape[2:]
    inner = 1
    for n in rest:
        inner *= n
    e = torch.arange(n_e, device=device).reshape((n_e, 1) + (1,) * len(rest))
    p = torch.arange(n_p, device=device).reshape((1, n_p) + (1,) * len(rest))
    within = torch.arange(inner, device=device).reshape((1, 1) + tuple(rest))
    return (p * n_e + e) * inner + within


def first_in_raster(flags: torch.Tensor) -> torch.Tensor:
    """Raster rank of the first set entry of ``flags`` (E, P, ...), or the entry count if none."""
    rank = raster_rank(flags.shape, flags.device)
    return torch.where(flags, rank, flags.numel()).amin(), rank


def structure_factor(setup: Setup, plan: Plan, hkl, counted, disabled_in):
    """F_cell with nanoBragg's interpolation switch-off.

    Args:
        hkl: (h, k, l), each (E, P, O), or (E, P) when the chunk has one orientation;
            counted: evaluations of the same shape that reach the F_cell code, or None when
            the interpolation switch-off cannot happen; disabled_in: 0-d bool,
            interpolation already switched off by an earlier chunk.
    Returns:
        (F_cell of the shape of h, disabled_out 0-d bool).
    """
    h0 = nearest_indices(hkl)
    nearest = nearest_f(h0, setup.fhkl, plan.hkl_origin, setup.default_f)
    if not plan.interpolate:
        return nearest, disabled_in
    if min(setup.fhkl.shape) < 4:  # every neighbourhood is out of range: nearest from the start
        counted_any = counted.any()
        return nearest, disabled_in | counted_any
    outside = interpolation_out_of_range(hkl, tuple(setup.fhkl.shape), plan.hkl_origin) & counted
    first_rank, rank = first_in_raster(outside)
    use_nearest = disabled_in | (rank >= first_rank)
    interpolated = tricubic_f(hkl, setup.fhkl, plan.hkl_origin)
    return torch.where(use_nearest, nearest, interpolated), disabled_in | outside.any()


def _plain_configuration(plan: Plan, has_hkl: bool) -> bool:
    """The configuration `PartialsRules` cover: square or Gaussian spots (the C program's or
    diffBragg's, `nbfunc.lattice_sum.SHAPE_ROWS`), ``default_F`` only, flat detector, no
    absorption, no resolution cut, no oversample flags, no diffuse scattering and no B factor
    (any number of sources, phi steps and mosaic domains)."""
    return (plan.shape in SHAPE_ROWS and not has_hkl and not plan.ordered
            and plan.dmin == 0 and not plan.absorption and not plan.curved and not plan.diffuse_ops
            and not plan.bfactor)


def _partials_layout(plan: Plan, weighted: bool) -> dict[str, slice]:
    """`nbfunc.lattice_sum.pixel_row_layout` of the partial sums for ``plan``."""
    return pixel_row_layout(plan.thicksteps > 1, plan.polarization, plan.n_orient,
                            plan.path_sources, weighted, plan.shape)


def _partials_rows(plan: Plan) -> int:
    """Rows of the partial sums per pixel for ``plan`` (`nbfunc.lattice_sum.pixel_rows`;
    with several sources counted with weights)."""
    return pixel_rows(plan.thicksteps > 1, plan.polarization, plan.n_orient, plan.path_sources,
                      plan.path_sources > 0, plan.shape)


def partials_apply(plan: Plan, n_pixels: int, itemsize: int, has_hkl: bool) -> bool:
    """Whether a render whose derivative may be taken uses `PartialsRules`: the plain
    configuration, every path of a pixel in one chunk, and partial sums that fit
    `PARTIALS_BUDGET`."""
    return (_plain_configuration(plan, has_hkl) and plan.single_block
            and n_pixels * _partials_rows(plan) * itemsize <= PARTIALS_BUDGET)


def _pixel_coordinates(pixel_index, plan: Plan, dtype):
    """(fast, slow) float pixel indices, each (1, P), of (1, P) int64 flat indices."""
    # row and column by float64 arithmetic, exact below 2^52 (int64 division does not vectorise)
    flat = pixel_index.to(torch.float64)
    rows = torch.floor((flat + 0.5) * (1.0 / plan.fpixels))
    return (flat - rows * plan.fpixels).to(dtype), rows.to(dtype)


def _partials_inputs(setup: Setup, orient, plan: Plan, finish, paths: Paths):
    """The 17 differentiable inputs of `nbfunc.lattice_sum.pixel_partials` (``fdet`` to
    ``background``) for a chunk of the plain configuration, with Gaussian spots its
    ``gauss`` (the reciprocal cell, ``fudge``, the off-diagonal size terms), then the paths'
    source weights when they have any (`_weighted`). With several sources the incident
    directions and wavelengths are the paths' (E, 1, 3) and (E, 1), else the one source's
    (1, 1, 3) and (1, 1)."""
    f = setup.frame
    if plan.polarization:
        e_in, b_in = (torch.stack(x) for x in polarization_axes(setup.incident[0], setup.polar_axis))
    else:
        e_in = b_in = torch.zeros_like(f.fdet)
    if plan.path_sources:
        incident, wavelength = paths.incident, paths.wavelength
    else:
        incident, wavelength = setup.incident[:1, None], setup.wavelengths[:1, None]
    weight = () if paths.weight is None else (paths.weight,)
    gauss = (setup.recip, setup.fudge, setup.n_offdiag) if plan.shape != "square" else ()
    return (f.fdet, f.sdet, f.odet, f.pix0, f.pixel_size, setup.layer_depth, incident, wavelength,
            orient, setup.n_cells, setup.default_f, f.close_distance, e_in, b_in, setup.kahn,
            *finish, *gauss, *weight)


def _weighted(inputs, plan: Plan) -> bool:
    """Whether `_partials_inputs` ended with the paths' source weights."""
    return len(inputs) > 17 + 3 * (plan.shape != "square")


class PartialsRules(StructuredRules):
    """First derivatives of `chunk_kernel` in the plain configuration (`partials_apply`) from
    per-pixel partial sums.

    The forward computes the photons per pixel with `nbfunc.lattice_sum.pixel_partials`
    (lattice sum, first-path solid angle and polarization, scale) together with, per pixel,
    the derivatives of the value with respect to its inputs, summed over the paths (the
    residual, (R, P)); the VJP is then one matrix-vector product with the incoming per-pixel
    gradient (`nbfunc.lattice_sum.pixel_partials_chain`) chained through the few (3,)-sized
    inputs (`_partials_inputs`), instead of a second pass over every evaluation. The JVP is
    that VJP's transpose (`nbfunc.derived`; eagerly written out, `jvp`). With square spots,
    second derivatives along the orientation matrices, N, the scale and the background come
    from the sums' tangent (`vjp_along`); other second and higher derivatives (all of them
    with Gaussian spots) are derived from `chunk_kernel` itself.

    With ``kernel_forward`` (eager forward mode without reverse mode where no tangent reaches
    the geometry, `_forward_mode_kernel`) the forward is `chunk_kernel` itself and keeps only
    the pixels' and paths' indices, and the JVP is derived from `chunk_kernel`: when only N,
    the spot parameters, source weights, scale, background, polarization or ``default_F``
    move, forward mode through the kernel is cheaper than the sums (its tangent touches a few
    operations). A VJP of such a call makes the sums from the inputs and the indices. With
    ``blocks`` (eager forward mode where only some rows' coefficients can move,
    `_blocks_moved`) the forward makes only those blocks' rows, and a VJP makes them all
    again.

    Gradient time over forward time on bench_1024's 256x256 ROI: see benchmarks/README.md
    ("Transforms").

    Args:
        compile: run the compiled partial sums (else eager).
        kernel_forward: the forward is the kernel's, the JVP derived from it (eager only).
        blocks: the names of the `_partials_layout` blocks the forward makes (None: all;
            eager only).
    """

    def __init__(self, compile: bool, kernel_forward: bool = False, blocks: tuple | None = None):
        self.compile, self.kernel_forward, self.blocks = compile, kernel_forward, blocks

    def forward(self, args, kwargs):
        setup, orient, _, pixel_index, paths, disabled, seen = args
        if self.kernel_forward:
            return chunk_kernel(*args, **kwargs), _fixed_indices(pixel_index, paths, kwargs["plan"],
                                                                orient.dtype)
        inputs, flags = _partials_arguments(setup, orient, pixel_index, paths, kwargs["finish"],
                                            kwargs["plan"])
        value, rows = pixel_partials_sum(*inputs, **flags, compile=self.compile, blocks=self.blocks)
        # with some blocks only, the indices too: a VJP makes every block again
        indices = () if self.blocks is None else inputs[17:]
        return {"value": value, "disabled": disabled, "seen": seen}, (rows, *indices)

    def inputs(self, args, kwargs):
        return _partials_inputs(args[0], args[1], kwargs["plan"], kwargs["finish"], args[4])

    def _rows(self, inputs, residuals, plan: Plan):
        """Every block of the partial sums (R, P): the forward's residual, or with
        ``kernel_forward`` or ``blocks`` made now from the inputs and the indices the forward
        kept."""
        if not self.kernel_forward and self.blocks is None:
            return residuals[0]
        indices = residuals if self.kernel_forward else residuals[1:]
        weighted = _weighted(inputs, plan)
        with torch.no_grad():
            return pixel_partials(*inputs[:17], *indices, weight=inputs[-1] if weighted else None,
                                  oversample=plan.oversample, per_path=plan.path_sources > 0,
                                  gauss=_gauss_argument(inputs, plan), **_partials_flags(plan))[1]

    def vjp(self, kwargs, inputs, residuals, cotangent):
        plan = kwargs["plan"]
        return _partials_vjp(cotangent["value"], self._rows(inputs, residuals, plan), inputs, plan)

    def jvp_supported(self) -> bool:
        """With the sums from the forward."""
        return not self.kernel_forward

    def batch_chunk(self, args, kwargs) -> int | None:
        """Eagerly on the CPU, with the sums made by the forward: members of a ``vmap`` batch
        per call of the forward such that each of its per-pixel arrays takes about
        `BATCH_CHUNK_BYTES` (`nbfunc.derived._BatchedRules`)."""
        orient, pixel_index = args[1], args[3]
        if self.compile or self.kernel_forward or orient.device.type != "cpu":
            return None
        return max(1, BATCH_CHUNK_BYTES // (pixel_index.shape[-1] * orient.dtype.itemsize))

    def vjp_transposable(self) -> bool:
        return not self.kernel_forward

    def jvp(self, args, kwargs, inputs, residuals, tangents):
        """The VJP's transpose written out: the chain's transpose (small: by ``torch.func.vjp``
        of `_partials_chain`, linear in the sums) gives one coefficient per row, and the
        pixels' tangent is one product with the rows (eagerly, for a Jacobian of 50 replicas
        under vmap, 11 ms against 37 ms for autograd's transpose of the VJP block by block,
        benchmarks/README.md)."""
        plan = kwargs["plan"]
        rows = residuals[0]
        layout = _partials_layout(plan, _weighted(inputs, plan))
        _, transpose = torch.func.vjp(lambda sums: _partials_chain(sums, inputs, plan),
                                      _zero_sums(layout, rows))
        coefficients = transpose(tuple(tangents))[0]
        flat = torch.cat([coefficients[name] for name in self.blocks or layout])
        return {"value": flat @ rows, "disabled": None, "seen": None}

    def vjp_along_supported(self, mask_args, mask_kwargs) -> bool:
        """Tangents of the partial sums along the orientation matrices, N, the scale and the
        background (`nbfunc.lattice_sum.pixel_partials_tangent`), and along set-up fields
        that the sums do not read: Hessians with respect to the cell, the misset, the mosaic
        spread, the phi angles, N, the fluence and G. Square spots only, with the sums made by
        the forward."""
        if mask_kwargs["plan"].shape != "square" or self.kernel_forward or self.blocks is not None:
            return False
        setup, _, *others = mask_args
        read = [getattr(setup, name) for name in _SUMS_READ] + others
        return not any(m is True for m in tree_leaves(read))

    def vjp_along(self, args, kwargs, inputs, residuals, tangents_args, tangents_kwargs, cotangent):
        setup, orient, _, pixel_index, paths, _, _ = args
        t_orient, t_n = tangents_args[1], tangents_args[0].n_cells
        t_background = tangents_kwargs["finish"][1]
        if t_orient is None and t_n is None and t_background is None:
            # the scale alone: the sums do not move
            sums = _zero_sums(_partials_layout(kwargs["plan"], _weighted(inputs, kwargs["plan"])),
                              residuals[0])
        else:
            full, flags = _partials_arguments(setup, orient, pixel_index, paths, kwargs["finish"],
                                              kwargs["plan"])
            weight = flags.pop("weight")
            flags.pop("gauss")  # None: square spots (`vjp_along_supported`)
            if t_orient is None and t_n is None:  # the lattice sums hold still
                t_n = torch.zeros_like(setup.n_cells)
            if t_background is None:
                t_background = torch.zeros_like(kwargs["finish"][1])
            sums = pixel_partials_tangent(*full, weight=weight, grad_v=cotangent["value"],
                                          t_orient=t_orient, t_n=t_n, t_background=t_background,
                                          **flags)
        return _partials_chain(sums, inputs, kwargs["plan"])


def _geometry(setup: Setup, orient) -> list:
    """The tensors of a chunk's geometry: orientations, detector frame, incident directions
    and wavelengths (from which the paths' follow), layer depth, reciprocal cell."""
    return tree_leaves([orient, setup.frame, setup.incident, setup.wavelengths, setup.layer_depth,
                        setup.recip])


def _forward_mode_kernel(setup: Setup, orient, first_orient, pixel_index, paths: Paths, *args,
                         plan: Plan, finish, **kwargs):
    """The eager partials kernel in forward mode without reverse mode: where a tangent reaches
    the geometry (`_geometry`) the forward makes the sums and the JVP takes them, only the
    blocks whose coefficients the tangents move (`_blocks_moved`) (a pull-test call of 50
    replicas x 7 leaves, benchmarks/README.md: ~120 -> 102-106 ms against the kernel's
    forward and the JVP making the sums, -> 86-92 ms with 26 of 46 rows); elsewhere, or
    where the tangents cannot be read here (a ``vmap`` inside ``jvp``), the kernel's forward
    and its own JVP (`PartialsRules` ``kernel_forward``)."""
    call = (setup, orient, first_orient, pixel_index, paths, *args)
    if not innermost_tangent(_geometry(setup, orient)):
        return _partials_kernel(False, kernel_forward=True)(*call, plan=plan, finish=finish, **kwargs)
    inputs = _partials_inputs(setup, orient, plan, finish, paths)
    blocks = _blocks_moved(plan, inputs, tuple(bool(innermost_tangent([x])) for x in inputs))
    return _partials_kernel(False, blocks=blocks)(*call, plan=plan, finish=finish, **kwargs)


_BLOCKS_MOVED: dict = {}
"""`_blocks_moved`'s answers, by plan, input shapes and moving inputs."""


def _blocks_moved(plan: Plan, inputs, moving: tuple) -> tuple | None:
    """The `_partials_layout` blocks whose JVP coefficients (the chain's transpose,
    `PartialsRules.jvp`) the tangents of the `_partials_inputs` marked True in ``moving`` can
    make other than zero, in layout order; None when that is every block.

    Read from the chain's structure: a block counts when a moving input's gradient
    (`_partials_chain`) depends on its sums, on stand-in inputs of the same shapes (the
    dependence does not depend on the values)."""
    weighted = _weighted(inputs, plan)
    key = (plan, weighted, tuple(tuple(x.shape) for x in inputs), moving)
    if key not in _BLOCKS_MOVED:
        layout = _partials_layout(plan, weighted)
        stand_ins = [torch.ones(x.shape, dtype=torch.float64) for x in inputs]
        needed = []
        with torch.enable_grad():
            for name in layout:
                sums = {k: torch.ones(b.stop - b.start, dtype=torch.float64, requires_grad=k == name)
                        for k, b in layout.items()}
                grads = _partials_chain(sums, stand_ins, plan)
                if any(m and g.requires_grad for g, m in zip(grads, moving)):
                    needed.append(name)
        _BLOCKS_MOVED[key] = None if len(needed) == len(layout) else tuple(needed)
    return _BLOCKS_MOVED[key]


BATCH_CHUNK_BYTES = 1 << 19
"""Bytes of one per-pixel array of a chunk of a batched eager forward with the partial sums
(`PartialsRules.batch_chunk`): a few hundred of them are made one after another, and
arrays that stay in the cores' caches make each operation faster. Measured on two cores
(2 MiB of cache each), one pull-test call of 125 replicas x 7 leaves: 64x64 pixels 189 ->
175 ms with 16 members per call (8: 254, 12: 181, 24: 189 ms), 128x128 pixels 0.92-1.17 ->
0.72 s with 4 (2: 1.10, 8: 0.74, 16: 0.79 s), 32x32 pixels 66 ms with all 125 and
67.7 ms with 64 (16: 88 ms)."""


_SUMS_READ = ("frame", "incident", "wavelengths", "polar_axis", "kahn", "default_f",
              "layer_depth", "weights")
"""The `Setup` fields that the pixel partial sums read (`_partials_inputs`, `path_block`),
besides ``n_cells`` (`PartialsRules.vjp_along`)."""


def _partials_flags(plan: Plan) -> dict:
    """The static flags of `nbfunc.lattice_sum.pixel_partials` and its VJP for ``plan``."""
    return {"layered": plan.thicksteps > 1, "point_pixel": plan.point_pixel,
            "polarized": plan.polarization}


def _partials_arguments(setup: Setup, orient, pixel_index, paths: Paths, finish, plan: Plan):
    """The positional arguments and the keyword flags of `nbfunc.lattice_sum.pixel_partials`
    for a chunk of the plain configuration."""
    differentiable = _partials_inputs(setup, orient, plan, finish, paths)
    inputs = (*differentiable[:17], *_fixed_indices(pixel_index, paths, plan, orient.dtype))
    return inputs, {"oversample": plan.oversample, "weight": paths.weight, **_partials_flags(plan),
                    "per_path": plan.path_sources > 0,
                    "gauss": _gauss_argument(differentiable, plan)}


def _fixed_indices(pixel_index, paths: Paths, plan: Plan, dtype) -> tuple:
    """`nbfunc.lattice_sum.pixel_partials`' fixed indices: (fast, slow) pixel indices, each
    (1, P), and the paths' sub-pixel and layer indices, each (E, 1)."""
    return (*_pixel_coordinates(pixel_index, plan, dtype), paths.sub_f, paths.sub_s, paths.layer)


def _gauss_argument(differentiable, plan: Plan):
    """`nbfunc.lattice_sum.pixel_partials`' ``gauss`` from the `_partials_inputs`: None for
    square spots; diffBragg's Gaussian does not read the reciprocal cell (None in its place)."""
    if plan.shape == "square":
        return None
    recip, fudge, n_offdiag = differentiable[17:20]
    return (recip if plan.shape == "gauss" else None, fudge, n_offdiag)


def _zero_sums(layout: dict[str, slice], like: torch.Tensor) -> dict:
    """Zero weighted sums of the partial sums by block of ``layout`` (`row_sums`)."""
    return {name: like.new_zeros(block.stop - block.start) for name, block in layout.items()}


def _partials_vjp(grad_value, rows, inputs, plan: Plan):
    """The gradients of the `_partials_inputs` from the incoming per-pixel gradient (P,) and
    the partial sums (R, P)."""
    layout = _partials_layout(plan, _weighted(inputs, plan))
    return _partials_chain(row_sums(rows, grad_value, layout), inputs, plan)


def _partials_chain(sums, inputs, plan: Plan):
    """`nbfunc.lattice_sum.pixel_partials_chain`: the gradients of the `_partials_inputs` from
    the rows' weighted sums ``sums`` (by block, `row_sums`)."""
    (fdet, sdet, odet, _, pixel_size, layer_depth, _, wavelength, orient, n_cells, default_f,
     close_distance, _, _, _, scale, background) = inputs[:17]
    return pixel_partials_chain(sums, fdet, sdet, odet, pixel_size, layer_depth, wavelength,
                                orient, n_cells, default_f, close_distance, scale, background,
                                **_partials_flags(plan), n_path=plan.path_sources,
                                weighted=_weighted(inputs, plan), shape=plan.shape)


class ImagePartialsRules(StructuredRules):
    """`PartialsRules` for `image_kernel` without a carry: a render whose pixels fit one chunk
    is one call (set-up and chunk), whose VJP chains the partial sums through the set-up's
    VJP, instead of two calls, each with its own forward and backward.

    Args:
        compile: run the compiled set-up and partial sums (else eager).
    """

    def __init__(self, compile: bool):
        self.compile = compile
        self.chunk = PartialsRules(compile)

    def forward(self, args, kwargs):
        p, _, pixel_index = args
        plan = kwargs["plan"]
        if self.compile and (plan.n_paths <= PATHS_PER_CALL or plan.n_orient > 1):
            with torch.no_grad():
                value, seen, rows = _compiled_image_partials(p, pixel_index, plan=plan)
            return (value, seen, None), (rows,)
        setup, orient, _, _, finish = (_compiled_image_setup if self.compile else image_setup)(
            p, None, plan=plan)
        state = torch.zeros((), dtype=torch.bool, device=orient.device)
        out, residuals = self.chunk.forward(
            (setup, orient, None, pixel_index, path_block(setup, plan, 0, plan.n_paths), state, state),
            {"plan": plan, "finish": finish})
        return (out["value"], out["seen"], None), residuals

    def inputs(self, args, kwargs):
        plan = kwargs["plan"]
        setup, orient, _, _, finish = image_setup(args[0], None, plan=plan)
        return _partials_inputs(setup, orient, plan, finish, path_block(setup, plan, 0, plan.n_paths))

    def vjp(self, kwargs, inputs, residuals, cotangent):
        return _partials_vjp(cotangent[0], residuals[0], inputs, kwargs["plan"])


def pixel_values(plan: Plan, scale, intensity, capture_last, polar_found, polar_first, omega_first):
    """Photons per pixel from the accumulated sum and the per-pixel "first/last" factors.

    Args:
        scale: 0-d ``r_e^2 fluence G / steps`` (m^2 times photons/m^2, divided by the number
            of sub-pixels x sources x orientations);
        intensity: (P,) accumulated ``F^2 F_latt^2`` sum, background included;
        capture_last, polar_first, omega_first: (P,) the factors found by the chunks
            (omega in sr); polar_found: (P,) bool, a path passed the resolution cut.
    Returns:
        (P,) photons per pixel.
    """
    value = scale * intensity
    if not plan.oversample_thick:
        value = value * capture_last
    if not plan.oversample_polar:
        value = value * torch.where(polar_found, polar_first, 0.0)
    if not plan.oversample_omega:
        value = value * omega_first
    return value


def chunk_kernel(setup: Setup, orient: torch.Tensor, orient_first: torch.Tensor | None,
                 pixel_index, paths: Paths, disabled_in, seen_in,
                 plan: Plan, omega_col: int, capture_col: int, finish=None):
    """Accumulate one chunk: a tile of pixels, a block of paths, all orientations.

    Args:
        orient: (O, 3, 3) cell matrices (rows a, b, c in m) for every (phi, mosaic).
        orient_first: (O, 3, 3) the matrices for the first evaluation of a carry render, or None.
        pixel_index: (1, P) int64 flat pixel indices ``slow * fpixels + fast``.
        disabled_in, seen_in: 0-d bool states carried between chunks in raster order.
        omega_col, capture_col: path columns holding the "first omega" and "last capture"
            values, or -1 when this block does not contain them.
        finish: ``(scale, background)`` 0-d tensors when this block holds every path of its
            pixels: the kernel then also applies `pixel_values` (fused into the same loops).
    Returns:
        dict with ``A``, ``B`` (P,) (the chunk's map ``I <- A I + B``), ``polar_found``,
        ``polar_first`` (P,), optional ``omega``/``capture`` (P,), ``disabled``, ``seen``;
        with ``finish``, only ``value`` (P,) photons per pixel, ``disabled`` and ``seen``.
    """
    fpix, spix = _pixel_coordinates(pixel_index, plan, setup.incident.dtype)
    out = _chunk_sums(setup, orient, orient_first, fpix, spix, paths, disabled_in, seen_in,
                      plan, omega_col, capture_col)
    if finish is None:
        return out
    scale, background = finish
    value = pixel_values(plan, scale, background * out["A"] + out["B"], out["capture"],
                         out["polar_found"], out["polar_first"], out["omega"])
    return {"value": value, "disabled": out["disabled"], "seen": out["seen"]}


def _chunk_sums(setup: Setup, orient, orient_first, fpix, spix, paths: Paths, disabled_in,
                seen_in, plan: Plan, omega_col: int, capture_col: int):
    diffracted, airpath, incident, q, culled = path_rays(setup, plan, fpix, spix, paths)
    per_path = plan.ordered or plan.dmin > 0
    if per_path:
        omega, capture, polar = path_factors(setup, plan, diffracted, airpath, incident, paths.layer)
    alive = ~culled
    # with a single orientation the orientation axis is dropped, so that every (E, P) step
    # of the chunk runs in one fused loop
    single = orient.shape[0] == 1
    per_orient = (lambda x: x) if single else (lambda x: x[..., None])
    hkl = per_orientation(miller_indices(q, orient), orient)
    seen = seen_in
    if orient_first is not None:
        first_rank, rank = first_in_raster(alive)
        first = (rank == first_rank) & ~seen_in
        hkl_first = per_orientation(miller_indices(q, orient_first), orient_first)
        hkl = tuple(torch.where(per_orient(first), a, b) for a, b in zip(hkl_first, hkl))
        seen = seen_in | alive.any()
    n_cells = setup.n_cells
    f_latt = lattice_factor(plan.shape, hkl, setup.recip, n_cells, setup.fudge, setup.n_offdiag)
    # nanoBragg skips an evaluation whose F_latt is 0 (without water background): the skip
    # matters for the interpolation switch-off and the oversample_* factors; otherwise the
    # term is 0 anyway and the (slow) boolean mask is left out
    if plan.interpolate or plan.ordered or plan.dmin > 0:
        if plan.diffuse_ops:  # diffuse scattering adds to every evaluation, F_latt = 0 or not
            counted = torch.broadcast_to(per_orient(alive), f_latt.shape)
        else:
            counted = per_orient(alive) & ((f_latt != 0) | (setup.water != 0))
    else:
        counted = None
    f_cell, disabled = structure_factor(setup, plan, hkl, counted, disabled_in)
    if plan.diffuse_ops or plan.bfactor:
        h0 = nearest_indices(hkl)
    if plan.diffuse_ops:
        # diffBragg: I = F_cell^2 (F_latt^2 + I_D) (`nbfunc.diffuse.diffuse_intensity`)
        dh = tuple(x - x0 for x, x0 in zip(hkl, h0))
        term = f_cell * f_cell * (f_latt * f_latt + diffuse_intensity(
            h0, dh, setup.diffuse_disorder, setup.diffuse_correlation, setup.diffuse_peak))
    else:
        term = (f_cell * f_latt) ** 2
    if plan.bfactor:
        term = term * debye_waller(h0, setup.bfactor_form)
    if paths.weight is not None:
        term = term * per_orient(paths.weight)
    if counted is not None:
        term = torch.where(counted, term, 0.0)
    out = {"disabled": disabled, "seen": seen}
    if plan.ordered:
        factor = torch.ones_like(omega)
        if plan.oversample_thick:
            factor = factor * capture
        if plan.oversample_polar:
            factor = factor * polar
        if plan.oversample_omega:
            factor = factor * omega
        factor = torch.where(counted, per_orient(factor), 1.0).transpose(0, 1).flatten(1)
        tail = torch.flip(torch.cumprod(torch.flip(factor, (1,)), 1), (1,))
        out["A"] = tail[:, 0]
        out["B"] = (term.transpose(0, 1).flatten(1) * tail).sum(1)
    else:
        out["A"] = torch.ones_like(airpath[0])
        out["B"] = term.sum(0) if single else term.sum((0, 2))
    if per_path:
        index = torch.argmax(alive.to(torch.int8), dim=0)
        out["polar_found"] = alive.any(0)
        out["polar_first"] = torch.gather(polar, 0, index[None])[0]
        if omega_col >= 0:
            out["omega"] = omega[omega_col]
        if capture_col >= 0:
            out["capture"] = capture[capture_col]
        return out
    # without per-path factors only two columns matter: the first path (omega, polarization)
    # and the first sub-pixel of the last layer (capture fraction)
    if not plan.absorption:
        if capture_col >= 0:
            out["capture"] = torch.ones_like(out["A"])
        capture_col = -1
    cols = sorted({c for c in (omega_col, capture_col) if c >= 0})
    if cols:
        pick = lambda x: x[cols]
        omega_c, capture_c, polar_c = path_factors(
            setup, plan, tuple(pick(x) for x in diffracted), pick(airpath),
            tuple(pick(x) for x in incident), paths.layer[cols])
        if omega_col >= 0:
            out["omega"], out["polar_first"] = omega_c[cols.index(omega_col)], polar_c[cols.index(omega_col)]
            out["polar_found"] = torch.ones_like(out["omega"], dtype=torch.bool)
        if capture_col >= 0:
            out["capture"] = capture_c[cols.index(capture_col)]
    if "polar_found" not in out:
        out["polar_found"] = torch.zeros_like(out["A"], dtype=torch.bool)
        out["polar_first"] = torch.zeros_like(out["A"])
    return out


_compiled_kernel = compiled(chunk_kernel, static_argnames=("plan", "omega_col", "capture_col"))

_eager_kernel = per_call_under_transforms(chunk_kernel)
"""The eager `chunk_kernel`; under torch.func transforms one chunk at a time (memory)."""



# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------
def _carry_orientations(real, phi_rot, phi, carry: torch.Tensor):
    """Spindle orientations of one evaluation started from ``carry``, with phi=0 reuse.

    Returns:
        ((phi, 3, 3) orientations, the orientation left after the last step).
    """
    state, steps = carry, []
    for i in range(phi_rot.shape[0]):
        rotated = real @ phi_rot[i].transpose(-1, -2)
        state = torch.where(phi[i] != 0, rotated, state)
        steps.append(state)
    return torch.stack(steps), state


def image_setup(p: Params, carry_orientation: torch.Tensor | None, plan: Plan):
    """Everything a render needs before its chunks: `prepare`, the orientation matrices and
    the scale factors.

    Args:
        carry_orientation: (3, 3) the phi carry's orientation (C-parity path), or None.
    Returns:
        (setup, orientations (O, 3, 3), first-evaluation orientations or None, the carry's
        orientation after this render or None, ``finish``: (scale 0-d ``r_e^2 fluence G /
        steps`` (m^2 photons/m^2), water background over G 0-d (photons/sr)) in the
        orientations' dtype, as `chunk_kernel` takes them: the per-shot scale G multiplies
        the crystal's photons and leaves the water's. The weight of a single listed source
        is folded into G the same way (the returned setup then has no weights); with several
        sources each path's term is multiplied by its source's weight in `chunk_kernel`.
    """
    setup, real, phi_rot, mosaic_rot = prepare(p)
    first_orient = after = None
    if carry_orientation is None:
        orient = orientation_matrices(real @ phi_rot.transpose(-1, -2), mosaic_rot)
    else:
        phi = phi_angles(p.crystal)
        steps_first, after = _carry_orientations(real, phi_rot, phi, carry_orientation)
        steps_rest, _ = _carry_orientations(real, phi_rot, phi, after)
        first_orient = orientation_matrices(steps_first, mosaic_rot)
        orient = orientation_matrices(steps_rest, mosaic_rot)
    fluence = p.beam.fluence
    steps = plan.n_sources * plan.n_orient * plan.oversample**2
    # G scales the crystal's photons only: the scale takes G and the water background 1/G
    # (exact for G = 1), so every path of the renderer, `PartialsRules` included, applies it.
    # The weight of a single source is folded in the same way (weights are validated > 0 then)
    g = p.crystal.G
    if setup.weights is not None and plan.n_sources == 1:
        g = g * setup.weights[0]
        setup = setup._replace(weights=None)
    finish = tuple(torch.as_tensor(x, dtype=orient.dtype, device=orient.device)
                   for x in (R_E_SQR * fluence * g / steps, water_background(setup.water, fluence) / g))
    return setup, orient, first_orient, after, finish


# the set-up is some hundred small operations: compiled, its forward and backward each run as
# a few loop nests instead of hundreds of eager calls
_compiled_image_setup = compiled(image_setup, static_argnames=("plan",))


def image_kernel(p: Params, carry_orientation: torch.Tensor | None, pixel_index: torch.Tensor,
                 plan: Plan, capture_col: int):
    """`image_setup` and `chunk_kernel` for a render whose pixels and paths fit one chunk.

    Compiled, the two run as one graph (one call, one autograd node).

    Returns:
        ((P,) photons per pixel, 0-d bool: an evaluation was made, the carry's orientation
        after the render or None).
    """
    setup, orient, first_orient, after, finish = image_setup(p, carry_orientation, plan=plan)
    state = torch.zeros((), dtype=torch.bool, device=orient.device)
    out = chunk_kernel(setup, orient, first_orient, pixel_index, path_block(setup, plan, 0, plan.n_paths),
                       state, state, plan=plan, omega_col=0, capture_col=capture_col, finish=finish)
    return out["value"], out["seen"], after


_one_call_kernel = compiled(image_kernel, static_argnames=("plan", "capture_col"))
"""The compiled `image_kernel`, for compiled renders that fit one chunk and record no graph."""


def image_partials(p: Params, pixel_index: torch.Tensor, plan: Plan):
    """`image_setup` and the pixel partial sums (`nbfunc.lattice_sum.pixel_partials`) of a
    plain-configuration render that fits one chunk, as one function: compiled, one call (and
    one set of guards) instead of two for a gradient's forward.

    Returns:
        ((N,) photons, 0-d False (the carry's state, unused without a carry), (R, N) partial
        sums).
    """
    setup, orient, _, _, finish = image_setup(p, None, plan=plan)
    inputs, flags = _partials_arguments(setup, orient, pixel_index,
                                        path_block(setup, plan, 0, plan.n_paths), finish, plan)
    value, rows = pixel_partials(*inputs, **flags)
    return value, torch.zeros((), dtype=torch.bool, device=value.device), rows


_compiled_image_partials = compiled(image_partials, static_argnames=("plan",),
                                    options=PARTIALS_OPTIONS)

_PARTIALS: dict = {}
"""By `_partials_kernel`'s arguments: the derived functions with `PartialsRules` or
`ImagePartialsRules`, and the rules (made at the first call with them)."""


def _partials_kernel(compile: bool, one_call: bool = False, kernel_forward: bool = False,
                     blocks: tuple | None = None):
    """`chunk_kernel` (or with ``one_call`` `image_kernel`) with the pixel partials for its
    first derivatives (`nbfunc.derived`), compiled or eager; eagerly, with ``kernel_forward``
    the `chunk_kernel` whose forward and JVP are its own and whose VJP makes the sums, with
    ``blocks`` the one whose forward makes those blocks of the sums only (`PartialsRules`)."""
    key = (compile, one_call, kernel_forward, blocks)
    if key not in _PARTIALS:
        _PARTIALS[key] = ({}, ImagePartialsRules(compile) if one_call
                          else PartialsRules(compile, kernel_forward, blocks))
    cache, rules = _PARTIALS[key]
    fn = image_kernel if one_call else chunk_kernel

    def kernel(*args, **kwargs):
        return derived_call(cache, fn, f"{fn.__name__}_partials", args, kwargs,
                            report_failure, compile=compile, rules=rules)
    return kernel


def _check_renderable(p) -> None:
    """Refuse, in one line, what is not one tree: another object, or a stacked tree
    (`nbfunc.stack`) outside ``torch.func.vmap``."""
    if not isinstance(p, Params):
        raise TypeError(f"expected an nbfunc.Params tree, got {type(p).__name__}; build one with "
                        "nbfunc.params_from_args(flags) or nbfunc.Params(...)")
    if p.beam.wavelength.dim() != 0 and not in_functorch_transform():
        raise ValueError(f"this tree is a stack of {p.beam.wavelength.shape[0]} trees (beam."
                         f"wavelength has shape {tuple(p.beam.wavelength.shape)}); render it "
                         "with torch.func.vmap(nbfunc.simulate)(tree), or one tree at a time")


# torch.compile applied by a user over a render (``torch.compile(torch.func.grad(loss))``) runs
# the render as nbfunc runs it: dynamo tracing the orchestrator from outside took over ten
# minutes per call and then marked nbfunc's frames as skipped, so that later renders ran eagerly
@torch.compiler.disable
def _render(p: Params, carry: PhiCarry | None, compile: bool | None = None, progress=None,
            full_image: bool = True):
    """Render ``p``: the (slow, fast) image, or with ``full_image=False`` the (N,) rendered
    pixels in raster order; and the carry after the render (None without ``carry``).

    ``compile``: run the compiled kernel (when compilation is on) or the eager one; None
    decides by the eager work done so far (`nbfunc.compile.COMPILE_AFTER`). The decision is
    made here, once per render, and every chunk follows it."""
    check_settings()
    _check_renderable(p)
    plan, pixel_list = make_plan(p)
    n_pix = len(pixel_list)
    if compile is None:
        compile = _compiled_kernel.worth_compiling(plan.evaluations(n_pix))
    compiled_now = compile and _compiled_kernel.runs_compiled()
    tensors = [x for x in tree_leaves(p) if isinstance(x, torch.Tensor)]
    if in_functorch_transform():
        differentiated = not only_batching(tensors)
    else:
        differentiated = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    partials = differentiated and carry is None and partials_apply(
        plan, n_pix, p.crystal.cell_a.dtype.itemsize, p.crystal.fhkl.numel() > 0)
    # derivatives outside the partial sums: forward mode is faster with small chunks, reverse
    # mode with large ones (loop_heavy, compiled: jacfwd 0.64 s against 0.96 s, grad 171 ms
    # against 145 ms)
    if not compiled_now or (differentiated and not partials and forward_mode_active()):
        plan = plan.chunked(p.sampling.chunk or SMALL_CHUNK, n_pix)
    elif partials and not p.sampling.chunk and not forward_mode_active():
        plan = plan.chunked(PARTIALS_CHUNK, n_pix)
    if partials:
        # eager forward mode alone: the sums where a tangent reaches the geometry
        forward_only = not compiled_now and forward_mode_active() and not second_order_active()
        kernel = _forward_mode_kernel if forward_only else _partials_kernel(compiled_now)
    else:
        kernel = _compiled_kernel if compiled_now else _eager_kernel
    carry_orientation = None if carry is None else carry.orientation
    pixels = pixel_list.to(p.crystal.cell_a.device)
    one_call = plan.single_block and n_pix == plan.tile
    # with the partial sums, one call for set-up and chunk makes reverse mode faster (bench_roi
    # gradient 13.5 -> 10.2 ms) but forward mode slower (jacfwd of 10 leaves 36 -> 52 ms: its
    # JVP transposes the set-up's VJP inside the call), so forward mode keeps the two calls
    if one_call and partials and forward_mode_active():
        one_call = False
    if one_call and (partials or (compiled_now and not differentiated)):
        run = _partials_kernel(compiled_now, one_call=True) if partials else _one_call_kernel
        value, seen, after = run(p, carry_orientation, pixels[None], plan=plan,
                                 capture_col=plan.capture_path)
        if progress is not None:
            progress(1, 1)
    else:
        # under a Hessian with the partial sums the set-up runs eagerly (some hundred small
        # operations): its outputs that no moving leaf reaches then carry no tangent, which
        # the sums' second-order route needs to see (`PartialsRules.vjp_along_supported`;
        # the compiled set-up's derived JVP gives every output a tangent)
        eager_setup = not compiled_now or (partials and second_order_active())
        value, seen, after = _render_chunks(p, plan, pixels, kernel, carry_orientation,
                                            image_setup if eager_setup else _compiled_image_setup,
                                            progress)
    out = _assemble(p, plan, pixels, value) if full_image else value
    if carry is None:
        return out, None
    return out, PhiCarry(torch.where(seen, after, carry.orientation))


def _render_chunks(p: Params, plan: Plan, pixels, kernel, carry_orientation, image_setup_now, progress):
    """The set-up, then every chunk in raster order.

    Returns:
        ((N,) photons of the rendered pixels, 0-d bool: an evaluation was made, the carry's
        orientation after the render or None).
    """
    n_pix = len(pixels)
    capture_path = plan.capture_path
    setup, orient, first_orient, after, finish = image_setup_now(p, carry_orientation, plan=plan)
    dtype, device = orient.dtype, orient.device
    disabled = torch.zeros((), dtype=torch.bool, device=device)
    seen = torch.zeros((), dtype=torch.bool, device=device)
    values = []
    n_chunks, done = plan.chunks(n_pix), 0
    for start in range(0, n_pix, plan.tile):
        idx = pixels[start:start + plan.tile]
        pad = plan.tile - idx.shape[0]
        if pad:  # the last tile keeps the common shape (no recompilation)
            idx = torch.cat([idx, idx[-1:].expand(pad)])
        idx = idx[None]
        if plan.single_block:
            out = kernel(setup, orient, first_orient, idx, path_block(setup, plan, 0, plan.n_paths),
                         disabled, seen, plan=plan, omega_col=0, capture_col=capture_path,
                         finish=finish)
            disabled, seen = out["disabled"], out["seen"]
            done += 1
            if progress is not None:
                progress(done, n_chunks)
            value = out["value"]
        else:
            intensity = finish[1].expand(idx.shape[1:])
            polar_found = torch.zeros(idx.shape[1:], dtype=torch.bool, device=device)
            polar_first = torch.zeros(idx.shape[1:], dtype=dtype, device=device)
            omega_first = capture_last = None
            for e0 in range(0, plan.n_paths, plan.block):
                e1 = min(e0 + plan.block, plan.n_paths)
                capture_col = capture_path - e0 if e0 <= capture_path < e1 else -1
                paths = path_block(setup, plan, e0, e1)
                out = kernel(setup, orient, first_orient, idx, paths, disabled, seen,
                             plan=plan, omega_col=0 if e0 == 0 else -1, capture_col=capture_col)
                disabled, seen = out["disabled"], out["seen"]
                done += 1
                if progress is not None:
                    progress(done, n_chunks)
                intensity = intensity * out["A"] + out["B"]
                polar_first = torch.where(polar_found, polar_first, out["polar_first"])
                polar_found = polar_found | out["polar_found"]
                omega_first = out.get("omega", omega_first)
                capture_last = out.get("capture", capture_last)
            value = pixel_values(plan, finish[0], intensity, capture_last, polar_found,
                                 polar_first, omega_first)
        values.append(value[:value.shape[0] - pad] if pad else value)
    if len(values) == 1:
        return values[0], seen, after
    return (torch.cat(values) if values else torch.zeros(0, dtype=dtype, device=device)), seen, after


def _assemble(p: Params, plan: Plan, pixels, flat: torch.Tensor) -> torch.Tensor:
    """The (slow, fast) image from the (N,) rendered pixel values (raster order, at flat
    indices ``pixels``), 0 elsewhere.

    A rectangle is padded (one write, a slice in the backward); a masked pixel list is
    scattered into zeros."""
    box = roi_box(p)
    if box is None:
        image = torch.zeros(plan.spixels * plan.fpixels, dtype=flat.dtype, device=flat.device)
        return image.index_put((pixels,), flat).reshape(plan.spixels, plan.fpixels)
    x0, x1, y0, y1 = box
    block = flat.reshape(y1 - y0 + 1, x1 - x0 + 1)
    if block.shape == (plan.spixels, plan.fpixels):
        return block
    return torch.nn.functional.pad(block, (x0, plan.fpixels - 1 - x1, y0, plan.spixels - 1 - y1))


def simulate(p: Params) -> torch.Tensor:
    """Render the noiseless image in photons per pixel, shape (slow, fast).

    Physically correct rotation: every phi step rotates the cell by its own angle. Pixels
    outside ``sampling.roi`` or masked are 0, as in nanoBragg. Pure and deterministic; works
    under ``torch.func`` transforms (``vmap``, ``jacfwd``, ``jacrev``, ``hessian``).

    >>> image = simulate(params_from_args(["-cell", "50", "50", "50", "90", "90", "90",
    ...                                    "-default_F", "100", "-N", "5", "-detpixels", "32"]))  # doctest: +SKIP
    """
    return _render(p, None)[0]


def simulate_pixels(p: Params) -> torch.Tensor:
    """Only the rendered pixels of `simulate`: the ROI and mask pixels, (N,) photons per
    pixel in raster order; `rendered_pixels` gives their flat indices.

    Equal to ``simulate(p).reshape(-1)[rendered_pixels(p)]`` without the full-detector image,
    so a fit over a small region does not fill, scatter and gather a whole detector (and
    its gradient) per evaluation. Works under ``torch.func`` transforms like `simulate`.
    """
    return _render(p, None, full_image=False)[0]


def render_pixels_for_cli(p: Params, carry: PhiCarry, compile: bool,
                          progress=None) -> tuple[torch.Tensor, torch.Tensor, PhiCarry]:
    """`simulate_with_carry` for the command line, without the full-detector image: memory
    follows the ROI and the chunk size, not the detector. ``compile``: run the compiled kernel
    (the command line renders small images eagerly, because a compile would cost more than it
    saves); ``progress(done, total)`` is called after every chunk when given.

    Returns:
        ((N,) photons per rendered pixel in raster order, (N,) int64 flat indices
        ``slow * fpixels + fast`` of those pixels (`rendered_pixels`), carry after the render).
        Where ``sampling.mask`` is None the pixels are the rectangle `roi_box`, row by row.
    """
    values, after = _render(p, carry, compile, progress, full_image=False)
    return values, rendered_pixels(p), after


def evaluation_count(p: Params) -> int:
    """Number of (pixel, layer, sub-pixel, source, phi, mosaic) evaluations of a render."""
    plan, pixels = make_plan(p)
    return plan.evaluations(len(pixels))


def initial_carry(p: Params) -> PhiCarry:
    """The carry before any evaluation: the unrotated cell (rows a, b, c in m)."""
    real, _ = oriented_cell(p.crystal)
    return PhiCarry(real)


def simulate_with_carry(p: Params, carry: PhiCarry) -> tuple[torch.Tensor, PhiCarry]:
    """Render reproducing nanoBragg's phi carryover (C-parity path).

    At every phi step whose angle is exactly 0 the C program keeps the previous rotated cell
    instead of rotating by 0: the previous step of the same evaluation or, for the first step,
    the last step of the previous evaluation in raster order (pixel, layer, sub-pixel,
    source). ``carry`` is that state before this render (`initial_carry` for a fresh run); the
    returned carry is the state after its last evaluation, so rendering ROI tiles in raster
    order while threading the carry equals one render.

    Returns:
        (image (slow, fast) in photons per pixel, carry after the render).
    """
    return _render(p, carry)
