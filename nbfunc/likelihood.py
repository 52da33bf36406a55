"""The Poisson likelihood of an observed image, as a function of a few free parameters.

A `Problem` turns "this parameter tree (or this toy model), these observed counts, this mask,
these free leaves" into a function of one flat parameter vector ``theta`` (n,), in the free
leaves' own units (Angstrom, mm, deg, ...). The image is cut into `Tile` s of pixels: each
tile renders only its own pixels (through ``sampling.roi`` and ``sampling.mask``), so the
Jacobian of a tile, (pixels, n), bounds the memory whatever the image size.

The negative log-likelihood of counts ``k`` given expected counts ``mu`` (photons) is

    NLL = sum_i  mu_i - k_i log mu_i + log k_i!

over the used pixels: inside the ROI, not masked, and ``mu_i > 0``. Its gradient, Fisher
information and observed information (Hessian) are

    g = J^T (1 - k/mu),    F = J^T diag(1/mu) J,    H = F + sum_i (1 - k_i/mu_i) d2mu_i,

with ``J = d mu / d theta`` computed by ``torch.func.jacfwd`` one tile at a time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, NamedTuple, Sequence

import torch

from nbfunc.params import Node, Params
from nbfunc.render import rendered_pixels, simulate_pixels
from nbfunc.tree import get_leaf, leaf_paths, replace_leaves

DEFAULT_TILE_PIXELS = 1 << 18
"""Pixels per tile: a tile's Jacobian holds ``tile_pixels * n`` numbers (2 MiB per free
element in float64). The render inside a tile is chunked like any render, so its memory does
not grow with the tile; fewer tiles mean fewer set-ups and calls (`nbfunc.uncertainty` with 10
free leaves on bench_1024's 256x256 ROI, compiled: 50 ms in one tile, 95 ms in four)."""

POSITIVE_LEAVES = frozenset({
    "beam.wavelength", "beam.fluence", "beam.sources.wavelengths", "detector.distance",
    "detector.pixel_size", "crystal.cell_a", "crystal.cell_b", "crystal.cell_c", "crystal.Na",
    "crystal.Nb", "crystal.Nc", "crystal.mosaic_spread", "crystal.fudge", "crystal.water_size",
    "crystal.G", "crystal.diffuse_gamma"})
"""Leaves of a `Params` tree that must stay > 0 during a fit (fitted in log space). Not
``crystal.B`` or ``crystal.diffuse_sigma``: 0 (no B factor, no displacement) is a value the
tree accepts and a fit may need to start at or reach; nor ``crystal.eta``, whose tensor form
has signed terms."""

_UNITS = ("Angstrom", "mm", "deg", "mrad", "um", "e", "photons/m^2", "1/mm", "fraction")
_ELEMENT = re.compile(r"^(?P<path>[^\[\]]+)\[(?P<index>\d+)\]$")


@dataclass(frozen=True, eq=False)
class Tile:
    """A block of pixels: its expected counts as a function of ``theta``, and its data.

    Attributes:
        model: ``theta (n,) -> mu (pixels,)`` expected counts (photons) of the tile's pixels.
        counts: (pixels,) observed counts.
        include: (pixels,) bool, False for pixels left out (masked); pixels whose ``mu <= 0``
            are left out as well, at each evaluation.
        pixels: (pixels,) int64 flat indices of the tile's pixels in the observed image, or
            None for all of them in order (``counts`` is the image's at these pixels).
    """

    model: Callable[[torch.Tensor], torch.Tensor]
    counts: torch.Tensor
    include: torch.Tensor
    pixels: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class Problem:
    """A Poisson likelihood of ``theta``, the free parameters, flattened to one vector.

    Attributes:
        names: (n,) one name per free element, e.g. ``"detector.distance"``,
            ``"crystal.misset[0]"``.
        units: (n,) the unit of each element ("" when dimensionless or unknown).
        start: (n,) the values in the tree (or dict) the problem was built from.
        positive: (n,) bool, elements that must stay > 0.
        tiles: the pixel tiles.
        rebuild: ``theta -> tree`` (a `Params` tree, or the dict given to a toy model).
        shape: shape of the observed image.
    """

    names: tuple[str, ...]
    units: tuple[str, ...]
    start: torch.Tensor
    positive: torch.Tensor
    tiles: tuple[Tile, ...]
    rebuild: Callable[[torch.Tensor], Any]
    shape: tuple[int, ...]


class Terms(NamedTuple):
    """Likelihood terms at one ``theta`` (theta's units).

    ``nll`` is the negative log-likelihood; ``deviance`` is ``nll`` minus its value for
    ``mu = k`` (the same function of theta up to a constant, but summed from terms of order 1,
    so that differences stay accurate to ~1e-12 near the optimum); gradient (n,) and Fisher
    information (n, n) are those of both.
    """

    nll: torch.Tensor
    deviance: torch.Tensor
    grad: torch.Tensor
    fisher: torch.Tensor


# --------------------------------------------------------------------------------------------
# Free elements: names <-> flat vector
# --------------------------------------------------------------------------------------------
def parse_free(free: Sequence[str], leaves: Mapping[str, torch.Tensor]) -> list[tuple[str, int | None]]:
    """Free elements as ``(path, flat index or None for a whole leaf)``, one per element.

    ``"crystal.misset"`` frees the three angles, ``"crystal.misset[2]"`` only the third.

    Raises:
        KeyError: a name that is not a leaf, listing the leaves.
        ValueError: an element index out of range, or an element named twice.
    """
    out: list[tuple[str, int | None]] = []
    for name in free:
        match = _ELEMENT.match(name)
        path = match["path"] if match else name
        if path not in leaves:
            raise KeyError(f"{name!r} is not a leaf; free leaves must be among {list(leaves)} "
                           "(optionally with an element index, e.g. 'crystal.misset[0]')")
        numel = leaves[path].numel()
        if match:
            index = int(match["index"])
            if index >= numel:
                raise ValueError(f"{name!r}: leaf {path} has {numel} elements (indices 0..{numel - 1})")
            out.append((path, index if numel > 1 else None))
        else:
            out.extend([(path, None)] if numel == 1 else [(path, i) for i in range(numel)])
    names = [element_name(p, i) for p, i in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"free elements named more than once: {twice}; list each once")
    return out


def element_name(path: str, index: int | None) -> str:
    """``"crystal.misset[0]"`` for an element, ``"detector.distance"`` for a scalar leaf."""
    return path if index is None else f"{path}[{index}]"


def pack(leaves: Mapping[str, torch.Tensor], elements: Sequence[tuple[str, int | None]]) -> torch.Tensor:
    """The free elements' values as one float64 vector (n,); (0,) when nothing is free."""
    if not elements:
        device = next(iter(leaves.values())).device if leaves else None
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.stack([leaves[p].reshape(-1)[i or 0].to(torch.float64) for p, i in elements])


def unpacker(leaves: Mapping[str, torch.Tensor], elements: Sequence[tuple[str, int | None]]
             ) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """``theta (n,) -> {path: new leaf}`` for the leaves holding free elements.

    Elements not freed keep their value; the map is linear in ``theta`` (a one-hot matrix),
    so it works under every torch.func transform.
    """
    plan = []
    for path in dict.fromkeys(p for p, _ in elements):
        leaf = leaves[path]
        where = [(k, i or 0) for k, (p, i) in enumerate(elements) if p == path]
        onehot = torch.zeros(leaf.numel(), len(where), dtype=leaf.dtype, device=leaf.device)
        for col, (_, i) in enumerate(where):
            onehot[i, col] = 1.0
        keep = leaf.reshape(-1) * (1 - onehot.sum(1))
        plan.append((path, leaf.shape, torch.tensor([k for k, _ in where]), onehot, keep))

    def unpack(theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {path: (keep + onehot @ theta[index].to(onehot.dtype)).reshape(shape)
                for path, shape, index, onehot, keep in plan}

    return unpack


def leaf_unit(tree: Node, path: str) -> str:
    """The unit of a leaf, read from its field description (e.g. ``"(mm)"``), or ""."""
    *parents, name = path.split(".")
    node = get_leaf(tree, ".".join(parents)) if parents else tree
    field = type(node).model_fields.get(name)
    match = re.search(r"\(([^()]*)\)", (field.description or "") if field else "")
    return match[1] if match and match[1] in _UNITS else ""


# --------------------------------------------------------------------------------------------
# Building problems
# --------------------------------------------------------------------------------------------
def poisson_problem(model: Params | Callable[[dict], torch.Tensor], observed: torch.Tensor,
                    free: Sequence[str] | Mapping[str, Any], *, mask: torch.Tensor | None = None,
                    tile_pixels: int = DEFAULT_TILE_PIXELS,
                    positive: Collection[str] | None = None) -> Problem:
    """The Poisson likelihood of ``observed`` counts under a tree or a toy model.

    Args:
        model: a `Params` tree (expected counts from `nbfunc.simulate`, background included),
            or a callable ``model(leaves: dict[str, Tensor]) -> mu`` of any shape (photons).
        observed: counts, shape (slow, fast) for a tree, ``mu``'s shape for a callable.
        free: for a tree, leaf names from ``p.leaf_paths()`` (``"crystal.misset"`` frees its
            three elements, ``"crystal.misset[0]"`` one); for a callable, ``{name: value}``,
            the point at which the problem starts (a tensor of any shape per name).
        mask: bool, ``observed``'s shape, True for the pixels to use (None: all). For a tree,
            ``sampling.roi`` and ``sampling.mask`` of the tree also apply.
        tile_pixels: pixels per tile (trees only); memory is about ``tile_pixels * n`` numbers.
        positive: names that must stay > 0 in a fit (default: `POSITIVE_LEAVES` for a tree,
            none for a callable).
    """
    if isinstance(model, Params):
        return tree_problem(model, observed, list(free), mask=mask, tile_pixels=tile_pixels,
                            positive=POSITIVE_LEAVES if positive is None else positive)
    if callable(model):
        if not isinstance(free, Mapping):
            raise TypeError("for a callable model, free must be a dict {name: starting value}; "
                            f"got {type(free).__name__}")
        return model_problem(model, observed, free, mask=mask, positive=positive or ())
    raise TypeError(f"model must be an nbfunc.Params tree or a callable dict -> mu, got {type(model).__name__}")


def model_problem(model: Callable[[dict], torch.Tensor], observed: torch.Tensor,
                  free: Mapping[str, Any], *, mask: torch.Tensor | None = None,
                  positive: Collection[str] = ()) -> Problem:
    """`poisson_problem` for a toy ``model({name: tensor}) -> mu``: one tile of all pixels."""
    values = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in free.items()}
    elements = parse_free(list(values), values)
    unpack = unpacker(values, elements)
    observed = torch.as_tensor(observed, dtype=torch.float64)
    include = _mask_like(mask, observed.shape)
    rebuild = lambda theta: {**values, **unpack(theta)}
    tile = Tile(lambda theta: model(rebuild(theta)).reshape(-1), observed.reshape(-1),
                include.reshape(-1))
    names = tuple(element_name(p, i) for p, i in elements)
    return Problem(names, ("",) * len(names), pack(values, elements),
                   torch.tensor([p in positive for p, _ in elements]), (tile,), rebuild,
                   tuple(observed.shape))


def tree_problem(p: Params, observed: torch.Tensor, free: Sequence[str], *,
                 mask: torch.Tensor | None = None, tile_pixels: int = DEFAULT_TILE_PIXELS,
                 positive: Collection[str] = POSITIVE_LEAVES) -> Problem:
    """`poisson_problem` for a `Params` tree: row bands of the ROI rendered one at a time."""
    det = p.detector
    shape = (det.spixels, det.fpixels)
    observed = torch.as_tensor(observed, dtype=torch.float64)
    if tuple(observed.shape) != shape:
        raise ValueError(f"observed image has shape {tuple(observed.shape)}, expected (spixels, "
                         f"fpixels) = {shape}; pass the full detector image (use mask for a part)")
    leaves = {path: get_leaf(p, path) for path in leaf_paths(p)}
    elements = parse_free(free, leaves)
    unpack = unpacker(leaves, elements)
    rebuild = lambda theta: replace_leaves(p, unpack(theta))
    include = used_pixels(p, _mask_like(mask, shape))
    tiles = tuple(_band_tile(p, unpack, observed, include, rows)
                  for rows in row_bands(include, tile_pixels))
    names = tuple(element_name(q, i) for q, i in elements)
    units = tuple(leaf_unit(p, q) for q, _ in elements)
    return Problem(names, units, pack(leaves, elements),
                   torch.tensor([q in positive for q, _ in elements]), tiles, rebuild, shape)


def used_pixels(p: Params, mask: torch.Tensor) -> torch.Tensor:
    """(slow, fast) bool: inside ``sampling.roi``, not masked by the tree nor by ``mask``."""
    smp, det = p.sampling, p.detector
    x0, x1, y0, y1 = smp.roi if smp.roi is not None else (0, det.fpixels, 0, det.spixels)
    keep = torch.zeros(det.spixels, det.fpixels, dtype=torch.bool)
    keep[y0:y1 + 1, x0:x1 + 1] = True
    if smp.mask is not None:
        keep &= smp.mask.cpu().bool()
    return keep & mask.cpu()


def row_bands(include: torch.Tensor, tile_pixels: int) -> list[tuple[int, int]]:
    """Inclusive row ranges ``(first, last)`` holding about ``tile_pixels`` used pixels each.

    >>> row_bands(torch.ones(10, 4, dtype=torch.bool), 12)
    [(0, 2), (3, 5), (6, 8), (9, 9)]
    """
    if tile_pixels < 1:
        raise ValueError(f"tile_pixels must be >= 1, got {tile_pixels}")
    bands: list[tuple[int, int]] = []
    count = 0
    for row, n in enumerate(include.sum(1).tolist()):
        if n == 0:
            continue
        if bands and count + n <= tile_pixels:
            bands[-1], count = (bands[-1][0], row), count + n
        else:
            bands.append((row, row))
            count = n
    return bands


def _band_tile(p: Params, unpack, observed, include, rows: tuple[int, int]) -> Tile:
    """The tile of rows ``rows`` (inclusive): renders only its used pixels."""
    band = torch.zeros_like(include)
    band[rows[0]:rows[1] + 1] = include[rows[0]:rows[1] + 1]
    columns = torch.nonzero(band.any(0))[:, 0]
    roi = (int(columns[0]), int(columns[-1]), rows[0], rows[1])
    sampling = p.sampling.model_copy(update={"roi": roi, "mask": band})
    tree = p.model_copy(update={"sampling": sampling})
    pixels = rendered_pixels(tree)

    def model(theta: torch.Tensor) -> torch.Tensor:
        return simulate_pixels(replace_leaves(tree, unpack(theta)))

    return Tile(model, observed.reshape(-1)[pixels], torch.ones(len(pixels), dtype=torch.bool),
                pixels)


def _mask_like(mask: torch.Tensor | None, shape) -> torch.Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool)
    mask = torch.as_tensor(mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the image shape "
                         f"{tuple(shape)} (True marks pixels to use)")
    return mask != 0


# --------------------------------------------------------------------------------------------
# Likelihood terms
# --------------------------------------------------------------------------------------------
def pixel_deviance(mu: torch.Tensor, counts: torch.Tensor, include: torch.Tensor) -> torch.Tensor:
    """Half the Poisson deviance per pixel, ``mu - k + k log(k/mu)`` (>= 0, 0 at ``mu = k``).

    0 where left out or ``mu <= 0``. Differs from `pixel_nll` by a function of ``k`` only.

    >>> pixel_deviance(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 3.0]), torch.tensor([True, True]))
    tensor([2., 0.])
    """
    return _deviance(*_used(mu, include), counts)


def pixel_nll(mu: torch.Tensor, counts: torch.Tensor, include: torch.Tensor) -> torch.Tensor:
    """Poisson NLL per pixel, ``mu - k log mu + log k!``; 0 where left out or ``mu <= 0``.

    >>> pixel_nll(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 3.0]), torch.tensor([True, True]))
    tensor([1.3069, 0.0000])
    """
    return _nll(*_used(mu, include), counts)


def _used(mu: torch.Tensor, include: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels that count (included, ``mu > 0``) and ``mu`` with 1 elsewhere."""
    used = include & (mu > 0)
    return used, torch.where(used, mu, torch.ones_like(mu))


def _nll(used: torch.Tensor, safe: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return torch.where(used, safe - counts * torch.log(safe) + torch.lgamma(counts + 1), 0.0)


def _deviance(used: torch.Tensor, safe: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    k_safe = torch.where(counts > 0, counts, torch.ones_like(counts))
    log_ratio = torch.where(counts > 0, counts * torch.log(k_safe / safe), 0.0)
    return torch.where(used, safe - counts + log_ratio, 0.0)


def linearize(model: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(J, mu)``: Jacobian (pixels, n) by ``torch.func.jacfwd`` and value (pixels,) of a tile."""
    return torch.func.jacfwd(lambda t: (model(t),) * 2, has_aux=True)(theta)


def terms_from(jac: torch.Tensor, mu: torch.Tensor, counts: torch.Tensor,
               include: torch.Tensor) -> Terms:
    """NLL, gradient ``J^T (1 - k/mu)`` and Fisher ``J^T diag(1/mu) J`` from ``(J, mu)``.

    Args:
        jac: (pixels, n) d mu / d theta; mu, counts, include: (pixels,).
    """
    used, safe = _used(mu, include)
    jac = torch.where(used[:, None], jac, 0.0)
    weight = torch.where(used, 1 / safe, 0.0)
    residual = torch.where(used, 1 - counts / safe, 0.0)
    return Terms(_nll(used, safe, counts).sum(), _deviance(used, safe, counts).sum(),
                 jac.T @ residual, (jac * weight[:, None]).T @ jac)


def tile_terms(tile: Tile, theta: torch.Tensor) -> Terms:
    """`terms_from` the linearization of one tile at ``theta`` (n,)."""
    return terms_from(*linearize(tile.model, theta), tile.counts, tile.include)


def poisson_terms(problem: Problem, theta: torch.Tensor) -> Terms:
    """NLL, deviance, gradient (n,) and Fisher information (n, n) summed over the tiles.

    Units: NLL is dimensionless; gradient 1/unit_i; Fisher 1/(unit_i unit_j).
    """
    n = theta.shape[0]
    total = Terms(theta.new_zeros(()), theta.new_zeros(()), theta.new_zeros(n), theta.new_zeros(n, n))
    for tile in problem.tiles:
        part = tile_terms(tile, theta)
        total = Terms(*(a + b for a, b in zip(total, part)))
    return total


def poisson_hessian(problem: Problem, theta: torch.Tensor) -> torch.Tensor:
    """Observed information: ``torch.func.hessian`` of the NLL, summed over tiles, (n, n)."""
    total = theta.new_zeros(theta.shape[0], theta.shape[0])
    for tile in problem.tiles:
        nll = lambda t, tile=tile: pixel_deviance(tile.model(t), tile.counts, tile.include).sum()
        total = total + torch.func.hessian(nll)(theta)
    return total


def poisson_value_and_grad(problem: Problem, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deviance (`pixel_deviance` summed) and its gradient by reverse mode, tile by tile."""
    value, grad = theta.new_zeros(()), torch.zeros_like(theta)
    for tile in problem.tiles:
        nll = lambda t, tile=tile: pixel_deviance(tile.model(t), tile.counts, tile.include).sum()
        g, v = torch.func.grad_and_value(nll)(theta)
        value, grad = value + v, grad + g
    return value, grad

