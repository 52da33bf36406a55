"""Photons per pixel of the common configuration with per-pixel partial sums for its gradient.

For square (or Gaussian: the C program's or diffBragg's) spots with ``default_F`` only, a
flat detector, no absorption, no resolution cut, no oversample flags, any number of sources
and orientations (phi steps x mosaic domains), `pixel_partials` computes the photons per
pixel (the lattice sum over the paths and orientations, the first path's solid angle and
polarization, the scale) and, per pixel, the sums from which the derivative with respect to
every input follows (26 to 36 for one source and one orientation; 9 more per orientation,
with several sources 5 per path, and 13 (4) more for the C program's (diffBragg's) Gaussian
spots); one matrix-vector product with them and `pixel_partials_chain` give the gradients.
`nbfunc.render.PartialsRules` uses the two as the first derivatives of the render's chunk
kernel (`nbfunc.derived`): a gradient then costs one pass over the evaluations (the forward,
with the sums) instead of two (forward and backward), and a Jacobian with respect to many
leaves the same pass and one product per leaf. `pixel_partials_tangent` gives the sums'
tangent along the orientation matrices, N and the background, weighted and summed over the
pixels, from which `nbfunc.derived` forms Hessian-vector products with respect to the
crystal's orientation, cell, N and scale; other derivatives of higher order are derived
from the renderer's own code.

Compiled with one orientation, the paths of a pixel are unrolled into one loop over the pixels
(`pixel_partials_sum`), which keeps every per-evaluation value in registers; with several,
the (path, pixel, orientation) values are arrays, reduced over the paths for the orientation
rows and over the orientations for the paths' rows.
"""
from __future__ import annotations

import math

import torch

from nbfunc.compile import compiled
from nbfunc.beam import polarization_and_derivatives
from nbfunc.detector import flat_positions, solid_angle
from nbfunc.lattice import gauss_and_derivatives, gauss_hkl_and_derivatives, grating_and_derivatives

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


def plain_geometry(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
                   fpix, spix, sub_f, sub_s, layer, oversample):
    """The geometry of `lattice_partials`, as the renderer's `path_rays` and
    `miller_indices` compute it (arguments as `lattice_partials`).

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


SHAPE_ROWS = {"square": [], "gauss": [("recip", 9), ("fudge", 1), ("n_offdiag", 3)],
              "gauss_hkl": [("fudge", 1), ("n_offdiag", 3)]}
"""The rows that a crystal shape adds after N's: the parameters of the C program's Gaussian
spots (`nbfunc.lattice.gauss_and_derivatives`) and of diffBragg's
(`nbfunc.lattice.gauss_hkl_and_derivatives`), which does not read the reciprocal cell."""


def spot_shape(gauss) -> str:
    """The crystal shape of a ``gauss`` argument (`lattice_partials`)."""
    return "square" if gauss is None else "gauss" if gauss[0] is not None else "gauss_hkl"


def _layout(parts) -> dict[str, slice]:
    """Consecutive named row blocks: ``[(name, rows), ...] -> {name: slice}`` in that order."""
    out, start = {}, 0
    for name, n in parts:
        out[name] = slice(start, start + n)
        start += n
    return out


def lattice_row_layout(layered: bool, per_path: bool = False,
                       shape: str = "square") -> dict[str, slice]:
    """The rows of `lattice_partials`' sums over the paths of ``L = (F F_latt)^2``'s
    derivatives: ``hq`` ``dL/dh_i q_j`` (i-major, 1/m), ``n_cells`` ``dL/dN_i``, with
    Gaussian spots (``shape``, `SHAPE_ROWS`) ``recip`` ``dL/da*_j`` (row-major, Angstrom;
    "gauss" only), ``fudge`` and ``n_offdiag`` ``dL/dNd, dNe, dNf``, then ``direction``
    ``dL/dd_j`` (d the diffracted unit vector; left out with ``per_path``, where each path's
    own rows carry it), then ``dL/dpos_j`` (pos the sub-pixel position, 1/m) times
    ``pos_fast`` the fast coordinate Fdet (m), ``pos_slow`` the slow coordinate Sdet (m),
    ``pos`` 1, and with ``layered`` ``pos_layer`` the layer index."""
    return _layout([("hq", 9), ("n_cells", 3)] + SHAPE_ROWS[shape]
                   + [("direction", 3)] * (not per_path)
                   + [("pos_fast", 3), ("pos_slow", 3), ("pos", 3)] + [("pos_layer", 3)] * layered)


def pixel_row_layout(layered: bool, polarized: bool, n_orient: int = 1, path_rows: int = 0,
                     weighted: bool = False, shape: str = "square") -> dict[str, slice]:
    """The rows of `pixel_partials`: per pixel the derivative of ``value/scale`` with respect to
    ``orient`` the orientation matrices ((orientation, row, column)-major, m), ``n_cells`` N,
    with Gaussian spots (`SHAPE_ROWS`) ``recip`` the reciprocal cell (row-major, 1/Angstrom;
    "gauss" only), ``fudge`` and ``n_offdiag`` Nd, Ne, Nf, then ``incident`` the incident
    direction (one source), ``fdet``, ``sdet``, ``pix0`` (1/m), ``background`` (``P omega``),
    then ``lattice`` ``P omega B`` (the derivative with respect to ``log F^2``); with
    ``polarized`` ``e_in`` E, ``b_in`` B, ``kahn`` K; with ``layered`` ``layer`` ``dvalue/dpos``
    times the layer index. With ``path_rows`` E > 0 (several sources: each path has its own
    source) the ``incident`` block is left out and each path has its own: ``path_incident``
    (path, component)-major, ``path_wavelength`` (1/m^2... per metre of wavelength), and with
    ``weighted`` ``path_weight``."""
    parts = [("orient", 9 * n_orient), ("n_cells", 3)] + SHAPE_ROWS[shape]
    parts += [("incident", 3)] * (not path_rows)
    parts += [("fdet", 3), ("sdet", 3), ("pix0", 3), ("background", 1), ("lattice", 1)]
    parts += [("e_in", 3), ("b_in", 3), ("kahn", 1)] * polarized + [("layer", 3)] * layered
    if path_rows:
        parts += [("path_incident", 3 * path_rows), ("path_wavelength", path_rows)]
        parts += [("path_weight", path_rows)] * weighted
    return _layout(parts)


def pixel_rows(layered: bool, polarized: bool, n_orient: int = 1, path_rows: int = 0,
               weighted: bool = False, shape: str = "square") -> int:
    """Rows of `pixel_partials`' per-pixel sums (`pixel_row_layout`): 26 for one source and
    one orientation, 7 more with polarization, 3 more with several sensor layers, 9 more per
    further orientation, with several sources 4 (5 with weights) per path less 3, and 13 (4)
    more with the C program's (diffBragg's) Gaussian spots."""
    return max(block.stop for block in pixel_row_layout(layered, polarized, n_orient, path_rows,
                                                        weighted, shape).values())


PATHS_PER_CALL = 9
"""Paths that one call of the compiled `pixel_partials` unrolls; more paths take several
calls (the others through `lattice_partials`), whose sums are added."""


def _direction_rows(g_d, d, airpath, fd, sd, layer, layered: bool, per_path: bool,
                    skip=frozenset()) -> list:
    """The rows of `lattice_row_layout` that follow from ``g_d = dL/dd`` (or its tangent):
    ``direction`` (without ``per_path``), then ``dL/dpos`` times Fdet, Sdet, 1 and with
    ``layered`` the layer index; None for the rows of the blocks named in ``skip``."""
    g_pos = position_gradient(g_d, d, airpath)
    blocks = [] if per_path else [("direction", lambda: list(g_d))]
    blocks += [("pos_fast", lambda: [x * fd for x in g_pos]),
               ("pos_slow", lambda: [x * sd for x in g_pos]), ("pos", lambda: list(g_pos))]
    blocks += [("pos_layer", lambda: [x * layer for x in g_pos])] * layered
    return [x for name, make in blocks for x in ([None] * 3 if name in skip else make())]


def _path_partials(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
                   n_cells, default_f, weight, fpix, spix, sub_f, sub_s, layer, oversample, layered,
                   per_path, gauss=None, skip=frozenset()):
    """The paths' terms of `lattice_partials`: ``([(F F_latt)^2, rows...], path rows, rays)``; the
    first list is summed over the paths, each (E, P) (the ``hq`` rows (E, P, O) with several
    orientations), the path rows (with ``per_path``: ``-dL/dd`` per component, ``dL/dlambda``
    and with a ``weight`` ``dL/dw``) are kept per path, each (E, P). ``gauss``: None for
    square spots, or ``(recip, fudge, n_offdiag)`` for Gaussian ones
    (`nbfunc.lattice.gauss_and_derivatives`; with ``recip`` None diffBragg's,
    `nbfunc.lattice.gauss_hkl_and_derivatives`), whose parameters' rows follow N's. The rows
    of the `lattice_row_layout` blocks named in ``skip`` are None (not made). ``rays``: the
    paths' (Fdet, Sdet, airpath, diffracted unit vector) of `plain_rays`, each (E, P)."""
    fd, sd, _, airpath, d, q, hkl = plain_geometry(
        fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient, fpix,
        spix, sub_f, sub_s, layer, oversample)
    many = orient.shape[0] > 1
    if gauss is None:
        parts, others, f_latt = grating_parts(hkl, n_cells)
    else:
        recip, fudge, n_offdiag = gauss
        shape_rows = not {"fudge", "n_offdiag"} <= skip
        if recip is None:
            d_recip = []
            f_latt, d_h, d_n, d_fudge, d_offdiag = gauss_hkl_and_derivatives(
                hkl, n_cells, fudge, n_offdiag, shape_rows)
        else:
            f_latt, d_h, d_n, d_recip, d_fudge, d_offdiag = gauss_and_derivatives(
                hkl, recip, n_cells, fudge, n_offdiag, shape_rows)
        d_n = d_n + d_recip + [d_fudge] + d_offdiag  # the rows after N's
    f_sq = default_f * default_f
    g_latt = 2.0 * f_sq * f_latt
    lattice = f_sq * f_latt * f_latt
    if weight is not None:
        w = weight[..., None] if many else weight
        unweighted, g_latt, lattice = lattice, g_latt * w, lattice * w
    # the blocks of the rows after hq: N's, then the shape's
    n_names = ["n_cells"] * 3 + [name for name, k in SHAPE_ROWS[spot_shape(gauss)] for _ in range(k)]
    if gauss is None:
        g_h = [g_latt * o * p[1] for o, p in zip(others, parts)]
        g_n = [None if "n_cells" in skip else g_latt * o * p[2] for o, p in zip(others, parts)]
    else:
        g_h = [g_latt * x for x in d_h]
        g_n = [None if name in skip else g_latt * x for name, x in zip(n_names, d_n)]
    hq = [None] * 9 if "hq" in skip else None
    if many:  # sum over the orientations (last axis) what does not depend on them
        g_d = tuple(sum((g_h[i] * orient[:, i, j]).sum(-1) for i in range(3)) / wavelength
                    for j in range(3))
        rows = [lattice.sum(-1)] + (hq or [g_h[i] * q[j][..., None] for i in range(3) for j in range(3)])
        rows += [None if x is None else x.sum(-1) for x in g_n]
    else:
        g_d = tuple((g_h[0] * orient[0, 0, j] + g_h[1] * orient[0, 1, j] + g_h[2] * orient[0, 2, j])
                    / wavelength for j in range(3))
        rows = [lattice] + (hq or [g_h[i] * q[j] for i in range(3) for j in range(3)]) + g_n
    rows += _direction_rows(g_d, d, airpath, fd, sd, layer, layered, per_path, skip)
    path = []
    if per_path:
        h_dot = g_h[0] * hkl[0] + g_h[1] * hkl[1] + g_h[2] * hkl[2]
        path = [-x for x in g_d] + [-(h_dot.sum(-1) if many else h_dot) / wavelength]
        if weight is not None:
            path.append(unweighted.sum(-1) if many else unweighted)
    return rows, path, (fd, sd, airpath, d)


def _path_tangents(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
                   n_cells, default_f, weight, fpix, spix, sub_f, sub_s, layer, oversample, layered,
                   per_path, t_orient, t_n):
    """The tangents of `_path_partials`' terms along ``t_orient`` (a tangent of ``orient``,
    (O, 3, 3)) and ``t_n`` (of ``n_cells``, (3,)), every other input fixed, in the same
    structure; either tangent may be None (not moving), not both.

    The indices move by ``dh_i = t_i . q`` and the cells by ``dN_i`` (0 on an axis with
    ``N <= 1``, whose factor is 1); with ``G_i`` the axes' gratings and ``O_i`` the product
    of the other two, the rows' factors ``dL/dh_i = c O_i dG_i/dh`` and ``dL/dN_i = c O_i
    dG_i/dN`` (``c = 2 F^2 F_latt``, times the weight) move by ``dc O_i G_i' + c dO_i G_i' +
    c O_i dG_i'`` with the gratings' second derivatives (`grating_second_derivatives`); the
    direction and position rows are linear in ``dL/dh`` plus ``dL/dh_i t_ij / lambda``."""
    from nbfunc.lattice import grating_second_derivatives

    fd, sd, _, airpath, d, q, hkl = plain_geometry(
        fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient, fpix,
        spix, sub_f, sub_s, layer, oversample)
    many = orient.shape[0] > 1
    dhkl = None if t_orient is None else per_orientation(miller_indices(q, t_orient), orient)
    n_eff = torch.where(n_cells > 1, n_cells, torch.ones_like(n_cells))
    d_cells = None if t_n is None else torch.where(n_cells > 1, t_n, torch.zeros_like(t_n)).unbind(-1)
    parts = [grating_second_derivatives(x, n) for x, n in zip(hkl, n_eff.unbind(-1))]
    g = [p[0] for p in parts]

    def moved(along_h: int, along_n: int):
        """Per axis ``p[along_h] dh_i + p[along_n] dN_i``, without the terms of no tangent."""
        out = []
        for i, p in enumerate(parts):
            terms = ([] if dhkl is None else [p[along_h] * dhkl[i]]) + (
                [] if d_cells is None else [p[along_n] * d_cells[i]])
            out.append(terms[0] if len(terms) == 1 else terms[0] + terms[1])
        return out
    dg, dg_h, dg_n = moved(1, 2), moved(3, 4), moved(4, 5)  # dG_i, d(dG_i/dh), d(dG_i/dN)
    others = (g[1] * g[2], g[0] * g[2], g[0] * g[1])
    d_others = (dg[1] * g[2] + g[1] * dg[2], dg[0] * g[2] + g[0] * dg[2], dg[0] * g[1] + g[0] * dg[1])
    f_latt = g[0] * others[0]
    d_latt = dg[0] * others[0] + g[0] * d_others[0]
    f_sq = default_f * default_f
    c, dc = 2.0 * f_sq * f_latt, 2.0 * f_sq * d_latt
    lattice, d_lattice = f_sq * f_latt * f_latt, c * d_latt
    if weight is not None:
        w = weight[..., None] if many else weight
        d_unweighted, c, dc, lattice, d_lattice = d_lattice, c * w, dc * w, lattice * w, d_lattice * w
    g_h = [c * o * p[1] for o, p in zip(others, parts)]
    d_h = [(dc * o + c * do) * p[1] + c * o * x for o, do, p, x in zip(others, d_others, parts, dg_h)]
    d_n = [(dc * o + c * do) * p[2] + c * o * x for o, do, p, x in zip(others, d_others, parts, dg_n)]
    # d(dL/dd_j) = sum_i (d(dL/dh_i) a_ij + dL/dh_i t_ij) / lambda
    turned = t_orient is not None
    if many:
        dg_d = tuple(sum((d_h[i] * orient[:, i, j] + (g_h[i] * t_orient[:, i, j] if turned else 0.0)).sum(-1)
                         for i in range(3)) / wavelength for j in range(3))
        rows = [d_lattice.sum(-1)] + [d_h[i] * q[j][..., None] for i in range(3) for j in range(3)]
        rows += [x.sum(-1) for x in d_n]
    else:
        dg_d = tuple(sum(d_h[i] * orient[0, i, j] + (g_h[i] * t_orient[0, i, j] if turned else 0.0)
                         for i in range(3)) / wavelength for j in range(3))
        rows = [d_lattice] + [d_h[i] * q[j] for i in range(3) for j in range(3)] + d_n
    rows += _direction_rows(dg_d, d, airpath, fd, sd, layer, layered, per_path)
    path = []
    if per_path:
        dh_dot = sum(d_h[i] * hkl[i] + (g_h[i] * dhkl[i] if turned else 0.0) for i in range(3))
        path = [-x for x in dg_d] + [-(dh_dot.sum(-1) if many else dh_dot) / wavelength]
        if weight is not None:
            path.append(d_unweighted.sum(-1) if many else d_unweighted)
    return rows, path


def _path_sum(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x.sum(0, keepdim=True)``: the sum over the paths, (E, ...) -> (1, ...); ``x`` itself
    for one path (eagerly a sum over one element is a copy); None for a row not made."""
    return x if x is None or x.shape[0] == 1 else x.sum(0, keepdim=True)


def _lattice_rows(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
                  n_cells, default_f, weight, fpix, spix, sub_f, sub_s, layer, oversample, layered,
                  per_path, gauss=None, skip=frozenset()):
    """`lattice_partials` as ``([B, rows...], path rows, rays)``: (1, P) arrays (the ``hq``
    rows (1, P, O) with several orientations) and (E, P) arrays. Compiled, the paths are
    unrolled (one fused loop over the pixels keeps every per-evaluation value in registers);
    eagerly, they are evaluated together as (E, P) arrays and summed (a few hundred operations
    instead of a few hundred per path). With ``per_path`` (several sources: ``incident`` (E,
    1, 3), one per path) the path rows are those of each path, in path order; without, there
    are none. ``gauss``, ``skip``: as `_path_partials`; ``rays``: `_path_partials`' of the
    first group of paths (its first row is the first path's)."""
    n_paths = sub_f.shape[0]
    # several orientations: the paths as (E, P, O) arrays even compiled; unrolled, inductor
    # recomputed the gratings for each of the differently reduced sums (about 6x slower)
    unroll = torch.compiler.is_compiling() and orient.shape[0] == 1
    groups = [slice(e, e + 1) for e in range(n_paths)] if unroll else [slice(0, n_paths)]
    total, path, rays = None, [], None
    for g in groups:
        pick = (lambda x: x[g]) if per_path else (lambda x: x)
        rows, path_g, rays_g = _path_partials(
            fdet, sdet, odet, pix0, pixel_size, layer_depth, pick(incident), pick(wavelength),
            orient, n_cells, default_f, None if weight is None else weight[g], fpix, spix,
            sub_f[g], sub_s[g], layer[g], oversample, layered, per_path, gauss, skip)
        rows = [_path_sum(x) for x in rows]
        total = rows if total is None else [None if a is None else a + b for a, b in zip(total, rows)]
        path.append(path_g)
        rays = rays_g if rays is None else rays
    path = [torch.cat(column) for column in zip(*path)] if per_path else []
    return total, path, rays


def lattice_partials(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
                     n_cells, default_f, fpix, spix, sub_f, sub_s, layer, weight=None, *,
                     oversample: int, layered: bool, per_path: bool = False, gauss=None):
    """``B = sum over the paths and orientations of (F F_latt)^2`` per pixel, with per-pixel
    sums of the derivatives of ``L = (F F_latt)^2`` (the part of `pixel_partials` that loops
    over paths; `_lattice_rows`).

    Args:
        fdet, sdet, odet: (3,) detector unit axes; pix0: (3,) corner of pixel (0, 0) (m);
        pixel_size, layer_depth: 0-d (m); incident: (1, 1, 3) unit vector, or (E, 1, 3) one
        per path; wavelength: (1, 1) or (E, 1) (m); orient: (O, 3, 3) rows a, b, c (m);
        n_cells: (3,); default_f: 0-d; fpix, spix: (1, P) pixel indices; sub_f, sub_s, layer:
        (E, 1) sub-pixel and layer indices; weight: (E, 1) per-path source weights or None;
        oversample: sub-pixels per pixel edge; layered: False when every layer index is 0
        (the layer rows are left out); per_path: each path has its own source (``incident``,
        ``wavelength`` and ``weight`` per path) and rows of its own; gauss: None (square
        spots) or ``(recip, fudge, n_offdiag)``, (3, 3) 1/Angstrom, 0-d and (3,) cells, for
        the C program's Gaussian spots (13 more rows, `lattice_row_layout`), with ``recip``
        None for diffBragg's (4 more rows).
    Returns:
        ((P,) the sum B, (R, P) rows: `lattice_row_layout` with the ``hq`` block 9 O rows
        (orientation, i, j)-major; R is 24, or 27 with ``layered``, for one orientation (3
        fewer with ``per_path``); (K, E, P) the path rows (`_lattice_rows`), K = 0 with one
        source.)
    """
    total, path, _ = _lattice_rows(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident,
                                wavelength, orient, n_cells, default_f, weight, fpix, spix, sub_f,
                                sub_s, layer, oversample, layered, per_path, gauss)
    return total[0][0], _stack_rows(total[1:]), _stack_path_rows(path, fpix)


def _stack_rows(rows):
    """(R, P) rows from `_lattice_rows`' summed rows: the first nine (``hq``) may be (1, P, O),
    which become 9 O rows in (orientation, i, j) order."""
    if rows[0].dim() == 2:
        return torch.cat(rows)
    hq = torch.stack([x[0] for x in rows[:9]]).permute(2, 0, 1).flatten(0, 1)
    return torch.cat([hq] + rows[9:])


def _stack_path_rows(path, like):
    """(K, E, P) from `_lattice_rows`' K path rows (each (E, P)); (0, 0, P) without any."""
    if not path:
        return like.new_zeros((0, 0, like.shape[-1]))
    return torch.stack(path)


def pixel_partials(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
                   n_cells, default_f, close_distance, e_in, b_in, kahn, scale, background, fpix,
                   spix, sub_f, sub_s, layer, carried_b=None, carried_rows=None, carried_path=None,
                   weight=None, *, oversample: int, layered: bool, point_pixel: bool,
                   polarized: bool, per_path: bool = False, gauss=None, blocks=None):
    """Photons per pixel of the common configuration, with the per-pixel sums from which
    `pixel_partials_chain` forms every input gradient.

    ``value = scale (background + B) P omega``: B the lattice sum of `lattice_partials` over
    the paths and orientations, P the Kahn polarization factor and omega the solid angle of
    the first path (as `render`'s `pixel_values` applies them without oversample flags).
    Every row is the derivative of ``value / scale`` with respect to one quantity, so that
    the backward is one matrix-vector product with the incoming per-pixel gradient.

    Args:
        fdet .. default_f, fpix .. layer, weight, oversample, layered: as `lattice_partials`
        (one source: ``incident`` (1, 1, 3) and ``wavelength`` (1, 1) shared by the paths;
        with ``per_path``, several: (E, 1, 3) and (E, 1), one per path, and ``weight`` (E, 1)
        or None);
        close_distance: 0-d sample-to-detector-plane distance (m); e_in, b_in: (3,) the beam's
        E and B unit vectors (`nbfunc.beam.polarization_axes`; unused when not
        ``polarized``); kahn: 0-d Kahn factor; scale: 0-d ``r_e^2 fluence / steps`` (m^2
        photons/m^2); background: 0-d water background (photons/sr); carried_b,
        carried_rows, carried_path: `lattice_partials` of further paths of the same pixels
        (their sums are added before the pixel factors, their path rows follow these
        paths'), or None; point_pixel: omega = 1/R^2; polarized: False for P = 1; gauss: as
        `lattice_partials`; blocks: the names of the `pixel_row_layout` blocks to make (None:
        all; eager, without carried sums), for a JVP whose tangents reach only those.
    Returns:
        ((P,) photons per pixel, (R, P) rows as `pixel_row_layout` names them, R =
        `pixel_rows`; with ``blocks``, those blocks' rows in layout order.)
    """
    lattice = (fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength, orient,
               n_cells, default_f, weight)
    skip = frozenset() if blocks is None else _lattice_skip(blocks, shape=spot_shape(gauss))
    (b, *raw), path, rays = _lattice_rows(*lattice, fpix, spix, sub_f, sub_s, layer, oversample,
                                          layered, per_path, gauss, skip)
    hq = None if "hq" in skip else _stack_rows(raw[:9])
    raw = raw[9:]
    path = _stack_path_rows(path, fpix)
    if carried_b is not None:
        b = b + carried_b
        hq = hq + carried_rows[:hq.shape[0]]
        raw = [x + y for x, y in zip(raw, carried_rows[hq.shape[0]:].unbind(0))]
        if per_path:
            path = torch.cat([path, carried_path], 1)
    return _pixel_rows(b, hq, raw, path, fdet, sdet, odet, pix0, pixel_size, layer_depth,
                       incident, orient, close_distance, e_in, b_in, kahn, scale, background, fpix,
                       spix, sub_f, sub_s, layer, weight, oversample=oversample, layered=layered,
                       point_pixel=point_pixel, polarized=polarized, per_path=per_path,
                       shape=spot_shape(gauss), blocks=blocks,
                       rays=tuple(x if x.shape[0] == 1 else x[:1] for x in (*rays[:3], *rays[3])))


_LATTICE_BLOCKS = {"orient": "hq", "incident": "direction", "fdet": "pos_fast", "sdet": "pos_slow",
                   "pix0": "pos", "layer": "pos_layer"}
"""The `lattice_row_layout` block each `pixel_row_layout` block is made from, where the names
differ (``n_cells`` and the shapes' blocks share theirs)."""


def _lattice_skip(blocks, shape: str) -> frozenset:
    """The `lattice_row_layout` blocks that the `pixel_row_layout` ``blocks`` do not need."""
    needed = {_LATTICE_BLOCKS.get(name, name) for name in blocks}
    return frozenset(name for name in ("hq", "n_cells", *(n for n, _ in SHAPE_ROWS[shape]),
                                       "direction", "pos_fast", "pos_slow", "pos", "pos_layer")
                     if name not in needed)


def _pixel_rows(b, hq, raw, path, fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, orient,
                close_distance, e_in, b_in, kahn, scale, background, fpix, spix, sub_f, sub_s, layer,
                weight, grad_v=None, *, oversample, layered, point_pixel, polarized, per_path,
                shape="square", blocks=None, rays=None):
    """The pixel factors of `pixel_partials` applied to the lattice sums: ``b`` (1, P) the sum B,
    ``hq`` (9 O, P), ``raw`` the other lattice rows (each (1, P)), ``path`` (K, E, P) the path
    rows. Returns ``((P,) value, (R, P) rows)``; affine in (b, hq, raw, path). With ``grad_v``
    ((P,)), the rows' sums weighted by it in place of the rows, by block of
    `pixel_row_layout` (`row_sums`): each row is reduced where it is made, so compiled the
    rows never reach memory, and a block that no output needs is never computed. With
    ``blocks`` (names of `pixel_row_layout` blocks), only those blocks' rows, whose lattice
    rows are the only ones needed (the others may be None). ``rays``: the first path's (Fdet,
    Sdet, airpath, three components of the diffracted unit vector), each (1, P), when the
    lattice sums made them (`_lattice_rows`), else computed here."""
    if rays is None:
        fd, sd, _, airpath, d = plain_rays(fdet, sdet, odet, pix0, pixel_size, layer_depth, fpix,
                                           spix, sub_f[:1], sub_s[:1], layer[:1], oversample)
    else:
        fd, sd, airpath, *d = rays
    omega = solid_angle(airpath, close_distance, pixel_size, point_pixel)
    d_omega = -(2.0 if point_pixel else 3.0) * omega / airpath  # d omega / d airpath
    intensity = background + b
    if polarized:
        i = incident[0].reshape(3).unbind(0)
        polar, dp_dd, dp_dcos, dp_de, dp_db, dp_dk = polarization_and_derivatives(
            i, d, e_in.unbind(0), b_in.unbind(0), kahn)
    else:
        polar, dp_dd = torch.ones_like(omega), (torch.zeros_like(omega),) * 3
    value = scale * intensity * polar * omega
    u = polar * omega  # d(value/scale)/d(background)
    w = intensity * omega  # d(value/scale)/dP
    layout = pixel_row_layout(layered, polarized, orient.shape[0], path.shape[1], weight is not None,
                              shape)
    wanted = [name for name in layout if blocks is None or name in blocks]
    if {"fdet", "sdet", "pix0", "layer"} & set(wanted):
        # the first path's position enters omega (through its distance) and P (through d)
        g_first = position_gradient(dp_dd, d, airpath)
        by_omega = intensity * polar * d_omega
        g_first = tuple(by_omega * x + w * y for x, y in zip(d, g_first))
    lat = {name: raw[block.start - 9:block.stop - 9]  # the rows after the nine hq rows
           for name, block in lattice_row_layout(layered, per_path, shape).items() if name != "hq"}
    # the first path's incident direction enters P
    first = (lambda: [w * dp_dcos * x for x in d]) if polarized else lambda: None

    def path_incident():
        own = u * path[:3]  # (3, E, P): -dL/dd per component and path
        if polarized:
            own = torch.cat([own[:, :1] + torch.stack(first()), own[:, 1:]], 1)
        return [own.transpose(0, 1).flatten(0, 1)]
    make = {"orient": lambda: [u * hq], "n_cells": lambda: [u * x for x in lat["n_cells"]],
            **{name: lambda name=name: [u * x for x in lat[name]] for name, _ in SHAPE_ROWS[shape]},
            "incident": (lambda: [x - u * y for x, y in zip(first(), lat["direction"])]) if polarized
            else lambda: [-u * y for y in lat["direction"]],
            "fdet": lambda: [u * y + x * fd for x, y in zip(g_first, lat["pos_fast"])],
            "sdet": lambda: [u * y + x * sd for x, y in zip(g_first, lat["pos_slow"])],
            "pix0": lambda: [u * y + x for x, y in zip(g_first, lat["pos"])],
            "background": lambda: [u], "lattice": lambda: [u * b],
            "e_in": lambda: [w * dp_de * x for x in d], "b_in": lambda: [w * dp_db * x for x in d],
            "kahn": lambda: [w * dp_dk],
            "layer": lambda: [u * y + x * layer[:1] for x, y in zip(g_first, lat["pos_layer"])],
            "path_incident": path_incident, "path_wavelength": lambda: [u * path[3]],
            "path_weight": lambda: [u * path[4]]}
    rows = {name: make[name]() for name in wanted}
    if grad_v is not None:
        return value[0], {name: torch.cat([(x * grad_v).sum(-1) for x in rows[name]])
                          for name in layout}
    return value[0], torch.cat([x for name in wanted for x in rows[name]])


def pixel_partials_tangent(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength,
                           orient, n_cells, default_f, close_distance, e_in, b_in, kahn, scale,
                           background, fpix, spix, sub_f, sub_s, layer, weight=None, *, grad_v,
                           t_orient, t_n, t_background, oversample: int, layered: bool,
                           point_pixel: bool, polarized: bool, per_path: bool = False):
    """The tangent of `pixel_partials`' rows along ``t_orient`` ((O, 3, 3), a tangent of
    ``orient``), ``t_n`` ((3,), of ``n_cells``) and ``t_background`` (0-d), every other input
    fixed (``t_orient`` or ``t_n`` None: not moving, not both), summed over the pixels with
    the weights ``grad_v`` ((P,), per photon), by block (`row_sums`): the sums that
    `pixel_partials_chain` turns into the tangent of the gradients (second derivatives of a
    render through its partial sums, `nbfunc.render.PartialsRules.vjp_along`). The rows do
    not depend on ``scale``.

    The lattice sums' tangents come from `_path_tangents`, summed over the paths; the pixel
    factors are affine in the lattice sums and the background together (`_pixel_rows`), and
    only their ``background`` row (``P omega``) is not linear in them: the tangent is
    `_pixel_rows` of the tangents with that row 0, exact. Each row is weighted and summed
    where it is made (compiled, the (R, P) tangent is never stored). Arguments as
    `pixel_partials`."""
    (db, *raw), path = _path_tangents(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident,
                                      wavelength, orient, n_cells, default_f, weight, fpix, spix,
                                      sub_f, sub_s, layer, oversample, layered, per_path, t_orient,
                                      t_n)
    db, *raw = [_path_sum(x) for x in [db] + raw]
    hq = _stack_rows(raw[:9])
    path = _stack_path_rows(path, fpix)
    sums = _pixel_rows(db, hq, raw[9:], path, fdet, sdet, odet, pix0, pixel_size, layer_depth,
                       incident, orient, close_distance, e_in, b_in, kahn, scale, t_background,
                       fpix, spix, sub_f, sub_s, layer, weight, grad_v, oversample=oversample,
                       layered=layered, point_pixel=point_pixel, polarized=polarized,
                       per_path=per_path)[1]
    return {**sums, "background": torch.zeros_like(sums["background"])}


def row_sums(rows, grad_v, layout: dict[str, slice]) -> dict:
    """``rows @ grad_v`` ((R, P) rows, (P,) weights) by block of ``layout``
    (`pixel_row_layout`): name -> (k,) sums."""
    return {name: rows[block] @ grad_v for name, block in layout.items()}


def pixel_partials_chain(s, fdet, sdet, odet, pixel_size, layer_depth, wavelength, orient,
                         n_cells, default_f, close_distance, scale, background, layered: bool,
                         point_pixel: bool, polarized: bool, n_path: int = 0,
                         weighted: bool = False, shape: str = "square"):
    """Gradients of ``sum(grad_v * value)`` with respect to `pixel_partials`' inputs ``fdet``
    to ``background`` (each of its input's shape), then with ``weighted`` the weights', from
    the rows' sums weighted by ``grad_v`` by block (``s``, `row_sums`): the chain rule on
    (3,)-sized values, linear in ``s``. Without the pixel factors' dependence
    (``scale``, ``background``, ``default_F``, the distance and pixel size in omega) a
    gradient follows from the ``background`` and ``lattice`` rows; the ``default_F`` gradient
    is ``2 scale sum(grad_v P omega B) / F`` (exactly 0 at F = 0). ``n_path``: the paths
    with rows of their own (several sources). With Gaussian spots (``shape``) the gradients
    of ``recip`` (0 for diffBragg's, which does not read it), ``fudge`` and ``n_offdiag``
    follow the ``background`` one, and N's has no ``N <= 1`` rule (square spots take such an
    axis as 1)."""
    g = {name: scale * block for name, block in s.items()}
    s_background, s_lattice = s["background"][0], s["lattice"][0]
    d_orient = g["orient"].reshape(orient.shape)
    d_n = g["n_cells"]
    if shape == "square":  # square spots take an axis with N <= 1 as 1
        d_n = torch.where(n_cells > 1, d_n, torch.zeros_like(d_n))
    if n_path:
        d_incident = g["path_incident"].reshape(n_path, 1, 3)
        d_wavelength = g["path_wavelength"].reshape(n_path, 1)
    else:
        d_incident = g["incident"].reshape(1, 1, 3)
        d_wavelength = -(orient * d_orient).sum().reshape(1, 1) / wavelength
    d_fdet, d_sdet, d_pix0 = g["fdet"], g["sdet"], g["pix0"]
    along_layer = g["layer"] if layered else torch.zeros_like(d_pix0)
    d_scale = s_lattice + background * s_background  # sum(grad_v value) / scale
    zero_f = default_f == 0
    d_f = torch.where(zero_f, 0.0, 2.0 * scale * s_lattice / torch.where(zero_f, 1.0, default_f))
    d_pixel_size = (fdet * d_fdet + sdet * d_sdet).sum() / pixel_size
    if point_pixel:
        d_close = torch.zeros_like(close_distance)
    else:  # omega = pixel^2 close / R^3
        d_close = scale * d_scale / close_distance
        d_pixel_size = d_pixel_size + 2.0 * scale * d_scale / pixel_size
    if polarized:
        d_e, d_b, d_k = g["e_in"], g["b_in"], g["kahn"][0]
    else:
        d_e = d_b = torch.zeros_like(d_pix0)
        d_k = torch.zeros_like(default_f)
    out = (d_fdet, d_sdet, along_layer * layer_depth, d_pix0, d_pixel_size,
           (odet * along_layer).sum(), d_incident, d_wavelength, d_orient, d_n, d_f, d_close,
           d_e, d_b, d_k, d_scale, scale * s_background)
    if shape != "square":
        d_recip = g["recip"].reshape(3, 3) if "recip" in g else torch.zeros_like(orient[0])
        out += (d_recip, g["fudge"][0], g["n_offdiag"])
    return out + ((g["path_weight"].reshape(n_path, 1),) if weighted else ())


# the unrolled paths make one large fused loop: inductor's default node limit would split it
# into several loops that store the per-path values
PARTIALS_OPTIONS = {"realize_reads_threshold": 8, "max_fusion_size": 4096}
_compiled_partials = compiled(lattice_partials, static_argnames=("oversample", "layered", "per_path"),
                              options=PARTIALS_OPTIONS)
_compiled_pixel = compiled(pixel_partials, static_argnames=("oversample", "layered", "point_pixel",
                                                            "polarized", "per_path"),
                           options=PARTIALS_OPTIONS)


def pixel_partials_sum(fdet, sdet, odet, pix0, pixel_size, layer_depth, incident, wavelength,
                       orient, n_cells, default_f, close_distance, e_in, b_in, kahn, scale,
                       background, fpix, spix, sub_f, sub_s, layer, weight=None, *, oversample: int,
                       layered: bool, point_pixel: bool, polarized: bool, per_path: bool = False,
                       gauss=None, compile: bool, blocks=None):
    """`pixel_partials` without autograd, compiled (``compile``) at most `PATHS_PER_CALL` paths
    per call with one orientation (the first group's call adds the others'
    `lattice_partials`), or in one call. Arguments and result as `pixel_partials` (``blocks``
    eager only)."""
    pick = lambda x, g: x[g] if per_path and x is not None else x  # noqa: E731
    lattice = lambda g: (fdet, sdet, odet, pix0, pixel_size, layer_depth, pick(incident, g),  # noqa: E731
                         pick(wavelength, g), orient, n_cells, default_f)
    pixel = (close_distance, e_in, b_in, kahn, scale, background)
    flags = {"oversample": oversample, "layered": layered, "point_pixel": point_pixel,
             "polarized": polarized, "per_path": per_path, "gauss": gauss}
    with torch.no_grad():
        if not compile:
            return pixel_partials(*lattice(slice(None)), *pixel, fpix, spix, sub_f, sub_s, layer,
                                  weight=weight, blocks=blocks, **flags)
        if blocks is not None:
            raise ValueError("the compiled partial sums make every block (blocks=None)")
        n_paths = sub_f.shape[0]
        # paths are unrolled with one orientation only (`_lattice_rows`): else one call
        size = n_paths if orient.shape[0] > 1 else math.ceil(n_paths / math.ceil(n_paths / PATHS_PER_CALL))
        carried = [None, None, None]
        for start in range(size, n_paths, size):
            group = slice(start, start + size)
            sums = _compiled_partials(*lattice(group), fpix, spix, sub_f[group], sub_s[group],
                                      layer[group], pick(weight, group), oversample=oversample,
                                      layered=layered, per_path=per_path, gauss=gauss)
            carried = (list(sums) if carried[0] is None
                       else [a + b for a, b in zip(carried[:2], sums[:2])] + [torch.cat([carried[2], sums[2]], 1)])
        first = slice(0, size)
        return _compiled_pixel(*lattice(first), *pixel, fpix, spix, sub_f[first], sub_s[first],
                               layer[first], *carried, weight=pick(weight, first), **flags)
