"""Poisson replicas of one expected image, fitted together, and their pulls.

A pull test checks the standard errors of `nbfunc.uncertainty`: draw ``R`` Poisson images
from a known truth, fit each, and form ``pull = (fit - truth)/std``. If the fit is unbiased
and ``std`` is right, the pulls of every parameter have mean 0 and width 1.

`fit_replicas` runs damped Fisher scoring (as ``nbfunc.fit.fit(method="fisher")``) on all
replicas at once: the Jacobians of the replicas that are still moving are computed in one
``torch.func.vmap`` of ``jacfwd`` per tile, and the Levenberg-Marquardt damping is kept per
replica. It reports the Fisher standard errors at each fit (no observed Hessian).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from nbfunc.fit import (Coordinates, accepted, damped_step, log_coordinates, newton_decrement,
                        theta_slope, to_theta, to_z)
from nbfunc.likelihood import DEFAULT_TILE_PIXELS, Problem, Terms, linearize, poisson_problem, terms_from
from nbfunc.params import Params
from nbfunc.uncertainty import standard_errors


@dataclass(frozen=True, eq=False)
class ReplicaFits:
    """Fits of ``R`` replicas of ``n`` parameters.

    Attributes:
        names: (n,) parameter names; units: (n,) their units.
        values: (R, n) fitted values. std: (R, n) Fisher standard errors at each fit.
        nll: (R,) Poisson NLL at each fit. converged: (R,) bool. iterations: (R,) int.
        fisher: (R, n, n) Fisher information at each fit.
    """

    names: tuple[str, ...]
    units: tuple[str, ...]
    values: torch.Tensor
    std: torch.Tensor
    nll: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor
    fisher: torch.Tensor


def poisson_replicas(mu: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` Poisson draws of the expected counts ``mu``, shape (n, *mu.shape), float64.

    >>> poisson_replicas(torch.full((2,), 5.0), 3, torch.Generator().manual_seed(0)).shape
    torch.Size([3, 2])
    """
    rates = mu.detach().to(torch.float64).clamp(min=0).expand(n, *mu.shape).contiguous()
    return torch.poisson(rates, generator=generator)


def batch_terms(problem: Problem, counts: Sequence[torch.Tensor], theta: torch.Tensor) -> Terms:
    """`nbfunc.likelihood.Terms` of ``R`` replicas at ``theta`` (R, n), vmapped per tile.

    Args:
        counts: per tile, the replicas' counts (R, pixels).
    Returns:
        Terms with nll (R,), grad (R, n), fisher (R, n, n).
    """
    total = None
    for tile, k in zip(problem.tiles, counts):
        part = torch.func.vmap(lambda t, k, tile=tile: terms_from(*linearize(tile.model, t), k,
                                                                   tile.include))(theta, k)
        total = part if total is None else Terms(*(a + b for a, b in zip(total, part)))
    return total


def fit_replicas(model: Params | Callable[[dict], torch.Tensor], observed: torch.Tensor,
                 free: Sequence[str] | Mapping[str, Any], start: torch.Tensor, *,
                 mask: torch.Tensor | None = None, max_iter: int = 30, tol: float = 1e-8,
                 tile_pixels: int = DEFAULT_TILE_PIXELS) -> ReplicaFits:
    """Maximum-likelihood fits of ``R`` observed images of the same model, batched.

    Args:
        model: the `Params` tree (its free leaves are replaced by ``start``), or a callable.
        observed: (R, *image shape) counts.
        free: as in `nbfunc.fit.fit` (for a callable: ``{name: value}``, only the names and
            shapes matter).
        start: (R, n) or (n,) starting values, in the parameters' units.
        max_iter: iterations at most (per replica); tol: on the squared Newton decrement.
    Returns:
        `ReplicaFits`.
    """
    observed = torch.as_tensor(observed, dtype=torch.float64)
    if observed.dim() < 2 or len(observed) == 0:
        raise ValueError(f"observed must be (replicas, *image shape) with at least one replica, "
                         f"got shape {tuple(observed.shape)}")
    # the replicas share the problem (tiles, masks); only their counts differ
    problem = poisson_problem(model, observed[0], free, mask=mask, tile_pixels=tile_pixels)
    flat = observed.reshape(len(observed), -1)
    counts = [flat if tile.pixels is None else flat[:, tile.pixels] for tile in problem.tiles]
    theta = torch.as_tensor(start, dtype=torch.float64).expand(len(observed), -1).clone()
    data = batch_terms(problem, counts, theta)
    c = log_coordinates(problem, theta, data.fisher)
    z = to_z(c, theta)
    lam = torch.full((len(observed),), 1e-3, dtype=torch.float64)
    iterations = torch.zeros(len(observed), dtype=torch.long)
    done = torch.zeros(len(observed), dtype=torch.bool)
    for _ in range(max_iter + 1):
        grad, fisher = _z_terms(c, theta, data)
        done = done | (newton_decrement(grad, fisher) <= tol)
        moving = torch.nonzero(~done & (iterations < max_iter) & (lam < 1e12))[:, 0]
        if len(moving) == 0:
            break
        sub = Coordinates(c.positive, c.origin[moving], c.scale[moving])
        step, lam_used = damped_step(fisher[moving], grad[moving], lam[moving])
        trial_theta = to_theta(sub, z[moving] + step)
        trial = batch_terms(problem, [k[moving] for k in counts], trial_theta)
        ok = accepted(data.deviance[moving], trial.deviance, grad[moving], step)
        lam[moving] = torch.where(ok, torch.clamp(lam_used / 10, min=1e-9),
                                  torch.clamp(10 * lam_used, min=1e-6))
        iterations[moving] += 1
        keep = moving[ok]
        z[keep], theta[keep] = z[moving][ok] + step[ok], trial_theta[ok]
        data = Terms(*(_scatter(a, keep, b[ok]) for a, b in zip(data, trial)))
    std = standard_errors(data.fisher)
    return ReplicaFits(problem.names, problem.units, theta, std, data.nll, done, iterations,
                       data.fisher)


def _z_terms(c: Coordinates, theta: torch.Tensor, data: Terms) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient (R, n) and Fisher (R, n, n) in z from theta-space terms."""
    t = theta_slope(c, theta)
    return t * data.grad, data.fisher * t[..., :, None] * t[..., None, :]


def _scatter(old: torch.Tensor, index: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    out = old.clone()
    out[index] = new
    return out


def pull_summary(values: torch.Tensor, truth: torch.Tensor, std: torch.Tensor,
                 names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean and width of the pulls ``(values - truth)/std`` per parameter, with standard errors.

    Args:
        values, std: (R, n); truth: (n,).
    Returns:
        ``{name: {"mean", "mean_err", "width", "width_err", "n"}}``; ``mean_err = width/sqrt(R)``,
        ``width_err = width/sqrt(2(R-1))``.
    """
    pulls = (values - truth) / std
    r = pulls.shape[0]
    out = {}
    for i, name in enumerate(names):
        mean, width = float(pulls[:, i].mean()), float(pulls[:, i].std())
        out[name] = {"mean": mean, "mean_err": width / math.sqrt(r), "width": width,
                     "width_err": width / math.sqrt(2 * max(r - 1, 1)), "n": r}
    return out
