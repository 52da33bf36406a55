"""The per-pixel lattice sum of the common configuration, with a hand-written gradient.

``B = sum over paths and orientations of (F F_latt)^2`` per pixel, for a square crystal with
``default_F`` only, a flat detector, no absorption, no resolution cut and no oversample
flags. Compiled renders that record an autograd graph in that configuration call it as the
custom operator ``nbfunc::lattice_sum`` (eager ones differentiate the kernel instead; measured
faster eagerly): its forward and its backward
(``nbfunc::lattice_sum_vjp``) each run as their own compiled function, opaque to the
compiled chunk kernel around them. Autograd through the renderer's own code made inductor's
backward several times the forward (many loops over the chunk, each storing per-evaluation
arrays); the hand-written backward accumulates every parameter gradient in few loops.

With one source and one orientation, and when the memory is small (`render` decides), the
operator ``nbfunc::pixel_partials`` is used instead: it computes the photons per pixel (the
lattice sum, the first path's solid angle and polarization, the scale) and, per pixel, the few
sums from which every parameter gradient follows (`pixel_partials`), so the backward is one
matrix-vector product (`pixel_partials_vjp`, traced into the chunk kernel's compiled backward)
instead of a second pass over every evaluation. Eager renders that record a graph use it too.

torch.func transforms and the re-run of a ``create_graph`` backward run the renderer's own
code, not the operators (`nbfunc.compile.differentiating_twice`), so the operators need no jvp
or vmap rule and only a first-order backward, which passes nothing in a backward that records
a graph.
"""
from __future__ import annotations

import contextlib
import math

import torch

from nbfunc.compile import compiled
from nbfunc.beam import polarization_and_derivatives
from nbfunc.detector import flat_positions, solid_angle
from nbfunc.lattice import grating_and_derivatives, square_lattice

DIFFERENTIABLE = 11
"""`lattice_sum` inputs ``fdet`` to ``default_f`` have gradients; the pixel and path indices
after them do not."""
PIXEL_DIFFERENTIABLE = 17
"""`pixel_partials` inputs ``fdet`` to ``background`` have gradients."""


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
    fd, sd, depth, airpath, d = plain_rays(fdet, sdet, odet, pix0, pixel_size, layer_depth, fpix,
                                           spix, sub_f, sub_s, layer, oversample)
    q = tuple((x - incident[..., i]) / wavelength for i, x in enumerate(d))
    return fd, sd, depth, airpath, d, q, per_orientation(miller_indices(q, orient), orient)


def plain_rays(fdet, sdet, odet, pix0, pixel_size, layer_depth, fpix, spix, sub_f, sub_s, layer,
               oversample):
    """The first part of `plain_geometry`: (Fdet, Sdet, depth (m), airpath (m), diffracted
    unit vector as components)."""
    depth = layer * layer_depth
    pos, fd, sd = flat_positions(fdet, sdet, odet, pix0, pixel_size, fpix, spix, sub_f, sub_s,
                                 depth, oversample)
    airpath = torch.sqrt(pos[0] * pos[0] + pos[1] * pos[1] + pos[2] * pos[2])
    return fd, sd, depth, airpath, tuple(x / airpath for x in pos)


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


PIXEL_ROWS = 26
"""Rows of `pixel_partials`' per-pixel sums without polarization and with one sensor layer
(`pixel_rows` gives the others)."""


def pixel_rows(layered: bool, polarized: bool) -> int:
    """Rows of `pixel_partials`' per-pixel sums: `PIXEL_ROWS`, 7 more with polarization, 3 more
    with several sensor layers."""
    return PIXEL_ROWS + 7 * polarized + 3 * layered


PATHS_PER_CALL = 9
"""Paths that one call of the compiled `pixel_partials` unrolls; more paths take several
calls (the others through `lattice_partials`), whose sums are added."""


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


def _lattice_rows(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
                  n_cells, default_f, fpix, spix, sub_f, sub_s, layer, oversample, layered):
    """`lattice_partials` as a list ``[B, rows...]`` of (1, P) arrays. Compiled, the paths are
    unrolled (one fused loop over the pixels keeps every per-evaluation value in registers);
    eagerly, they are evaluated together as (E, P) arrays and summed (a few hundred
    operations instead of a few hundred per path)."""
    n_paths = sub_f.shape[0]
    groups = ([slice(e, e + 1) for e in range(n_paths)] if torch.compiler.is_compiling()
              else [slice(0, n_paths)])
    total = None
    for g in groups:
        rows = _path_partials(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength,
                              orient, n_cells, default_f, fpix, spix, sub_f[g], sub_s[g], layer[g],
                              oversample, layered)
        rows = [x.sum(0, keepdim=True) for x in rows]
        total = rows if total is None else [a + b for a, b in zip(total, rows)]
    return total


def lattice_partials(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
                     n_cells, default_f, fpix, spix, sub_f, sub_s, layer, oversample: int,
                     layered: bool):
    """`lattice_sum` for one source and one orientation, with per-pixel sums over the paths of
    the derivatives of ``L = (F F_latt)^2`` (the part of `pixel_partials` that loops over paths).

    The paths are unrolled (one pass over the pixels accumulates every path), so the
    per-evaluation values never leave the registers.

    Args:
        as `lattice_sum`, with incident (1, 1, 3), wavelength (1, 1), orient (1, 3, 3);
        layered: False when every layer index is 0 (the layer rows are left out).
    Returns:
        ((P,) the sum B, (R, P) rows: sums over the paths of each pixel of 0-8
        ``dL/dh_i q_j`` (i, j = 0..2; 1/m), 9-11 ``dL/dN_i``, 12-14 ``dL/dd_j`` (d the
        diffracted unit vector), 15-17, 18-20, 21-23 ``dL/dpos_j`` (pos the sub-pixel position,
        1/m) times the fast coordinate Fdet (m), the slow coordinate Sdet (m) and 1, with
        ``layered`` 24-26 the same times the layer index. R is 24, or 27 with
        ``layered``.)
    """
    total = _lattice_rows(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength,
                          orient, n_cells, default_f, fpix, spix, sub_f, sub_s, layer, oversample,
                          layered)
    return total[0][0], torch.cat(total[1:])


def pixel_partials(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
                   n_cells, default_f, close_distance, e_in, b_in, kahn, scale, background, fpix,
                   spix, sub_f, sub_s, layer, carried_b=None, carried_rows=None, *, oversample: int,
                   layered: bool, point_pixel: bool, polarized: bool):
    """Photons per pixel of the common configuration with one source and one orientation,
    with the per-pixel sums from which `pixel_partials_vjp` forms every input gradient.

    ``value = scale (background + B) P omega``: B the lattice sum of `lattice_partials`, P the
    Kahn polarization factor and omega the solid angle of the first path (as `render`'s
    `pixel_values` applies them without oversample flags). Every row is the derivative of
    ``value / scale`` with respect to one quantity, so that the backward is one
    matrix-vector product with the incoming per-pixel gradient.

    Args:
        fdet .. default_f, fpix .. layer, oversample, layered: as `lattice_partials`;
        close_distance: 0-d sample-to-detector-plane distance (m); e_in, b_in: (3,) the beam's
        E and B unit vectors (`nbfunc.beam.polarization_axes`; unused when not
        ``polarized``); kahn: 0-d Kahn factor; scale: 0-d ``r_e^2 fluence / steps`` (m^2
        photons/m^2); background: 0-d water background (photons/sr); carried_b,
        carried_rows: (P,) and (R, P) `lattice_partials` of further paths of the same pixels,
        added before the pixel factors (or None); point_pixel: omega = 1/R^2;
        polarized: False for P = 1.
    Returns:
        ((P,) photons per pixel, (R, P) rows, R = `pixel_rows`: per pixel the derivative of
        ``value/scale`` with respect to 0-8 the orientation matrix (m), 9-11 N, 12-14 the
        incident direction, 15-17 fdet, 18-20 sdet, 21-23 pix0 (1/m), then 24
        ``P omega`` (the derivative with respect to the background), 25 ``P omega B``; with
        ``polarized`` 26-28 E, 29-31 B, 32 K; with ``layered`` the last three rows
        ``dvalue/dpos`` times the layer index.)
    """
    lattice = (fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
               n_cells, default_f)
    b, *raw = _lattice_rows(*lattice, fpix, spix, sub_f, sub_s, layer, oversample, layered)
    if carried_b is not None:
        b = b + carried_b
        raw = [x + y for x, y in zip(raw, carried_rows.unbind(0))]
    fd, sd, _, airpath, d = plain_rays(fdet, sdet, odet, pix0, pixel_size, layer_depth, fpix, spix,
                                       sub_f[:1], sub_s[:1], layer[:1], oversample)
    omega = solid_angle(airpath, close_distance, pixel_size, point_pixel)
    d_omega = -(2.0 if point_pixel else 3.0) * omega / airpath  # d omega / d airpath
    intensity = background + b
    if polarized:
        i = incident.reshape(3).unbind(0)
        polar, dp_dd, dp_dcos, dp_de, dp_db, dp_dk = polarization_and_derivatives(
            i, d, e_in.unbind(0), b_in.unbind(0), kahn)
    else:
        polar, dp_dd = torch.ones_like(omega), (torch.zeros_like(omega),) * 3
    value = scale * intensity * polar * omega
    u = polar * omega  # d(value/scale)/d(background)
    w = intensity * omega  # d(value/scale)/dP
    # the first path's position enters omega (through its distance) and P (through d)
    g_first = position_gradient(dp_dd, d, airpath)
    g_first = tuple(intensity * polar * d_omega * x + w * y for x, y in zip(d, g_first))
    rows = [u * x for x in raw[0:12]]
    if polarized:
        rows += [w * dp_dcos * x - u * y for x, y in zip(d, raw[12:15])]
    else:
        rows += [-u * y for y in raw[12:15]]
    rows += [u * y + x * fd for x, y in zip(g_first, raw[15:18])]
    rows += [u * y + x * sd for x, y in zip(g_first, raw[18:21])]
    rows += [u * y + x for x, y in zip(g_first, raw[21:24])]
    rows += [u, u * b]
    if polarized:
        rows += [w * dp_de * x for x in d] + [w * dp_db * x for x in d] + [w * dp_dk]
    if layered:
        rows += [u * y + x * layer[:1] for x, y in zip(g_first, raw[24:27])]
    return value[0], torch.cat(rows)


def pixel_partials_vjp(grad_v, rows, fdet, sdet, odet, pixel_size, layer_depth, wavelength, orient,
                       n_cells, default_f, close_distance, scale, background, layered: bool,
                       point_pixel: bool, polarized: bool):
    """Gradients of ``sum(grad_v * value)`` with respect to `pixel_partials`' inputs ``fdet``
    to ``background`` (each of its input's shape) from its rows (R, P): one weighted sum per
    row, then the chain rule on (3,)-sized values. Without the pixel factors' dependence
    (``scale``, ``background``, ``default_F``, the distance and pixel size in omega) a
    gradient follows from rows 24-25; the ``default_F`` gradient is ``2 scale sum(grad_v P
    omega B) / F`` (exactly 0 at F = 0)."""
    s = rows @ grad_v
    g = scale * s
    d_orient = g[0:9].reshape(1, 3, 3)
    d_n = torch.where(n_cells > 1, g[9:12], torch.zeros_like(g[9:12]))
    d_incident = g[12:15].reshape(1, 1, 3)
    d_fdet, d_sdet, d_pix0 = g[15:18], g[18:21], g[21:24]
    along_layer = g[-3:] if layered else torch.zeros_like(d_pix0)
    d_scale = s[25] + background * s[24]  # sum(grad_v value) / scale
    zero_f = default_f == 0
    d_f = torch.where(zero_f, 0.0, 2.0 * g[25] / torch.where(zero_f, 1.0, default_f))
    d_wavelength = -(orient * d_orient).sum().reshape(1, 1) / wavelength
    d_pixel_size = (fdet * d_fdet + sdet * d_sdet).sum() / pixel_size
    if point_pixel:
        d_close = torch.zeros_like(close_distance)
    else:  # omega = pixel^2 close / R^3
        d_close = scale * d_scale / close_distance
        d_pixel_size = d_pixel_size + 2.0 * scale * d_scale / pixel_size
    if polarized:
        d_e, d_b, d_k = g[26:29], g[29:32], g[32]
    else:
        d_e = d_b = torch.zeros_like(d_pix0)
        d_k = torch.zeros_like(default_f)
    return (d_fdet, d_sdet, along_layer * layer_depth, d_pix0, d_pixel_size,
            (odet * along_layer).sum(), d_incident, d_wavelength, d_orient, d_n, d_f, d_close,
            d_e, d_b, d_k, d_scale, g[24])


_compiled_sum = compiled(lattice_sum, static_argnames=("oversample",))
# inductor's default realises a per-evaluation value read by more than 4 expressions into an
# array; the gradient's products read each of them more often, and keeping them in registers
# (up to 8 reads) with larger fused kernels was measured 10-20 % faster on bench_1024's ROI
_compiled_vjp = compiled(lattice_sum_vjp, static_argnames=("oversample", "layered"),
                         options={"realize_reads_threshold": 8, "cpp.max_horizontal_fusion_size": 64,
                                  "max_fusion_size": 512})
# the unrolled paths make one large fused loop: inductor's default node limit would split it
# into several loops that store the per-path values
_PARTIALS_OPTIONS = {"realize_reads_threshold": 8, "max_fusion_size": 4096}
_compiled_partials = compiled(lattice_partials, static_argnames=("oversample", "layered"),
                              options=_PARTIALS_OPTIONS)
_compiled_pixel = compiled(pixel_partials, static_argnames=("oversample", "layered", "point_pixel",
                                                            "polarized"), options=_PARTIALS_OPTIONS)


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
    ctx.n_inputs = len(inputs)
    ctx.oversample, ctx.layered = inputs[-2:]
    ctx.save_for_backward(*inputs[:-2])


def _recording() -> bool:
    """True in an eager backward that records a graph: the operators' backward is first order
    only and passes nothing there; the `_Switch` of `nbfunc.compile` around every caller (the
    compile wrapper, or `first_order_gradients`) differentiates the renderer's own code
    instead."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _backward(ctx, grad_b):
    if _recording():
        return (None,) * ctx.n_inputs
    grads = lattice_sum_vjp_op(grad_b.contiguous(), *ctx.saved_tensors, ctx.oversample, ctx.layered)
    return (*grads,) + (None,) * (ctx.n_inputs - DIFFERENTIABLE)


lattice_sum_op.register_autograd(_backward, setup_context=_setup_context)


def _pixel_partials_body(
        fdet: torch.Tensor, sdet: torch.Tensor, odet: torch.Tensor, pix0: torch.Tensor,
        pixel_size: torch.Tensor, layer_depth: torch.Tensor, incident: torch.Tensor,
        wavelength: torch.Tensor, orient: torch.Tensor, n_cells: torch.Tensor,
        default_f: torch.Tensor, close_distance: torch.Tensor, e_in: torch.Tensor,
        b_in: torch.Tensor, kahn: torch.Tensor, scale: torch.Tensor, background: torch.Tensor,
        fpix: torch.Tensor, spix: torch.Tensor, sub_f: torch.Tensor, sub_s: torch.Tensor,
        layer: torch.Tensor, oversample: int, layered: bool, point_pixel: bool,
        polarized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`pixel_partials` (compiled unless compilation is disabled), at most `PATHS_PER_CALL` paths
    per call (the first group's call adds the others' `lattice_partials`): the forward of
    `pixel_partials_op` and `_EagerPixelPartials`."""
    *inputs, sub_f, sub_s, layer = _plain_inputs(
        fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient, n_cells,
        default_f, close_distance, e_in, b_in, kahn, scale, background, fpix, spix, sub_f, sub_s,
        layer)
    lattice, pixel, (fpix, spix) = inputs[:DIFFERENTIABLE], inputs[DIFFERENTIABLE:-2], inputs[-2:]
    n_paths = sub_f.shape[0]
    size = math.ceil(n_paths / math.ceil(n_paths / PATHS_PER_CALL))
    carried = [None, None]
    with _plain_call():
        for start in range(size, n_paths, size):
            group = slice(start, start + size)
            sums = _compiled_partials(*lattice, fpix, spix, sub_f[group], sub_s[group], layer[group],
                                      oversample=oversample, layered=layered)
            carried = list(sums) if carried[0] is None else [a + b for a, b in zip(carried, sums)]
        return _compiled_pixel(*lattice, *pixel, fpix, spix, sub_f[:size], sub_s[:size], layer[:size],
                               *carried, oversample=oversample, layered=layered,
                               point_pixel=point_pixel, polarized=polarized)


pixel_partials_op = torch.library.custom_op("nbfunc::pixel_partials",
                                            mutates_args=())(_pixel_partials_body)
"""`pixel_partials` as the operator ``nbfunc::pixel_partials``, opaque to the compiled chunk
kernel around it; differentiable in its first output through `pixel_partials_vjp`."""


@pixel_partials_op.register_fake
def _(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient, n_cells,
      default_f, close_distance, e_in, b_in, kahn, scale, background, fpix, spix, sub_f, sub_s,
      layer, oversample, layered, point_pixel, polarized):
    n_pix = fpix.shape[-1]
    return fpix.new_empty(n_pix), fpix.new_empty(pixel_rows(layered, polarized), n_pix)


def _pixel_setup_context(ctx, inputs, output):
    (fdet, sdet, odet, _, pixel_size, layer_depth, _, wavelength, orient, n_cells, default_f,
     close_distance, _, _, _, scale, background) = inputs[:PIXEL_DIFFERENTIABLE]
    ctx.n_inputs = len(inputs)
    ctx.flags = inputs[-3:]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], fdet, sdet, odet, pixel_size, layer_depth, wavelength, orient,
                          n_cells, default_f, close_distance, scale, background)


def _pixel_backward(ctx, grad_v, _):
    if _recording():
        return (None,) * ctx.n_inputs
    grads = pixel_partials_vjp(grad_v, *ctx.saved_tensors, *ctx.flags)
    return (*grads,) + (None,) * (ctx.n_inputs - PIXEL_DIFFERENTIABLE)


pixel_partials_op.register_autograd(_pixel_backward, setup_context=_pixel_setup_context)


class _EagerPixelPartials(torch.autograd.Function):
    """`pixel_partials_op`'s forward and backward for eager callers, without the operator's
    dispatch (whose first call imports torch._dynamo, about 1.5 s, which an eager process
    otherwise never loads)."""

    forward = staticmethod(_pixel_partials_body)
    setup_context = staticmethod(_pixel_setup_context)
    backward = staticmethod(_pixel_backward)


def pixel_partials_call(*args):
    """`pixel_partials_op` in code being compiled, `_EagerPixelPartials` otherwise; the
    arguments and results of `pixel_partials_op`."""
    if torch.compiler.is_compiling():
        return pixel_partials_op(*args)
    return _EagerPixelPartials.apply(*args)
