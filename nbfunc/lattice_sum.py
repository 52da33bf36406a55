"""The per-pixel lattice sum of the common configuration, with a hand-written gradient.

``B = sum over paths and orientations of (F F_latt)^2`` per pixel, for a square crystal with
``default_F`` only, a flat detector, no absorption, no resolution cut and no oversample
flags. Compiled renders that record an autograd graph in that configuration call it as the
custom operator ``nbfunc::lattice_sum``: its forward and its backward
(``nbfunc::lattice_sum_vjp``) each run as their own compiled function, opaque to the
compiled chunk kernel around them. Autograd through the renderer's own code made inductor's
backward several times the forward (many loops over the chunk, each storing per-evaluation
arrays); the hand-written backward accumulates every parameter gradient in few loops.

torch.func transforms and double backward run the eager renderer, which does not use the
operator, so it needs no jvp or vmap rule.
"""
from __future__ import annotations

import torch

from nbfunc.compile import compiled
from nbfunc.detector import flat_positions
from nbfunc.lattice import grating_and_derivatives, square_lattice

DIFFERENTIABLE = 11
"""`lattice_sum` inputs ``fdet`` to ``default_f`` have gradients; the pixel and path indices
after them do not."""


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
    n_eff = torch.where(n_cells > 1, n_cells, torch.ones_like(n_cells))
    parts = [grating_and_derivatives(x, n) for x, n in zip(hkl, n_eff.unbind(-1))]
    g = [p[0] for p in parts]
    others = (g[1] * g[2], g[0] * g[2], g[0] * g[1])
    f_latt = g[0] * others[0]
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
    # d = pos / |pos|; pos = Fdet fdet + Sdet sdet + depth odet + pix0
    dot = d[0] * g_d[0] + d[1] * g_d[1] + d[2] * g_d[2]
    g_pos = tuple((a - b * dot) / airpath for a, b in zip(g_d, d))
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


_compiled_sum = compiled(lattice_sum, static_argnames=("oversample",))
# inductor's default realises a per-evaluation value read by more than 4 expressions into an
# array; the gradient's products read each of them more often, and keeping them in registers
# (up to 8 reads) with larger fused kernels was measured 10-20 % faster on bench_1024's ROI
_compiled_vjp = compiled(lattice_sum_vjp, static_argnames=("oversample", "layered"),
                         options={"realize_reads_threshold": 8, "cpp.max_horizontal_fusion_size": 64,
                                  "max_fusion_size": 512})


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
    with torch.no_grad():
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
    with torch.no_grad():
        return list(_compiled_vjp(*inputs, oversample=oversample, layered=layered))


@lattice_sum_vjp_op.register_fake
def _(grad_b, *inputs):
    return [torch.empty_like(x) for x in inputs[:DIFFERENTIABLE]]


def _setup_context(ctx, inputs, output):
    ctx.oversample, ctx.layered = inputs[-2:]
    ctx.save_for_backward(*inputs[:-2])


def _backward(ctx, grad_b):
    grads = lattice_sum_vjp_op(grad_b.contiguous(), *ctx.saved_tensors, ctx.oversample, ctx.layered)
    return (*grads,) + (None,) * (len(ctx.saved_tensors) + 2 - DIFFERENTIABLE)


lattice_sum_op.register_autograd(_backward, setup_context=_setup_context)
