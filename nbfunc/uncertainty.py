"""Covariance of fitted parameters from the Poisson likelihood of an image.

For expected counts ``mu(theta)`` (photons per pixel, `nbfunc.simulate`, background included)
and observed counts ``k``, the Fisher (expected) information of the free parameters is

    F = J^T diag(1/mu) J,        J = d mu / d theta  (pixels, n),

and the observed information is the Hessian ``H`` of the negative log-likelihood
(`nbfunc.likelihood`). With Gaussian priors of widths ``sigma_p`` the covariance is

    C = (F + diag(1/sigma_p^2))^-1,    std = sqrt(diag C),    corr = C_ij / (std_i std_j),

all in the free leaves' own units (Angstrom, mm, deg, ...). Before inverting, the
information is scaled to unit diagonal, ``A = D^-1 F D^-1`` with ``D = sqrt(diag F)``, so the
condition number and the degenerate combinations do not depend on the units. An eigenvalue of
``A`` below ``rcond * max`` is a direction the data do not determine: the parameters taking
part in it get ``std = inf`` and the correlation is the limit of a vanishing prior. Any
condition number above ``max_condition`` raises `DegenerateInformationWarning`, naming the
combinations; no result is ever NaN.

    >>> u = uncertainty(p, image, ["crystal.cell_a", "detector.distance"])   # doctest: +SKIP
    >>> print(summary_table(u))                                            # doctest: +SKIP
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from nbfunc.likelihood import (DEFAULT_TILE_PIXELS, Problem, poisson_hessian, poisson_problem,
                               poisson_terms)
from nbfunc.params import Params

MAX_CONDITION = 1e8
"""Condition number (of the unit-diagonal information) above which a warning is raised."""
RCOND = 1e-12
"""Eigenvalues below ``RCOND * max`` count as zero: the matrix is singular there."""
_NULL_WEIGHT = 1e-6


class DegenerateInformationWarning(UserWarning):
    """The information matrix is singular or ill-conditioned: some combinations are undetermined."""


@dataclass(frozen=True)
class Degeneracy:
    """A nearly flat direction of the likelihood.

    Attributes:
        eigenvalue: eigenvalue of the unit-diagonal information (0 = exactly flat, 1 = as
            well determined as a lone parameter).
        shifts: ``{name: shift}`` in each parameter's unit: moving all of them together by
            these amounts changes the likelihood by ``eigenvalue/2`` only (components below 5%
            of the unit-diagonal eigenvector are left out).
        units: ``{name: unit}`` of the shifts.
    """

    eigenvalue: float
    shifts: dict[str, float]
    units: dict[str, str]

    def __str__(self) -> str:
        parts = " ".join(f"{v:+.4g} {self.units.get(k) or ''} {k}".replace("  ", " ")
                         for k, v in self.shifts.items())
        return f"[{parts}] (eigenvalue {self.eigenvalue:.3g})"


@dataclass(frozen=True, eq=False)
class Uncertainty:
    """Uncertainty of ``n`` free parameters at ``values``.

    Attributes:
        names: (n,) parameter names (``"crystal.misset[0]"`` for an element of a leaf).
        units: (n,) units of the parameters ("" if dimensionless or unknown).
        values: (n,) the point (physical units).
        fisher: (n, n) Fisher information ``J^T diag(1/mu) J``, 1/(unit_i unit_j), no prior.
        hessian: (n, n) observed information (Hessian of the NLL), same units, no prior;
            computed when first read (a second derivative costs several Fisher
            informations, and the covariance does not need it).
        prior_precision: (n,) ``1/sigma_p^2`` of the Gaussian priors (0: none).
        covariance: (n, n) ``(fisher + diag(prior_precision))^-1``, unit_i unit_j; entries
            of undetermined parameters are +-inf.
        std: (n,) standard errors, unit_i; inf for undetermined parameters.
        correlation: (n, n) dimensionless, 1 on the diagonal.
        condition_number: of the unit-diagonal information (with priors); inf if singular
            (an eigenvalue below ``RCOND`` times the largest).
        degenerate: the combinations behind a condition number above ``max_condition``.
    """

    names: tuple[str, ...]
    units: tuple[str, ...]
    values: torch.Tensor
    fisher: torch.Tensor
    observed: torch.Tensor | Callable[[], torch.Tensor] = field(repr=False)
    prior_precision: torch.Tensor
    covariance: torch.Tensor
    std: torch.Tensor
    correlation: torch.Tensor
    condition_number: float
    degenerate: tuple[Degeneracy, ...]

    @functools.cached_property
    def hessian(self) -> torch.Tensor:
        """(n, n) observed information, 1/(unit_i unit_j): ``observed`` (a tensor, or a
        function computing it once)."""
        return self.observed() if callable(self.observed) else self.observed


@dataclass(frozen=True, eq=False)
class InformationInverse:
    """`invert_information`'s result (see `Uncertainty` for the meaning of the fields).

    ``eigenvalues`` (n,) ascending and ``eigenvectors`` (n, n) columns are those of the
    unit-diagonal information; ``scale`` (n,) is ``sqrt(diag information)`` (1 where 0).
    """

    covariance: torch.Tensor
    std: torch.Tensor
    correlation: torch.Tensor
    condition_number: float
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    scale: torch.Tensor


# --------------------------------------------------------------------------------------------
# Linear algebra leaves
# --------------------------------------------------------------------------------------------
def unit_diagonal(information: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(D^-1 I D^-1, D)`` with ``D = sqrt(diag I)`` (1 where the diagonal is <= 0); ``I``
    (..., n, n), a stack of matrices or one.

    >>> unit_diagonal(torch.tensor([[4.0, 2.0], [2.0, 9.0]]))[0]
    tensor([[1.0000, 0.3333],
            [0.3333, 1.0000]])
    """
    diag = torch.diagonal(information, dim1=-2, dim2=-1)
    scale = torch.where(diag > 0, torch.sqrt(diag.clamp(min=0)), torch.ones_like(diag))
    scaled = information / (scale[..., :, None] * scale[..., None, :])
    return (scaled + scaled.transpose(-1, -2)) / 2, scale


def condition_number(eigenvalues: torch.Tensor) -> float:
    """``max/min`` of the eigenvalues of a symmetric matrix; inf when min <= 0.

    >>> condition_number(torch.tensor([0.25, 1.0]))
    4.0
    """
    lo, hi = float(eigenvalues.min()), float(eigenvalues.max())
    return hi / lo if lo > 0 and hi > 0 else math.inf


def invert_information(information: torch.Tensor, rcond: float = RCOND) -> InformationInverse:
    """Covariance, standard errors and correlation from an information matrix (n, n).

    Eigen-decomposes the unit-diagonal information ``A = V diag(l) V^T``. Directions with
    ``l <= rcond * max(l)`` are undetermined: parameters with weight in them get ``std = inf``
    (and +-inf covariance entries with each other), and their correlations are the limit of
    a vanishing prior, ``P_ij / sqrt(P_ii P_jj)`` with ``P`` the projector on those
    directions. Elsewhere ``C = D^-1 V diag(1/l) V^T D^-1``.
    """
    scaled, scale = unit_diagonal(information)
    values, vectors = torch.linalg.eigh(scaled)
    top = values.max().clamp(min=0)
    null = values <= rcond * top
    kept = vectors[:, ~null]
    inverse = (kept / values[~null]) @ kept.T
    projector = vectors[:, null] @ vectors[:, null].T
    undetermined = torch.diagonal(projector) > _NULL_WEIGHT
    both = undetermined[:, None] & undetermined[None, :]
    covariance = inverse / (scale[:, None] * scale[None, :])
    covariance = torch.where(both & (projector.abs() > _NULL_WEIGHT),
                             torch.sign(projector) * math.inf, covariance)
    std = _eigen_std(values, vectors, scale, null)
    correlation = torch.where(both, _normalise(projector), _normalise(inverse))
    correlation = torch.where(undetermined[:, None] ^ undetermined[None, :], 0.0, correlation)
    correlation.fill_diagonal_(1.0)
    condition = math.inf if bool(null.any()) else condition_number(values)
    return InformationInverse(covariance, std, correlation, condition, values, vectors, scale)


def standard_errors(information: torch.Tensor, rcond: float = RCOND) -> torch.Tensor:
    """`invert_information`'s ``std`` for a stack of information matrices (..., n, n) at once:
    ``sqrt(C_ii)``, inf for parameters with weight in an undetermined direction (units:
    1/sqrt of the information's)."""
    scaled, scale = unit_diagonal(information)
    values, vectors = torch.linalg.eigh(scaled)
    null = values <= rcond * values.amax(-1, keepdim=True).clamp(min=0)
    return _eigen_std(values, vectors, scale, null)


def _eigen_std(values, vectors, scale, null) -> torch.Tensor:
    """``sqrt(C_ii)`` from the unit-diagonal information's eigen-decomposition (eigenvalues
    (..., n), vectors (..., n, n) by column, ``null`` the undetermined directions) and the
    scale ``D``: ``sqrt(sum_k V_ik^2 / l_k) / D_i`` over the determined directions, inf where a
    parameter has weight in an undetermined one."""
    weight = vectors * vectors  # (..., parameter, direction)
    inverse = (weight * torch.where(null, 0.0, 1.0 / torch.where(null, 1.0, values))[..., None, :]).sum(-1)
    undetermined = (weight * null[..., None, :]).sum(-1) > _NULL_WEIGHT
    return torch.where(undetermined, math.inf, torch.sqrt(inverse.clamp(min=0)) / scale)


def _normalise(matrix: torch.Tensor) -> torch.Tensor:
    """``M_ij / sqrt(M_ii M_jj)``, 0 where a diagonal entry is 0."""
    d = torch.sqrt(torch.diagonal(matrix).clamp(min=0))
    outer = d[:, None] * d[None, :]
    return torch.where(outer > 0, matrix / torch.where(outer > 0, outer, 1.0), 0.0).clamp(-1, 1)


def degeneracies(inverse: InformationInverse, names: Sequence[str], units: Sequence[str],
                 max_condition: float = MAX_CONDITION) -> tuple[Degeneracy, ...]:
    """The eigen-directions with eigenvalue below ``max(eigenvalue)/max_condition``, by name.

    Each direction is reported as physical shifts ``v_i / D_i`` (unit_i) of the parameters
    with a component ``|v_i| >= 0.05``, the largest first.
    """
    values, vectors = inverse.eigenvalues, inverse.eigenvectors
    top = float(values.max())
    out = []
    for k in range(values.shape[0]):
        if not float(values[k]) * max_condition < top and top > 0:
            continue
        v = vectors[:, k] * torch.sign(vectors[torch.argmax(vectors[:, k].abs()), k])
        order = torch.argsort(v.abs(), descending=True).tolist()
        shifts = {names[i]: float(v[i] / inverse.scale[i]) for i in order if abs(float(v[i])) >= 0.05}
        out.append(Degeneracy(max(float(values[k]), 0.0), shifts,
                              {names[i]: units[i] for i in order if names[i] in shifts}))
    return tuple(out)


def degeneracy_message(condition: float, found: Sequence[Degeneracy], singular: bool) -> str:
    """The warning text: what is wrong, which combinations, and how to fix it."""
    kind = "singular" if singular else "ill-conditioned"
    lines = "\n  ".join(str(d) for d in found)
    return (f"the information matrix is {kind} (condition number {condition:.3g} after scaling "
            f"to unit diagonal); the data do not determine these combinations of parameters:\n"
            f"  {lines}\n"
            "Standard errors of the parameters in them are "
            f"{'infinite' if singular else 'unreliable'}. Fix one parameter of each combination "
            "(leave it out of `free`) or add a Gaussian prior (priors={name: sigma}).")


# --------------------------------------------------------------------------------------------
# Priors
# --------------------------------------------------------------------------------------------
def prior_terms(names: Sequence[str], priors: Mapping[str, Any] | None, start: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Precision ``1/sigma^2`` (n,) and mean (n,) of Gaussian priors.

    ``priors`` maps a parameter name (``"crystal.misset[0]"``) or a whole leaf
    (``"crystal.misset"``) to ``sigma`` or ``(mean, sigma)``, in the parameter's unit; the mean
    defaults to ``start``. Parameters without a prior get precision 0.

    Raises:
        KeyError: a prior on a name that is not free. ValueError: sigma <= 0.
    """
    precision, mean = torch.zeros_like(start), start.clone()
    for key, spec in (priors or {}).items():
        hits = [i for i, n in enumerate(names) if n == key or n.split("[")[0] == key]
        if not hits:
            raise KeyError(f"prior on {key!r}, which is not a free parameter; free: {list(names)}")
        centre, sigma = spec if isinstance(spec, (tuple, list)) else (None, spec)
        if not float(sigma) > 0:
            raise ValueError(f"prior sigma of {key!r} must be > 0, got {sigma}")
        for i in hits:
            precision[i] = 1.0 / float(sigma) ** 2
            if centre is not None:
                mean[i] = float(centre)
    return precision, mean


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def uncertainty(model: Params | Callable[[dict], torch.Tensor], observed: torch.Tensor,
                free: Sequence[str] | Mapping[str, Any], *, mask: torch.Tensor | None = None,
                priors: Mapping[str, Any] | None = None, tile_pixels: int = DEFAULT_TILE_PIXELS,
                max_condition: float = MAX_CONDITION) -> Uncertainty:
    """Fisher information, observed Hessian and covariance of the free parameters.

    Args:
        model: a `Params` tree, or a callable ``model({name: tensor}) -> mu`` (photons).
        observed: counts, (slow, fast) for a tree.
        free: leaf names for a tree (``"crystal.misset[0]"`` for one element); for a
            callable, ``{name: value}``: the point of evaluation.
        mask: bool, True for pixels to use (the tree's ROI and mask apply as well).
        priors: ``{name: sigma or (mean, sigma)}`` Gaussian priors, parameter units.
        tile_pixels: pixels per Jacobian tile (memory ``~ tile_pixels * n`` numbers).
        max_condition: warn above this condition number.
    Returns:
        `Uncertainty` at the tree's (or dict's) values.
    """
    problem = poisson_problem(model, observed, free, mask=mask, tile_pixels=tile_pixels)
    return uncertainty_at(problem, priors=priors, max_condition=max_condition)


def uncertainty_at(problem: Problem, theta: torch.Tensor | None = None, *,
                   priors: Mapping[str, Any] | None = None, fisher: torch.Tensor | None = None,
                   max_condition: float = MAX_CONDITION) -> Uncertainty:
    """`uncertainty` of a built `nbfunc.likelihood.Problem` at ``theta`` (default: its start).

    ``fisher`` may pass an already computed Fisher information at ``theta`` (n, n).
    """
    theta = problem.start if theta is None else theta.detach().to(torch.float64)
    if fisher is None:
        fisher = poisson_terms(problem, theta).fisher
    precision, _ = prior_terms(problem.names, priors, theta)
    return summarise(problem.names, problem.units, theta, fisher.detach(),
                     observed_information(problem, theta), precision, max_condition)


def observed_information(problem: Problem, theta: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A function computing the observed information of ``problem`` at ``theta`` (n, n),
    for `Uncertainty`'s ``observed``."""
    return lambda: poisson_hessian(problem, theta).detach()


def summarise(names: Sequence[str], units: Sequence[str], values: torch.Tensor,
              fisher: torch.Tensor, hessian: torch.Tensor | Callable[[], torch.Tensor],
              prior_precision: torch.Tensor, max_condition: float = MAX_CONDITION) -> Uncertainty:
    """Assemble an `Uncertainty` from information matrices (``hessian``: the observed
    information, or a function computing it when first read); warns when degenerate."""
    inverse = invert_information(fisher + torch.diag(prior_precision))
    found = degeneracies(inverse, names, units, max_condition)
    if found:
        singular = bool(torch.isinf(inverse.std).any())
        warnings.warn(degeneracy_message(inverse.condition_number, found, singular),
                      DegenerateInformationWarning, stacklevel=3)
    return Uncertainty(tuple(names), tuple(units), values, fisher, hessian, prior_precision,
                       inverse.covariance, inverse.std, inverse.correlation,
                       inverse.condition_number, found)


def hessian_covariance(u: Uncertainty) -> InformationInverse:
    """Covariance from the observed information (Hessian + priors) instead of the Fisher."""
    return invert_information(u.hessian + torch.diag(u.prior_precision))


def summary_table(u: Uncertainty) -> str:
    """A text table: name, value, standard error, unit; then the condition number."""
    width = max(len(n) for n in u.names)
    rows = [f"{'parameter':<{width}}  {'value':>14}  {'std':>11}  unit"]
    for name, unit, value, std in zip(u.names, u.units, u.values.tolist(), u.std.tolist()):
        rows.append(f"{name:<{width}}  {value:>14.8g}  {std:>11.4g}  {unit}")
    rows.append(f"condition number (unit diagonal): {u.condition_number:.4g}")
    rows.extend(f"degenerate: {d}" for d in u.degenerate)
    return "\n".join(rows)
