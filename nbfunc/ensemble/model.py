"""The ensemble model: per-shot trees, shared structure factors, the total Poisson likelihood.

Shot ``s`` has its own `nbfunc.Params` tree ``p_s`` (geometry, orientation ``crystal.misset``,
scale ``beam.fluence``, crystal size ``crystal.Na/Nb/Nc``, ...), observed counts ``k_s``
(slow, fast) and a mask of the pixels to use. All shots share the amplitudes ``f_asu``
(n_asu,) of the asymmetric unit (`nbfunc.ensemble.asu`). The expected counts are

    mu_s = simulate(p_s with crystal.fhkl = fhkl_grid(f_asu, index))          (photons)

and the total negative log-likelihood, with optional Gaussian restraints, is

    NLL = sum_s sum_i (mu_si - k_si log mu_si + log k_si!)
          + sum_e (x_e - c_e)^2 / (2 sigma_e^2).

A shot's free elements (``"crystal.misset"``, ``"crystal.Na"``, ...) form its vector
``theta_s`` (m,), in the leaves' own units (deg, cells, photons/m^2); the same names are free
in every shot. Gradients come shot by shot (`shot_value_and_grad`, w.r.t. every leaf of the
tree and ``f_asu``), or for shots of equal shape by ``torch.func.vmap`` (`stacked_value_and_grad`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch

from nbfunc.ensemble.asu import AsuMap, fhkl_grid
from nbfunc.likelihood import (Terms, element_name, linearize, pack, parse_free, pixel_deviance,
                               pixel_nll, terms_from, unpacker)
from nbfunc.params import Params
from nbfunc.render import simulate
from nbfunc.tree import get_leaf, leaf_paths, replace_leaves, stack

F_NAME = "F"
"""The name of the global amplitudes in ``restraints``."""


@dataclass(frozen=True, eq=False)
class Shot:
    """One observed still and its tree.

    Attributes:
        index: the shot's global number (0 .. n_shots - 1), used in messages and results.
        params: its tree, on the `AsuMap`'s grid: ``crystal.fhkl`` of ``index``'s shape,
            ``crystal.hkl_origin`` the map's origin, ``crystal.default_F`` 0.
        counts: (slow, fast) float64 observed photons.
        include: (slow, fast) bool, True for the pixels the likelihood uses.
    """

    index: int
    params: Params
    counts: torch.Tensor
    include: torch.Tensor


class State(NamedTuple):
    """The refined values: ``f_asu`` (n_asu,) amplitudes (e) and one ``theta`` (m,) per
    shot of this rank (the free elements' units)."""

    f_asu: torch.Tensor
    thetas: tuple[torch.Tensor, ...]


@dataclass(frozen=True, eq=False)
class Ensemble:
    """The shots of this rank and what they share.

    Attributes:
        amap: the asymmetric unit and its grid map.
        shots: this rank's shots (`nbfunc.ensemble.distributed.shard` of all of them).
        n_shots: number of shots over all ranks.
        free: (m,) names of each shot's free elements (``"crystal.misset[0]"``, ...).
        start: the starting `State` (this rank's thetas), also the restraints' centres.
        f_sigma: (n_asu,) restraint width of each amplitude (e); inf: none.
        theta_sigma: (m,) restraint width of each free element (its unit); inf: none.
    """

    amap: AsuMap
    shots: tuple[Shot, ...]
    n_shots: int
    free: tuple[str, ...]
    start: State
    f_sigma: torch.Tensor
    theta_sigma: torch.Tensor


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------
def on_grid(p: Params, amap: AsuMap) -> Params:
    """``p`` with the map's (zero) amplitude grid, origin and ``default_F = 0``: every
    reflection's F then comes from ``f_asu``."""
    zero = p.crystal.default_F.new_zeros(())
    grid = torch.zeros(tuple(amap.index.shape), dtype=zero.dtype, device=zero.device)
    crystal = p.crystal.model_copy(update={"fhkl": grid, "hkl_origin": amap.origin,
                                           "default_F": zero})
    return p.model_copy(update={"crystal": crystal})


def make_shot(index: int, p: Params, counts, amap: AsuMap, mask=None) -> Shot:
    """A `Shot` from a tree, its observed counts (slow, fast) and an optional mask (slow,
    fast; nonzero: use the pixel).

    Raises:
        ValueError: counts or mask of the wrong shape, or counts not finite and >= 0 (one line).
    """
    shape = (p.detector.spixels, p.detector.fpixels)
    counts = torch.as_tensor(counts).to(torch.float64)
    if tuple(counts.shape) != shape:
        raise ValueError(f"shot {index}: counts have shape {tuple(counts.shape)}, the tree's "
                         f"detector (spixels, fpixels) = {shape}; give the image of this shot")
    if not bool((torch.isfinite(counts) & (counts >= 0)).all()):
        raise ValueError(f"shot {index}: counts must be finite and >= 0 (photons), got min "
                         f"{float(counts.nan_to_num(nan=-1.0).min()):g}; mask bad pixels instead")
    include = torch.ones(shape, dtype=torch.bool) if mask is None else torch.as_tensor(mask) != 0
    if tuple(include.shape) != shape:
        raise ValueError(f"shot {index}: mask has shape {tuple(include.shape)}, expected {shape} "
                         "(nonzero marks the pixels to use)")
    return Shot(index, on_grid(p, amap), counts, include)


def free_elements(p: Params, free: Sequence[str]) -> list[tuple[str, int | None]]:
    """The free elements of a tree (`nbfunc.likelihood.parse_free`); ``crystal.fhkl`` and
    ``crystal.default_F`` are refused (the amplitudes are global)."""
    try:
        elements = parse_free(list(free), _leaves(p))
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    bad = sorted({q for q, _ in elements} & {"crystal.fhkl", "crystal.default_F"})
    if bad:
        raise ValueError(f"{bad[0]} cannot be a per-shot free leaf: the amplitudes are the "
                         "ensemble's global f_asu; leave it out of free")
    return elements


def restraint_widths(names: Sequence[str], restraints: Mapping[str, float]) -> torch.Tensor:
    """(m,) width for each element name: the entry for the element (``"crystal.misset[1]"``)
    or its leaf (``"crystal.misset"``), inf without one."""
    out = []
    for name in names:
        leaf = name.split("[")[0]
        out.append(float(restraints.get(name, restraints.get(leaf, math.inf))))
    return torch.tensor(out, dtype=torch.float64)


def check_restraints(restraints: Mapping[str, float], names: Sequence[str]) -> None:
    """Refuse restraints on names that are neither ``"F"`` nor free elements or their leaves,
    and widths that are not > 0."""
    known = {F_NAME} | set(names) | {n.split("[")[0] for n in names}
    for name, sigma in restraints.items():
        if name not in known:
            raise ValueError(f"restraint on {name!r}, which is not refined; restrain 'F' or a "
                             f"free element: {sorted(known)}")
        if not (float(sigma) > 0):
            raise ValueError(f"restraint width of {name!r} is {sigma}; give a sigma > 0 in the "
                             "element's unit")


def make_ensemble(amap: AsuMap, shots: Sequence[Shot], n_shots: int, free: Sequence[str],
                  f_start: torch.Tensor, restraints: Mapping[str, float] | None = None,
                  reference: Params | None = None) -> Ensemble:
    """An `Ensemble` of this rank's ``shots``; every shot frees the elements ``free``.

    Args:
        f_start: (n_asu,) starting amplitudes (e), not 0 (``dmu/dF = 0`` at F = 0).
        restraints: ``{name: sigma}``: ``"F"`` restrains every amplitude to ``f_start``,
            an element or leaf name each shot's element(s) to its starting value.
        reference: a tree of the ensemble that names the free elements (default: the first
            shot's); needed by a rank without shots, so that every rank checks alike.
    """
    restraints = dict(restraints or {})
    f_start = torch.as_tensor(f_start, dtype=torch.float64).reshape(-1)
    if f_start.shape != (amap.n_asu,):
        raise ValueError(f"f_start has {f_start.numel()} values, the asymmetric unit "
                         f"{amap.n_asu}; give one amplitude per reflection of amap.hkl")
    if not bool((torch.isfinite(f_start) & (f_start != 0)).all()):
        raise ValueError("f_start must be finite and non-zero (e): the likelihood does not "
                         "change with F at F = 0; start from e.g. a constant 100")
    reference = reference if reference is not None else (shots[0].params if shots else None)
    if reference is None:
        raise ValueError("make_ensemble: no shots on this rank and no reference tree; pass "
                         "reference= (any shot's tree) to name the free elements")
    names = tuple(element_name(q, i) for q, i in free_elements(reference, free))
    check_restraints(restraints, names)
    thetas = tuple(_theta(s.params, free) for s in shots)
    f_sigma = torch.full((amap.n_asu,), float(restraints.get(F_NAME, math.inf)), dtype=torch.float64)
    return Ensemble(amap, tuple(shots), n_shots, names, State(f_start, thetas), f_sigma,
                    restraint_widths(names, restraints))


def _leaves(p: Params) -> dict[str, torch.Tensor]:
    return {path: get_leaf(p, path) for path in leaf_paths(p)}


def _theta(p: Params, free: Sequence[str]) -> torch.Tensor:
    """(m,) the values of the free elements in ``p`` (m = 0 without any)."""
    return pack(_leaves(p), free_elements(p, free))


# --------------------------------------------------------------------------------------------
# One shot
# --------------------------------------------------------------------------------------------
def shot_tree(shot: Shot, amap: AsuMap, f_asu: torch.Tensor, free: Sequence[str] = (),
              theta: torch.Tensor | None = None) -> Params:
    """The shot's tree with the amplitudes ``f_asu`` (n_asu,) and, when given, its free
    elements ``free`` set to ``theta`` (m,)."""
    updates = {"crystal.fhkl": fhkl_grid(f_asu, amap.index)}
    if theta is not None and len(free):
        updates.update(unpacker(_leaves(shot.params), free_elements(shot.params, free))(theta))
    return replace_leaves(shot.params, updates)


def image_nll(mu: torch.Tensor, counts: torch.Tensor, include: torch.Tensor) -> torch.Tensor:
    """Poisson NLL of an image: ``sum_i mu_i - k_i log mu_i + log k_i!`` over the included
    pixels with ``mu > 0`` (`nbfunc.likelihood.pixel_nll`); any shape."""
    return pixel_nll(mu, counts, include).sum()


def tree_nll(p: Params, f_asu: torch.Tensor, counts: torch.Tensor, include: torch.Tensor,
             index: torch.Tensor) -> torch.Tensor:
    """NLL of one shot as a function of its whole tree ``p`` and ``f_asu`` (n_asu,)."""
    q = replace_leaves(p, {"crystal.fhkl": fhkl_grid(f_asu, index)})
    return image_nll(simulate(q), counts, include)


def shot_value_and_grad(shot: Shot, amap: AsuMap, f_asu: torch.Tensor
                        ) -> tuple[torch.Tensor, Params, torch.Tensor]:
    """``(nll, d nll / d tree, d nll / d f_asu)``: the gradient w.r.t. every leaf of the
    shot's tree (a tree shaped like it, 1/unit of each leaf; its ``crystal.fhkl`` entry is
    the gradient w.r.t. the grid before symmetry) and w.r.t. the global amplitudes (n_asu,)
    (1/e), by reverse mode."""
    grad = torch.func.grad_and_value(tree_nll, argnums=(0, 1))
    (g_tree, g_f), value = grad(shot.params, f_asu, shot.counts, shot.include, amap.index)
    return value, g_tree, g_f


def stacked_value_and_grad(shots: Sequence[Shot], amap: AsuMap, f_asu: torch.Tensor
                           ) -> tuple[torch.Tensor, Params, torch.Tensor]:
    """`shot_value_and_grad` of shots of equal shape at once, by ``torch.func.vmap``:
    ``(nll (shots,), gradient tree with a leading (shots,) axis, (shots, n_asu))``.

    Raises:
        ValueError: shots differing in a static setting or a leaf's shape (`nbfunc.stack`).
    """
    grad = torch.func.grad_and_value(tree_nll, argnums=(0, 1))
    batched = torch.func.vmap(grad, in_dims=(0, None, 0, 0, None))
    counts = torch.stack([s.counts for s in shots])
    include = torch.stack([s.include for s in shots])
    (g_tree, g_f), value = batched(stack([s.params for s in shots]), f_asu, counts, include,
                                   amap.index)
    return value, g_tree, g_f


def used_pixels(shot: Shot) -> torch.Tensor:
    """(pixels,) flat indices of the included pixels, raster order."""
    return torch.nonzero(shot.include.reshape(-1))[:, 0]


def shot_mu(shot: Shot, amap: AsuMap, free: Sequence[str], f_asu: torch.Tensor,
            theta: torch.Tensor) -> torch.Tensor:
    """(pixels,) expected photons of the included pixels."""
    image = simulate(shot_tree(shot, amap, f_asu, free, theta))
    return image.reshape(-1)[used_pixels(shot)]


def shot_deviance(shot: Shot, amap: AsuMap, free: Sequence[str], f_asu: torch.Tensor,
                  theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(deviance, nll)`` of one shot: half the Poisson deviance (`pixel_deviance`, 0 at
    ``mu = k``; what the refinement minimises) and the NLL, summed over its used pixels."""
    mu = shot_mu(shot, amap, free, f_asu, theta)
    counts = shot.counts.reshape(-1)[used_pixels(shot)]
    include = torch.ones_like(counts, dtype=torch.bool)
    return pixel_deviance(mu, counts, include).sum(), pixel_nll(mu, counts, include).sum()


def touched(shot: Shot, amap: AsuMap, free: Sequence[str], theta: torch.Tensor) -> torch.Tensor:
    """(t,) int64 positions in ``f_asu`` of the reflections that reach the shot's used
    pixels: where ``d sum(mu) / d f_asu != 0`` at unit amplitudes."""
    cell = shot.params.crystal.cell_a
    ones = torch.ones(amap.n_asu, dtype=cell.dtype, device=cell.device)
    grad = torch.func.grad(lambda f: shot_mu(shot, amap, free, f, theta).sum())(ones)
    return torch.nonzero(grad != 0)[:, 0]


class Blocks(NamedTuple):
    """One shot's share of the joint Fisher system at a point.

    ``cols`` (t,) are the touched amplitudes; ``terms`` (`nbfunc.likelihood.Terms`) holds
    NLL, deviance, gradient (t + m,) and Fisher information (t + m, t + m) over the
    vector ``[f_asu[cols], theta]`` (amplitudes first; 1/e, 1/unit); ``curvature`` (t,) is
    the observed information's diagonal in the amplitudes (`amplitude_curvature`; the
    Fisher diagonal for a shot with ``crystal.interpolate``).
    """

    cols: torch.Tensor
    terms: Terms
    curvature: torch.Tensor


def shot_blocks(shot: Shot, amap: AsuMap, free: Sequence[str], f_asu: torch.Tensor,
                theta: torch.Tensor) -> Blocks:
    """`Blocks` of one shot: the Jacobian of its used pixels w.r.t. the touched amplitudes
    (t columns) and its free elements (m columns) by ``torch.func.jacfwd``, then
    ``J^T (1 - k/mu)`` and ``J^T diag(1/mu) J``.

    The two sets of columns are separate forward passes: tangents of the amplitudes do not
    reach the lattice factor, so their t columns cost little more than a render, whereas a
    joint pass would carry all t + m columns through the geometry and lattice sums.
    """
    cols = touched(shot, amap, free, theta)
    jac_f, mu = _jacobian(lambda x: shot_mu(shot, amap, free, f_asu.index_copy(0, cols, x), theta),
                          f_asu[cols])
    jac_t = _jacobian(lambda th: shot_mu(shot, amap, free, f_asu, th), theta)[0]
    counts = shot.counts.reshape(-1)[used_pixels(shot)]
    jac = torch.cat([jac_f, jac_t], 1)
    terms = terms_from(jac, mu, counts, torch.ones_like(counts, dtype=torch.bool))
    curvature = (torch.diagonal(terms.fisher)[:len(cols)] if shot.params.crystal.interpolate
                 else amplitude_curvature(jac_f, mu, counts, f_asu[cols]))
    if not (bool(torch.isfinite(terms.fisher).all()) and bool(torch.isfinite(terms.grad).all())):
        raise ValueError(f"shot {shot.index}: the Jacobian of its image is not finite at this "
                         "point; check its tree (e.g. Na, Nb, Nc >= 1) or restrain its free leaves")
    return Blocks(cols, terms, curvature)


def amplitude_curvature(jac_f: torch.Tensor, mu: torch.Tensor, counts: torch.Tensor,
                        f: torch.Tensor) -> torch.Tensor:
    """(t,) the diagonal of the observed information (the deviance's Hessian) in the
    amplitudes ``f`` (t,) (1/e^2), from their Jacobian ``jac_f`` (pixels, t):

        d2/dF_j^2 = sum_p k_p J_pj^2 / mu_p^2 + (1 - k_p/mu_p) d2mu_p/dF_j^2,

    with ``d2mu_p/dF_j^2 = J_pj / F_j``, exact for nearest-neighbour structure factors (each
    path reads one amplitude, ``mu_p = sum_j F_j^2 c_pj + b_p``). Pixels with ``mu <= 0``
    count for nothing, as in the likelihood.
    """
    used = mu > 0
    safe = torch.where(used, mu, torch.ones_like(mu))
    ratio = torch.where(used, counts / safe, 0.0)
    first = (jac_f**2 * (ratio / safe)[:, None]).sum(0)
    second = (jac_f * torch.where(used, 1 - ratio, 0.0)[:, None]).sum(0) / f
    return first + second


def _jacobian(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`nbfunc.likelihood.linearize` (J (pixels, n), value (pixels,)), also for n = 0."""
    if x.numel():
        return linearize(fn, x)
    value = fn(x)
    return value.new_zeros(value.shape[0], 0), value


def restraint(x: torch.Tensor, centre: torch.Tensor, sigma: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian restraint ``sum (x - c)^2 / (2 sigma^2)``: (value, gradient (n,), curvature
    (n,) ``1/sigma^2``); 0 where ``sigma`` is inf."""
    sigma = sigma.to(x.device)
    curvature = 1 / sigma**2
    delta = torch.where(torch.isfinite(sigma), x - centre, 0.0)
    return (0.5 * curvature * delta**2).sum(), curvature * delta, curvature
