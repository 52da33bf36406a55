"""The per-pixel lattice sum of the common configuration, with a hand-written gradient.

``B = sum over paths and orientations of (F F_latt)^2`` per pixel, for a square crystal with
``default_F`` only, a flat detector, no absorption, no resolution cut and no oversample
flags. Compiled renders that record an autograd graph in that configuration call it as the
custom operator ``nbfunc::lattice_sum``: its forward and its backward
(``nbfunc::lattice_sum_vjp``) each run as their own compiled function, opaque to the
compiled chunk kernel around them. Autograd through the renderer's own code made inductor's
backward several times the forward (many loops over the chunk, each storing per-evaluation
arrays); the hand-written backward accumulates every parameter gradient in few loops.

With one source and one orientation, and when the memory is small (`render` decides), the
operator ``nbfunc::lattice_partials`` is used instead: its forward also accumulates, per
pixel, the few sums from which every parameter gradient follows (`lattice_partials`), so the
backward is one matrix-vector product (`partials_vjp`, traced into the chunk kernel's
compiled backward) instead of a second pass over every evaluation.

torch.func transforms and double backward run the eager renderer, which does not use the
operators, so they need no jvp or vmap rule.
"""
from __future__ import annotations

import contextlib
import math

import torch

from nbfunc.compile import compiled
from nbfunc.detector import flat_positions
from nbfunc.lattice import grating_and_derivatives, square_lattice

DIFFERENTIABLE = 11
"""`lattice_sum` inputs ``fdet`` to ``default_f`` have gradients; the pixel and path indices
after them do not."""
OPERATOR_ARGS = 18
"""Arguments of the operators ``nbfunc::lattice_sum`` and ``nbfunc::lattice_partials``: the
16 tensors of `lattice_sum`, ``oversample`` and ``layered``."""


def miller_indices(q, orient: torch.Tensor):
    """Fractional indices ``h = a.q, k = b.q, l = c.q`` for every orientation.

    Args:
        q: three (E, P) components of the scattering vector (1/m); orient: (O, 3, 3) rows
            a, b, c (m).
    Returns:
        (h, k, l), each (E, P, O), dimensionless.
    """
    qx, qy, qz = (x[..., None] for x in q)
    return tuple(qx * orient[:, i, 0] + qy * orient[:, i, 1] + qz * orient[:, i, 2] for i in range(3))


def per_orientation(hkl, orient):
    """Drop the orientation axis of (E, P, O) indices when there is one orientation."""
    return tuple(x[..., 0] for x in hkl) if orient.shape[0] == 1 else hkl


def sum_to(x: torch.Tensor, shape) -> torch.Tensor:
    """Sum an (E, P) array over the axes where ``shape`` (one path or every path, 1 pixel) is 1."""
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(dims, keepdim=True) if dims else x


def plain_geometry(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
                   fpix, spix, sub_f, sub_s, layer, oversample):
    """`lattice_sum`'s geometry, as the renderer's `path_rays` and `miller_indices` compute it.

    Returns:
        (Fdet, Sdet, depth (m), airpath (m), diffracted unit vector, q (1/m), hkl), vectors as
        component tuples, hkl per `per_orientation`.
    """
    depth = layer * layer_depth
    pos, fd, sd = flat_positions(fdet, sdet, odet, pix0, pixel_size, fpix, spix, sub_f, sub_s,
                                 depth, oversample)
    airpath = torch.sqrt(pos[0] * pos[0] + pos[1] * pos[1] + pos[2] * pos[2])
    d = tuple(x / airpath for x in pos)
    q = tuple((x - incident[..., i]) / wavelength for i, x in enumerate(d))
    return fd, sd, depth, airpath, d, q, per_orientation(miller_indices(q, orient), orient)


def lattice_sum(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
                n_cells, default_f, fpix, spix, sub_f, sub_s, layer, oversample: int):
    """``sum over paths and orientations of (F F_latt)^2`` per pixel (F^2 units).

    Args:
        fdet, sdet, odet: (3,) detector unit axes; pix0: (3,) corner of pixel (0, 0) (m);
        pixel_size, layer_depth: 0-d (m); incident: (E or 1, 1, 3) unit vectors;
        wavelength: (E or 1, 1) (m); orient: (O, 3, 3) rows a, b, c (m); n_cells: (3,);
        default_f: 0-d; fpix, spix: (1, P) pixel indices; sub_f, sub_s, layer: (E, 1)
        sub-pixel and layer indices; oversample: sub-pixels per pixel edge.
    Returns:
        (P,) the sum per pixel.
    """
    hkl = plain_geometry(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength,
                         orient, fpix, spix, sub_f, sub_s, layer, oversample)[-1]
    term = (default_f * square_lattice(hkl, n_cells)) ** 2
    return term.sum(0) if orient.shape[0] == 1 else term.sum((0, 2))


def grating_parts(hkl, n_cells):
    """The three grating factors with their derivatives (`grating_and_derivatives`; an axis
    with N <= 1 has the factor 1), the product of the other two per axis, and F_latt.

    Returns:
        (parts: per axis ``(G, dG/dh, dG/dn)``, others: per axis the product of the other two
        G, F_latt), each array of the shape of the indices.
    """
    n_eff = torch.where(n_cells > 1, n_cells, torch.ones_like(n_cells))
    parts = [grating_and_derivatives(x, n) for x, n in zip(hkl, n_eff.unbind(-1))]
    g = [p[0] for p in parts]
    others = (g[1] * g[2], g[0] * g[2], g[0] * g[1])
    return parts, others, g[0] * others[0]


def position_gradient(g_d, d, airpath):
    """Chain a gradient with respect to the diffracted unit vector ``d = pos/|pos|`` to the
    position ``pos`` (m): ``(g - d (d.g)) / |pos|``, components as tuples."""
    dot = d[0] * g_d[0] + d[1] * g_d[1] + d[2] * g_d[2]
    return tuple((a - b * dot) / airpath for a, b in zip(g_d, d))


def lattice_sum_vjp(grad_b, fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength,
                    orient, n_cells, default_f, fpix, spix, sub_f, sub_s, layer, oversample: int,
                    layered: bool):
    """Gradients of ``sum(grad_b * lattice_sum(...))`` with respect to the first 11 inputs
    of `lattice_sum` (``fdet`` to ``default_f``), each of its input's shape.

    Recomputes the geometry and the grating factors with their derivatives
    (`grating_and_derivatives`) and accumulates every parameter gradient in a few passes over
    the chunk: differentiating the forward's polynomial chains and normalisations operation
    by operation made inductor's backward several times the forward. Sums that follow from
    others are derived from them: with one source, ``sum(dL/dq . q) / wavelength`` is
    ``sum(orient * dL/dorient) / wavelength``; the pixel size and layer depth gradients are
    projections of the detector-axis sums.

    Args:
        grad_b: (P,) gradient of the loss with respect to the per-pixel sum; the rest as in
            `lattice_sum`; layered: False when every layer index is 0 (one sensor layer).
    """
    one_source = wavelength.shape[0] == 1
    if one_source:
        # every reduction runs over all (path, pixel) pairs. Laid out flat, as (1, E*P), they
        # fuse into far fewer loops over the chunk than as (E, P) broadcasts (inductor's
        # backward on a 256x256 bench_1024 ROI: 4.6 -> 2.9 ms)
        n_paths, n_pix = sub_f.shape[0], fpix.shape[-1]
        flat = lambda x: x.expand(n_paths, n_pix).reshape(1, n_paths * n_pix)
        fpix, spix, sub_f, sub_s, layer = (flat(x) for x in (fpix, spix, sub_f, sub_s, layer))
        grad_b = flat(grad_b[None])[0]
    single = orient.shape[0] == 1
    per_orient = (lambda x: x) if single else (lambda x: x[..., None])
    total = (lambda x: x.sum()) if single else (lambda x: x.sum((0, 1)))
    fd, sd, depth, airpath, d, q, hkl = plain_geometry(
        fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient, fpix,
        spix, sub_f, sub_s, layer, oversample)
    parts, others, f_latt = grating_parts(hkl, n_cells)
    w = per_orient(grad_b[None, :])
    g_latt = w * 2.0 * default_f * default_f * f_latt
    g_h = [g_latt * o * p[1] for o, p in zip(others, parts)]
    d_orient = torch.stack([total(g_h[i] * per_orient(q[j])) for i in range(3) for j in range(3)],
                           -1).reshape(orient.shape)
    g_n = torch.stack([(g_latt * o * p[2]).sum() for o, p in zip(others, parts)])
    d_n = torch.where(n_cells > 1, g_n, torch.zeros_like(g_n))
    d_f = (w * 2.0 * default_f * f_latt * f_latt).sum()
    # dL/dq per (path, pixel), orientations summed; q = (d - incident) / wavelength
    sum_o = (lambda x: x) if single else (lambda x: x.sum(-1))
    g_q = tuple(sum_o(sum(g_h[i] * (orient[0, i, j] if single else orient[:, i, j]) for i in range(3)))
                for j in range(3))
    g_d = tuple(x / wavelength for x in g_q)
    d_incident = torch.stack([-sum_to(x, wavelength.shape) for x in g_d], -1)
    if one_source:
        d_wavelength = -(orient * d_orient).sum().reshape(1, 1) / wavelength
    else:
        d_wavelength = -sum_to(g_d[0] * q[0] + g_d[1] * q[1] + g_d[2] * q[2], wavelength.shape)
    g_pos = position_gradient(g_d, d, airpath)
    d_fdet = torch.stack([(x * fd).sum() for x in g_pos])
    d_sdet = torch.stack([(x * sd).sum() for x in g_pos])
    d_pix0 = torch.stack([x.sum() for x in g_pos])
    if layered:
        along_layer = torch.stack([(x * layer).sum() for x in g_pos])
    else:
        along_layer = torch.zeros_like(d_pix0)
    d_pixel_size = (fdet * d_fdet + sdet * d_sdet).sum() / pixel_size
    return (d_fdet, d_sdet, along_layer * layer_depth, d_pix0, d_pixel_size,
            (odet * along_layer).sum(), d_incident, d_wavelength, d_orient, d_n, d_f)


PARTIAL_ROWS = 24
"""Rows of `lattice_partials`' per-pixel sums with one sensor layer (27 with several)."""


def partial_rows(layered: bool) -> int:
    """Rows of `lattice_partials`' per-pixel sums: `PARTIAL_ROWS`, 3 more with layers."""
    return PARTIAL_ROWS + 3 * layered
PATHS_PER_CALL = 9
"""Paths that one call of the compiled `lattice_partials` unrolls; more paths take several
calls, whose sums are added."""


def _path_partials(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
                   n_cells, default_f, fpix, spix, sub_f, sub_s, layer, oversample, layered):
    """One path's terms of `lattice_partials`: ``[(F F_latt)^2, rows...]``, each (1, P)."""
    fd, sd, _, airpath, d, q, hkl = plain_geometry(
        fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient, fpix,
        spix, sub_f, sub_s, layer, oversample)
    parts, others, f_latt = grating_parts(hkl, n_cells)
    f_sq = default_f * default_f
    g_latt = 2.0 * f_sq * f_latt
    g_h = [g_latt * o * p[1] for o, p in zip(others, parts)]
    g_d = tuple(sum(g_h[i] * orient[0, i, j] for i in range(3)) / wavelength for j in range(3))
    g_pos = position_gradient(g_d, d, airpath)
    rows = [f_sq * f_latt * f_latt]
    rows += [g_h[i] * q[j] for i in range(3) for j in range(3)]
    rows += [g_latt * o * p[2] for o, p in zip(others, parts)]
    rows += list(g_d)
    rows += [x * fd for x in g_pos] + [x * sd for x in g_pos] + list(g_pos)
    if layered:
        rows += [x * layer for x in g_pos]
    return rows


def lattice_partials(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
                     n_cells, default_f, fpix, spix, sub_f, sub_s, layer, oversample: int,
                     layered: bool):
    """`lattice_sum` for one source and one orientation, with the per-pixel sums over paths
    from which `partials_vjp` forms every input gradient.

    The paths are unrolled (one pass over the pixels accumulates every path), so the
    per-evaluation values never leave the registers.

    Args:
        as `lattice_sum`, with incident (1, 1, 3), wavelength (1, 1), orient (1, 3, 3);
        layered: False when every layer index is 0 (the layer rows are left out).
    Returns:
        ((P,) the sum B, (R, P) rows: with ``L = (F F_latt)^2`` per evaluation and sums over
        the paths of each pixel, rows 0-8 ``sum dL/dh_i q_j`` (i, j = 0..2; 1/m), 9-11
        ``sum dL/dN_i``, 12-14 ``sum dL/dd_j`` (d the diffracted unit vector), 15-17, 18-20,
        21-23 ``sum dL/dpos_j`` times the fast coordinate Fdet (m), the slow coordinate Sdet
        (m), and 1 (pos the pixel position, 1/m), with ``layered`` 24-26 the same times the
        layer index. R is `PARTIAL_ROWS`, or 27 with ``layered``.)
    """
    total = None
    for e in range(sub_f.shape[0]):
        rows = _path_partials(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength,
                              orient, n_cells, default_f, fpix, spix, sub_f[e:e + 1], sub_s[e:e + 1],
                              layer[e:e + 1], oversample, layered)
        total = rows if total is None else [a + b for a, b in zip(total, rows)]
    return total[0][0], torch.cat(total[1:])


def partials_vjp(grad_b, b, partials, fdet, sdet, odet, pixel_size, layer_depth, wavelength,
                 orient, n_cells, default_f, layered: bool):
    """Gradients of ``sum(grad_b * B)`` with respect to `lattice_sum`'s inputs ``fdet`` to
    ``default_f``, from `lattice_partials`' outputs ``b`` (P,) and ``partials`` (R, P): one
    weighted sum per row, then the chain rule on (3,)-sized values, as in `lattice_sum_vjp`.
    The ``default_F`` gradient is ``2 sum(grad_b B) / F`` (exactly 0 at F = 0)."""
    s = partials @ grad_b
    d_orient = s[0:9].reshape(1, 3, 3)
    d_n = torch.where(n_cells > 1, s[9:12], torch.zeros_like(s[9:12]))
    zero_f = default_f == 0
    d_f = torch.where(zero_f, 0.0, 2.0 * (grad_b * b).sum() / torch.where(zero_f, 1.0, default_f))
    d_incident = -s[12:15].reshape(1, 1, 3)
    d_wavelength = -(orient * d_orient).sum().reshape(1, 1) / wavelength
    d_fdet, d_sdet, d_pix0 = s[15:18], s[18:21], s[21:24]
    along_layer = s[24:27] if layered else torch.zeros_like(d_pix0)
    d_pixel_size = (fdet * d_fdet + sdet * d_sdet).sum() / pixel_size
    return (d_fdet, d_sdet, along_layer * layer_depth, d_pix0, d_pixel_size,
            (odet * along_layer).sum(), d_incident, d_wavelength, d_orient, d_n, d_f)


_compiled_sum = compiled(lattice_sum, static_argnames=("oversample",))
# inductor's default realises a per-evaluation value read by more than 4 expressions into an
# array; the gradient's products read each of them more often, and keeping them in registers
# (up to 8 reads) with larger fused kernels was measured 10-20 % faster on bench_1024's ROI
_compiled_vjp = compiled(lattice_sum_vjp, static_argnames=("oversample", "layered"),
                         options={"realize_reads_threshold": 8, "cpp.max_horizontal_fusion_size": 64,
                                  "max_fusion_size": 512})
# the unrolled paths make one large fused loop: inductor's default node limit would split it
# into several loops that store the per-path values
_compiled_partials = compiled(lattice_partials, static_argnames=("oversample", "layered"),
                              options={"realize_reads_threshold": 8, "max_fusion_size": 4096})


@contextlib.contextmanager
def _plain_call():
    """The state in which the operators run their compiled functions: no autograd, and the
    dispatcher below its ADInplaceOrView key. The first call of an operator inside a
    compiled graph arrives with that key excluded, later calls without; the compiled
    function's guards include the key, so without this it compiled a second variant."""
    with torch.no_grad(), torch._C._AutoDispatchBelowADInplaceOrView():
        yield


def _plain_inputs(*tensors):
    """The operators' inputs detached (they may arrive requiring grad), so that the compiled
    functions do not compile a second variant for them."""
    return [x.detach() for x in tensors]


@torch.library.custom_op("nbfunc::lattice_sum", mutates_args=())
def lattice_sum_op(fdet: torch.Tensor, sdet: torch.Tensor, odet: torch.Tensor, pix0: torch.Tensor,
                   pixel_size: torch.Tensor, layer_depth: torch.Tensor, incident: torch.Tensor,
                   wavelength: torch.Tensor, orient: torch.Tensor, n_cells: torch.Tensor,
                   default_f: torch.Tensor, fpix: torch.Tensor, spix: torch.Tensor,
                   sub_f: torch.Tensor, sub_s: torch.Tensor, layer: torch.Tensor,
                   oversample: int, layered: bool) -> torch.Tensor:
    """`lattice_sum` as an operator (compiled unless compilation is disabled), differentiable
    through `lattice_sum_vjp`; ``layered`` (False when every layer index is 0) is passed on
    to it."""
    inputs = _plain_inputs(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength,
                           orient, n_cells, default_f, fpix, spix, sub_f, sub_s, layer)
    with _plain_call():
        return _compiled_sum(*inputs, oversample=oversample)


@lattice_sum_op.register_fake
def _(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient, n_cells,
      default_f, fpix, spix, sub_f, sub_s, layer, oversample, layered):
    return fpix.new_empty(fpix.shape[-1:])


@torch.library.custom_op("nbfunc::lattice_sum_vjp", mutates_args=())
def lattice_sum_vjp_op(grad_b: torch.Tensor, fdet: torch.Tensor, sdet: torch.Tensor,
                       odet: torch.Tensor, pix0: torch.Tensor, pixel_size: torch.Tensor,
                       layer_depth: torch.Tensor, incident: torch.Tensor, wavelength: torch.Tensor,
                       orient: torch.Tensor, n_cells: torch.Tensor, default_f: torch.Tensor,
                       fpix: torch.Tensor, spix: torch.Tensor, sub_f: torch.Tensor,
                       sub_s: torch.Tensor, layer: torch.Tensor, oversample: int,
                       layered: bool) -> list[torch.Tensor]:
    """`lattice_sum_vjp` as an operator (compiled unless compilation is disabled)."""
    inputs = _plain_inputs(grad_b, fdet, sdet, odet, pix0, pixel_size, layer_depth, incident,
                           wavelength, orient, n_cells, default_f, fpix, spix, sub_f, sub_s, layer)
    with _plain_call():
        return list(_compiled_vjp(*inputs, oversample=oversample, layered=layered))


@lattice_sum_vjp_op.register_fake
def _(grad_b, *inputs):
    return [torch.empty_like(x) for x in inputs[:DIFFERENTIABLE]]


def _setup_context(ctx, inputs, output):
    ctx.oversample, ctx.layered = inputs[-2:]
    ctx.save_for_backward(*inputs[:-2])


def _backward(ctx, grad_b):
    grads = lattice_sum_vjp_op(grad_b.contiguous(), *ctx.saved_tensors, ctx.oversample, ctx.layered)
    return (*grads,) + (None,) * (OPERATOR_ARGS - DIFFERENTIABLE)


lattice_sum_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("nbfunc::lattice_partials", mutates_args=())
def lattice_partials_op(fdet: torch.Tensor, sdet: torch.Tensor, odet: torch.Tensor,
                        pix0: torch.Tensor, pixel_size: torch.Tensor, layer_depth: torch.Tensor,
                        incident: torch.Tensor, wavelength: torch.Tensor, orient: torch.Tensor,
                        n_cells: torch.Tensor, default_f: torch.Tensor, fpix: torch.Tensor,
                        spix: torch.Tensor, sub_f: torch.Tensor, sub_s: torch.Tensor,
                        layer: torch.Tensor, oversample: int,
                        layered: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`lattice_partials` as an operator (compiled unless compilation is disabled), at most
    `PATHS_PER_CALL` paths per call; differentiable in its first output through
    `partials_vjp`."""
    *inputs, sub_f, sub_s, layer = _plain_inputs(
        fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient, n_cells,
        default_f, fpix, spix, sub_f, sub_s, layer)
    n_paths = sub_f.shape[0]
    size = math.ceil(n_paths / math.ceil(n_paths / PATHS_PER_CALL))
    b = partials = None
    with _plain_call():
        for start in range(0, n_paths, size):
            group = slice(start, start + size)
            b_g, partials_g = _compiled_partials(*inputs, sub_f[group], sub_s[group], layer[group],
                                                 oversample=oversample, layered=layered)
            b, partials = (b_g, partials_g) if b is None else (b + b_g, partials + partials_g)
    return b, partials


@lattice_partials_op.register_fake
def _(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient, n_cells,
      default_f, fpix, spix, sub_f, sub_s, layer, oversample, layered):
    n_pix = fpix.shape[-1]
    return fpix.new_empty(n_pix), fpix.new_empty(partial_rows(layered), n_pix)


def _partials_setup_context(ctx, inputs, output):
    fdet, sdet, odet, _, pixel_size, layer_depth, _, wavelength, orient, n_cells, default_f = inputs[:DIFFERENTIABLE]
    ctx.layered = inputs[-1]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(*output, fdet, sdet, odet, pixel_size, layer_depth, wavelength, orient,
                          n_cells, default_f)


def _partials_backward(ctx, grad_b, _):
    grads = partials_vjp(grad_b, *ctx.saved_tensors, ctx.layered)
    return (*grads,) + (None,) * (OPERATOR_ARGS - DIFFERENTIABLE)


lattice_partials_op.register_autograd(_partials_backward, setup_context=_partials_setup_context)
