"""Maximum-likelihood fit of free parameters to an observed image (Poisson counts).

Minimises ``NLL(theta) + 1/2 sum_p ((theta_p - m_p)/sigma_p)^2`` (Gaussian priors optional)
in internal coordinates ``z``:

    u = log(theta) for parameters that must stay positive, u = theta otherwise,
    z = D (u - u_start),   D = sqrt(diag of the Fisher information in u at the start),

so one unit of ``z`` is about one standard error whatever the units (Angstrom, mm, deg), and
positive parameters can never cross 0. Methods:

* ``"fisher"``: Fisher scoring, ``(F_z + lam I) step = -g_z``, with a Levenberg-Marquardt
  ``lam`` that shrinks after a step that lowers the NLL and grows (retrying) otherwise;
* ``"newton"``: the same with the observed Hessian of the NLL instead of ``F_z``;
* ``"lbfgs"``: ``torch.optim.LBFGS`` with a strong-Wolfe line search on ``z``.

Convergence: the squared Newton decrement ``g^T F^-1 g`` (about twice the NLL still to
gain, or the squared distance to the optimum in standard errors) falls below ``tol``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, NamedTuple, Sequence

import torch

from nbfunc.likelihood import (DEFAULT_TILE_PIXELS, Problem, Terms, poisson_hessian,
                               poisson_problem, poisson_terms, poisson_value_and_grad)
from nbfunc.params import Params
from nbfunc.uncertainty import (MAX_CONDITION, Uncertainty, observed_information, prior_terms,
                                 summarise)

Method = Literal["fisher", "newton", "lbfgs"]
_METHODS = ("fisher", "newton", "lbfgs")


@dataclass(frozen=True)
class FitStatus:
    """Whether the fit converged, after how many iterations, and why it stopped."""

    converged: bool
    iterations: int
    message: str


@dataclass(frozen=True, eq=False)
class FitResult:
    """A maximum-likelihood fit.

    Attributes:
        tree: the fitted `Params` tree (or, for a toy model, the dict of values).
        names: (n,) free parameter names.
        values: (n,) fitted values, the parameters' units.
        nll: Poisson negative log-likelihood at the fit (with ``log k!``, without priors).
        status: convergence flag, iterations and message.
        uncertainty: `nbfunc.uncertainty.Uncertainty` at the fit (with the same priors).
        history: objective (NLL + prior term) at the start and after each accepted step
            (``"lbfgs"``: at every evaluation, line-search trials included).
    """

    tree: Any
    names: tuple[str, ...]
    values: torch.Tensor
    nll: float
    status: FitStatus
    uncertainty: Uncertainty
    history: tuple[float, ...]


@dataclass(frozen=True, eq=False)
class Coordinates:
    """Internal coordinates ``z = scale * (u - origin)``, ``u = log theta`` where ``positive``."""

    positive: torch.Tensor
    origin: torch.Tensor
    scale: torch.Tensor


class State(NamedTuple):
    """Objective terms at one point (theta units; ``data`` holds the prior-free terms).

    ``objective`` is the deviance plus the prior term: the NLL up to a constant, accurate in
    differences (see `nbfunc.likelihood.Terms`).
    """

    z: torch.Tensor
    theta: torch.Tensor
    objective: torch.Tensor
    grad: torch.Tensor
    fisher: torch.Tensor
    data: Terms


# --------------------------------------------------------------------------------------------
# Coordinates
# --------------------------------------------------------------------------------------------
def to_theta(c: Coordinates, z: torch.Tensor) -> torch.Tensor:
    """theta (n,) from z (n,): ``u = origin + z/scale``, ``theta = exp(u)`` where positive."""
    u = c.origin + z / c.scale
    return torch.where(c.positive, torch.exp(torch.where(c.positive, u, 0.0)), u)


def to_z(c: Coordinates, theta: torch.Tensor) -> torch.Tensor:
    """z (n,) from theta (n,), the inverse of `to_theta` (theta > 0 where positive)."""
    u = torch.where(c.positive, torch.log(torch.where(c.positive, theta, 1.0)), theta)
    return (u - c.origin) * c.scale


def theta_slope(c: Coordinates, theta: torch.Tensor) -> torch.Tensor:
    """d theta / d z (n,), the diagonal Jacobian of `to_theta`."""
    return torch.where(c.positive, theta, 1.0) / c.scale


def theta_curvature(c: Coordinates, theta: torch.Tensor) -> torch.Tensor:
    """d^2 theta / d z^2 (n,): ``theta/scale^2`` where positive, else 0."""
    return torch.where(c.positive, theta, 0.0) / c.scale**2


def log_coordinates(problem: Problem, theta: torch.Tensor, fisher: torch.Tensor) -> Coordinates:
    """Coordinates with origin at ``theta`` (*, n) and unit Fisher (*, n, n) diagonal there.

    Where the Fisher diagonal is 0 the scale is 1.

    Raises:
        ValueError: a parameter that must stay positive is not > 0 at the start.
    """
    bad = problem.positive & ~(theta > 0)
    if bool(bad.any()):
        names = sorted({problem.names[i] for i in torch.nonzero(bad)[:, -1].tolist()})
        raise ValueError(f"{names} must stay > 0 but start at a value <= 0; start them at a "
                         "small positive value (e.g. mosaic_spread 0.01 deg)")
    unit = Coordinates(problem.positive, torch.zeros_like(theta), torch.ones_like(theta))
    diag = torch.diagonal(fisher, dim1=-2, dim2=-1) * theta_slope(unit, theta) ** 2
    scale = torch.where(diag > 0, torch.sqrt(diag.clamp(min=0)), torch.ones_like(diag))
    return Coordinates(problem.positive, to_z(unit, theta), scale)


# --------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------
def evaluate(problem: Problem, c: Coordinates, z: torch.Tensor, precision: torch.Tensor,
             mean: torch.Tensor) -> State:
    """NLL + prior, its gradient and Fisher information at ``z`` (in theta units)."""
    theta = to_theta(c, z)
    data = poisson_terms(problem, theta)
    offset = theta - mean
    objective = data.deviance + 0.5 * (precision * offset**2).sum()
    return State(z, theta, objective.detach(), (data.grad + precision * offset).detach(),
                 (data.fisher + torch.diag(precision)).detach(), data)


def z_gradient(c: Coordinates, s: State) -> torch.Tensor:
    """Gradient in z (*, n): ``T g`` with ``T = d theta / d z``."""
    return theta_slope(c, s.theta) * s.grad


def z_fisher(c: Coordinates, s: State) -> torch.Tensor:
    """Fisher information in z (*, n, n): ``T F T``."""
    t = theta_slope(c, s.theta)
    return s.fisher * t[..., :, None] * t[..., None, :]


def z_hessian(problem: Problem, c: Coordinates, s: State, precision: torch.Tensor) -> torch.Tensor:
    """Observed Hessian in z (n, n): ``T H T + diag(g * d2theta/dz2)``."""
    t = theta_slope(c, s.theta)
    h = poisson_hessian(problem, s.theta) + torch.diag(precision)
    return h * t[:, None] * t[None, :] + torch.diag(s.grad * theta_curvature(c, s.theta))


def newton_decrement(grad: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """``g^T F^+ g`` (*,) for g (*, n), F (*, n, n); directions without information do not count.

    >>> newton_decrement(torch.tensor([2.0, 0.0]), torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
    tensor(1.)
    """
    solution = torch.linalg.lstsq(fisher, grad[..., None], rcond=1e-12).solution[..., 0]
    return (grad * solution).sum(-1)


def damped_step(curvature: torch.Tensor, grad: torch.Tensor, lam: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``(C + lam I) step = -g`` by Cholesky, raising ``lam`` (x10) where not definite.

    Args:
        curvature: (*, n, n); grad: (*, n); lam: (*,) damping.
    Returns:
        (step (*, n), the ``lam`` used (*,)).
    Raises:
        FloatingPointError: when no damping up to 1e30 makes the matrix definite (non-finite).
    """
    eye = torch.eye(grad.shape[-1], dtype=grad.dtype)
    for _ in range(40):
        factor, info = torch.linalg.cholesky_ex(curvature + lam[..., None, None] * eye)
        if not bool((info != 0).any()):
            return torch.cholesky_solve(-grad[..., None], factor)[..., 0], lam
        lam = torch.where(info != 0, torch.clamp(10 * lam, min=1e-6), lam)
    raise FloatingPointError("the curvature matrix is not positive definite for any damping up "
                             "to 1e30: it is not finite; check the start values")


def accepted(old: torch.Tensor, new: torch.Tensor, grad: torch.Tensor, step: torch.Tensor
             ) -> torch.Tensor:
    """Armijo test (*,) bool: ``new <= old + 1e-4 g.step`` (up to rounding of ``old``), finite."""
    noise = 1e-13 * old.abs()
    return torch.isfinite(new) & (old - new >= -1e-4 * (grad * step).sum(-1) - noise)


# --------------------------------------------------------------------------------------------
# Optimisers
# --------------------------------------------------------------------------------------------
def scoring(problem: Problem, c: Coordinates, start: State, precision: torch.Tensor,
            mean: torch.Tensor, method: str, max_iter: int, tol: float
            ) -> tuple[State, FitStatus, list[float]]:
    """Damped Fisher scoring (``method="fisher"``) or Newton (``"newton"``) iterations."""
    state, lam, history = start, torch.tensor(1e-3), [reported(start)]
    for it in range(max_iter + 1):
        decrement = float(newton_decrement(z_gradient(c, state), z_fisher(c, state)))
        if decrement <= tol:
            return state, FitStatus(True, it, _converged(decrement, tol)), history
        if it == max_iter:
            break
        grad = z_gradient(c, state)
        curvature = z_fisher(c, state) if method == "fisher" else z_hessian(problem, c, state, precision)
        for _ in range(30):
            step, lam = damped_step(curvature, grad, lam)
            trial = evaluate(problem, c, state.z + step, precision, mean)
            if bool(accepted(state.objective, trial.objective, grad, step)):
                lam = torch.clamp(lam / 10, min=1e-9)
                break
            lam = torch.clamp(10 * lam, min=1e-6)
        else:
            return state, FitStatus(False, it, "no damped step lowered the NLL (Newton decrement^2 "
                                    f"{decrement:.2e}); start closer to the optimum, free fewer "
                                    "parameters or add priors"), history
        state = trial
        history.append(reported(state))
    return state, FitStatus(False, max_iter, f"not converged after {max_iter} iterations (Newton "
                            f"decrement^2 {decrement:.2e} > tol {tol:.1e}); increase max_iter"), history


def reported(s: State) -> float:
    """NLL + prior term of a state (the objective with the NLL's constant restored)."""
    return float(s.objective + s.data.nll - s.data.deviance)


def _converged(decrement: float, tol: float) -> str:
    return f"converged: Newton decrement^2 {decrement:.2e} <= tol {tol:.1e}"


def lbfgs(problem: Problem, c: Coordinates, start: State, precision: torch.Tensor,
          mean: torch.Tensor, max_iter: int, tol: float) -> tuple[State, FitStatus, list[float]]:
    """``torch.optim.LBFGS`` (strong Wolfe) on z; gradients by reverse mode, tile by tile."""
    z = start.z.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")
    history = [reported(start)]
    constant = float(start.data.nll - start.data.deviance)

    def closure():
        theta = to_theta(c, z.detach())
        value, grad = poisson_value_and_grad(problem, theta)
        offset = theta - mean
        z.grad = theta_slope(c, theta) * (grad + precision * offset)
        value = value + 0.5 * (precision * offset**2).sum()
        history.append(float(value) + constant)
        return value.detach()

    opt.step(closure)
    iterations = int(opt.state[opt._params[0]].get("n_iter", 0))
    state = evaluate(problem, c, z.detach(), precision, mean)
    decrement = float(newton_decrement(z_gradient(c, state), z_fisher(c, state)))
    if decrement <= tol:
        return state, FitStatus(True, iterations, _converged(decrement, tol)), history
    return state, FitStatus(False, iterations, f"L-BFGS stopped after {iterations} iterations with "
                            f"Newton decrement^2 {decrement:.2e} > tol {tol:.1e}; increase max_iter "
                            "or use method='fisher'"), history


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def fit(model: Params | Callable[[dict], torch.Tensor], observed: torch.Tensor,
        free: Sequence[str] | Mapping[str, Any], *, mask: torch.Tensor | None = None,
        priors: Mapping[str, Any] | None = None, method: Method = "fisher", max_iter: int = 50,
        tol: float = 1e-8, tile_pixels: int = DEFAULT_TILE_PIXELS,
        max_condition: float = MAX_CONDITION) -> FitResult:
    """Maximum-likelihood fit of the free leaves of ``model`` to ``observed`` counts.

    Args:
        model: the starting `Params` tree, or a callable ``model({name: tensor}) -> mu``.
        observed: counts (photons), (slow, fast) for a tree.
        free: leaf names for a tree (``"crystal.misset[0]"`` for one element); for a
            callable, ``{name: starting value}``.
        mask: bool, True for pixels to use (the tree's ROI and mask apply as well).
        priors: ``{name: sigma or (mean, sigma)}`` Gaussian priors (mean: the start value).
        method: ``"fisher"`` (default), ``"newton"`` or ``"lbfgs"``.
        max_iter: iterations at most. tol: on the squared Newton decrement.
        tile_pixels: pixels per Jacobian tile. max_condition: warn above this condition number.
    """
    problem = poisson_problem(model, observed, free, mask=mask, tile_pixels=tile_pixels)
    return fit_problem(problem, priors=priors, method=method, max_iter=max_iter, tol=tol,
                       max_condition=max_condition)


def fit_problem(problem: Problem, start: torch.Tensor | None = None, *,
                priors: Mapping[str, Any] | None = None, method: Method = "fisher",
                max_iter: int = 50, tol: float = 1e-8, max_condition: float = MAX_CONDITION
                ) -> FitResult:
    """`fit` of a built `nbfunc.likelihood.Problem` from ``start`` (n,) (default: its start)."""
    if method not in _METHODS:
        raise ValueError(f"method={method!r} is not known; use one of {_METHODS}")
    theta0 = (problem.start if start is None else torch.as_tensor(start)).detach().to(torch.float64)
    precision, mean = prior_terms(problem.names, priors, problem.start)
    unit = log_coordinates(problem, theta0, torch.zeros(len(theta0), len(theta0), dtype=theta0.dtype))
    first = evaluate(problem, unit, to_z(unit, theta0), precision, mean)
    c = log_coordinates(problem, theta0, first.fisher)
    first = first._replace(z=to_z(c, first.theta))
    if method == "lbfgs":
        state, status, history = lbfgs(problem, c, first, precision, mean, max_iter, tol)
    else:
        state, status, history = scoring(problem, c, first, precision, mean, method, max_iter, tol)
    theta = state.theta.detach()
    u = summarise(problem.names, problem.units, theta, state.data.fisher.detach(),
                  observed_information(problem, theta), precision, max_condition)
    return FitResult(problem.rebuild(theta), problem.names, theta, float(state.data.nll), status,
                     u, tuple(history))
