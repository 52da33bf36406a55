"""Joint refinement of the shared amplitudes and every shot's parameters, over ranks.

Fisher scoring (Gauss-Newton for Poisson counts; along each amplitude the larger of the
Fisher and the exact curvature, see `with_amplitude_curvature`) with Levenberg-Marquardt damping on the joint vector ``[f_asu, theta_1, ..., theta_S]``. Its information matrix has the block-arrow
form

    [ A     B_1  ...  B_S ]        A   = sum_s A_s + R_F   (n_asu, n_asu), amplitudes
    [ B_1^T D_1           ]        B_s (n_asu, m)          amplitudes x shot s
    [ ...        ...      ]        D_s (m, m) + R_s        shot s
    [ B_S^T           D_S ]

so the step follows from the Schur complement of the shot blocks, which each rank forms
for its own shots:

    S = A - sum_s B_s D_s^-1 B_s^T,      S dF = -(g_F - sum_s B_s D_s^-1 g_s),
    d theta_s = -D_s^-1 (g_s + B_s^T dF).

Only ``S`` (n_asu^2), its right-hand side and a few scalars are all-reduced per step; each
``theta_s`` stays on its rank. The damping multiplies every diagonal element by ``1 + lam``
(Marquardt), so the step does not depend on the units of the parameters; ``lam`` shrinks
after a step that lowers the objective and grows, retrying, otherwise. Every decision is
taken on all-reduced numbers, identical on all ranks, so 1, 2 or 4 processes take the same
steps up to the rounding of the sums.

At the optimum ``S`` (undamped, restraints included) is the information of the amplitudes
with the shot parameters marginalised: its inverse is their covariance (`errors`).

Objective: half the Poisson deviance summed over shots (the NLL up to a constant, summed
from terms of order one) plus the restraints. Convergence: the decrement ``-g . step`` (about
twice the objective still to gain, or the squared distance to the optimum in standard
errors) falls below ``tol``; the default 1e-3 stops within about 0.03 standard errors.
With noisy counts Fisher scoring converges linearly near the optimum (it leaves out the
residual term of the Hessian, large where a reflection's intensity bends with the shot's
orientation), so a much smaller ``tol`` costs many more steps for little.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from nbfunc.ensemble.distributed import LOCAL, Comm, all_sum, per_shot
from nbfunc.ensemble.model import Blocks, Ensemble, State, restraint, shot_blocks, shot_deviance
from nbfunc.uncertainty import invert_information

MAX_LAMBDA = 1e10
"""Damping at which the refinement stops: no step along the gradient lowers the objective."""

MIN_LAMBDA = 1e-12
"""Smallest damping: below it the damped and undamped steps agree to rounding."""

CONVERGED_LAMBDA = 1e-2
"""Largest damping of a step whose decrement may declare convergence: a strongly damped step
is short whatever the distance to the optimum, so its decrement says nothing."""


@dataclass(frozen=True, eq=False)
class Refined:
    """The result of `refine` on one rank.

    Attributes:
        state: refined `State` (amplitudes as refined, their sign free: |F| is reported).
        objective: half-deviance + restraints at ``state`` (summed over all shots).
        nll: Poisson NLL at ``state`` (all shots, ``log k!`` included, no restraints).
        history: objective at the start and after each accepted step.
        iterations: accepted steps.
        converged: the decrement fell below ``tol``.
        message: why the refinement stopped.
    """

    state: State
    objective: float
    nll: float
    history: tuple[float, ...]
    iterations: int
    converged: bool
    message: str


class Step(NamedTuple):
    """A damped step: ``df`` (n_asu,), ``dthetas`` one (m,) per local shot, ``decrement``
    ``-g . step`` over all ranks."""

    df: torch.Tensor
    dthetas: tuple[torch.Tensor, ...]
    decrement: float


# --------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------
def objective(ens: Ensemble, comm: Comm, state: State) -> tuple[float, float]:
    """(half-deviance + restraints, NLL) over all ranks' shots at ``state``."""
    def one(item):
        shot, centre, theta = item
        dev, nll = shot_deviance(shot, ens.amap, ens.free, state.f_asu, theta)
        return torch.stack([dev + restraint(theta, centre, ens.theta_sigma)[0], nll])

    items = list(zip(ens.shots, ens.start.thetas, state.thetas))
    parts = per_shot(comm, items, one, lambda item: item[0].index)
    local = torch.stack(parts).sum(0) if parts else state.f_asu.new_zeros(2)
    total = all_sum(comm, local)
    f_term = restraint(state.f_asu, ens.start.f_asu, ens.f_sigma)[0]
    return float(total[0] + f_term), float(total[1])


# --------------------------------------------------------------------------------------------
# Linear algebra of the block-arrow system
# --------------------------------------------------------------------------------------------
def damped(matrix: torch.Tensor, lam: float) -> torch.Tensor:
    """``M + lam diag(M)``, with 1 added where ``diag(M) = 0`` (an element no pixel or
    restraint depends on: its gradient is 0 too, so its step is 0, not a singular solve)."""
    diag = torch.diagonal(matrix)
    return matrix + torch.diag(lam * diag + (diag == 0).to(matrix.dtype))


def solve(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``matrix^-1 rhs`` for a symmetric positive semi-definite ``matrix`` (k, k): by
    Cholesky, or by the pseudo-inverse when it is singular (directions the data leave
    undetermined get no step and no information)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, factor)
    return torch.linalg.pinv(matrix, hermitian=True) @ rhs


def split(blocks: Blocks, theta_grad: torch.Tensor, theta_curv: torch.Tensor):
    """``(A_s (t, t), B_s (t, m), D_s (m, m), g_F (t,), g_theta (m,))`` of one shot, the
    shot restraint's gradient and curvature (m,) added to its own block."""
    t = len(blocks.cols)
    info, grad = blocks.terms.fisher, blocks.terms.grad
    d = info[t:, t:] + torch.diag(theta_curv)
    return info[:t, :t], info[:t, t:], d, grad[:t], grad[t:] + theta_grad


def local_schur(ens: Ensemble, state: State, blocks: Sequence[Blocks], lam: float) -> torch.Tensor:
    """This rank's share of the reduced system, packed for one all-reduce: the flattened
    ``sum_s A_s - B_s D_s'^-1 B_s^T`` (n, n), ``sum_s g_F - B_s D_s'^-1 g_s`` (n,),
    ``sum_s diag A_s`` (n,) and ``sum_s g_F`` (n,), with ``D_s'`` damped by ``lam``."""
    n = ens.amap.n_asu
    schur, rhs = state.f_asu.new_zeros(n, n), state.f_asu.new_zeros(n)
    diag, grad = state.f_asu.new_zeros(n), state.f_asu.new_zeros(n)
    for centre, theta, blk in zip(ens.start.thetas, state.thetas, blocks):
        _, r_grad, r_curv = restraint(theta, centre, ens.theta_sigma)
        a, b, d, g_f, g_t = split(blk, r_grad, r_curv)
        solved = solve(damped(d, lam), torch.cat([b.T, g_t[:, None]], 1))
        cols = blk.cols
        schur[cols[:, None], cols[None, :]] += a - b @ solved[:, :-1]
        rhs[cols] += g_f - b @ solved[:, -1]
        diag[cols] += torch.diagonal(a)
        grad[cols] += g_f
    return torch.cat([schur.reshape(-1), rhs, diag, grad])


def unpack_reduced(ens: Ensemble, state: State, packed: torch.Tensor):
    """``(S, rhs, diag, g_F)`` of the whole ensemble from the all-reduced `local_schur`,
    the amplitude restraint added (it is global: added once, after the sum)."""
    n = ens.amap.n_asu
    schur, rhs, diag, grad = packed[:n * n].reshape(n, n), *packed[n * n:].reshape(3, n)
    _, r_grad, r_curv = restraint(state.f_asu, ens.start.f_asu, ens.f_sigma)
    return schur + torch.diag(r_curv), rhs + r_grad, diag + r_curv, grad + r_grad


def global_step(schur: torch.Tensor, rhs: torch.Tensor, diag: torch.Tensor, lam: float) -> torch.Tensor:
    """``dF = -(S + lam diag)^-1 rhs`` over the amplitudes some shot sees (``diag > 0``);
    0 for the others (no pixel depends on them)."""
    seen = torch.nonzero(diag > 0)[:, 0]
    step = torch.zeros_like(rhs)
    if len(seen):
        sub = schur[seen[:, None], seen[None, :]] + torch.diag(lam * diag[seen])
        step[seen] = -solve(sub, rhs[seen, None])[:, 0]
    return step


def take_step(ens: Ensemble, comm: Comm, state: State, blocks: Sequence[Blocks], lam: float) -> Step:
    """The damped joint step at ``state`` (two all-reduces: the system, then the decrement)."""
    schur, rhs, diag, g_f = unpack_reduced(ens, state, all_sum(comm, local_schur(ens, state, blocks, lam)))
    df = global_step(schur, rhs, diag, lam)
    dthetas, local_dec = [], state.f_asu.new_zeros(())
    for centre, theta, blk in zip(ens.start.thetas, state.thetas, blocks):
        _, r_grad, r_curv = restraint(theta, centre, ens.theta_sigma)
        _, b, d, _, g_t = split(blk, r_grad, r_curv)
        dt = -solve(damped(d, lam), (g_t + b.T @ df[blk.cols])[:, None])[:, 0]
        dthetas.append(dt)
        local_dec = local_dec - g_t @ dt
    decrement = float(all_sum(comm, local_dec.reshape(1))[0] - g_f @ df)
    return Step(df, tuple(dthetas), decrement)


def with_amplitude_curvature(blocks: Sequence[Blocks]) -> list[Blocks]:
    """``blocks`` whose amplitude diagonal is the larger of the observed information's
    (`Blocks.curvature`) and the Fisher information's.

    Fisher scoring leaves out the residual term of the Hessian. Along an amplitude it is
    exact and cheap, and where it makes the curvature larger the Fisher step overshoots and
    oscillates towards the optimum; taking the larger curvature halves the steps (10 -> 5 to
    tol = 1e-3 on the tests' ensemble; 30 without convergence -> 20 without the amplitude
    restraint) and never lengthens a Fisher step (from constant starting amplitudes the
    observed curvature alone, smaller there, took 9 steps where this takes 5). The steps only:
    the error bars use the Fisher information.
    """
    out = []
    for blk in blocks:
        t = len(blk.cols)
        info = blk.terms.fisher.clone()
        fisher = torch.diagonal(info)[:t].clone()
        torch.diagonal(info)[:t] = torch.maximum(blk.curvature, fisher)
        out.append(blk._replace(terms=blk.terms._replace(fisher=info)))
    return out


def all_blocks(ens: Ensemble, comm: Comm, state: State) -> list[Blocks]:
    """`shot_blocks` of this rank's shots at ``state`` (a failing shot raises on every rank)."""
    pairs = list(zip(ens.shots, state.thetas))
    return per_shot(comm, pairs, lambda pair: shot_blocks(pair[0], ens.amap, ens.free, state.f_asu,
                                                          pair[1]), lambda pair: pair[0].index)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------
def refine(ens: Ensemble, comm: Comm = LOCAL, *, max_iter: int = 30, tol: float = 1e-3,
           lam: float = 1e-3, start: State | None = None) -> Refined:
    """Refine the amplitudes and every shot's free elements from ``start`` (default
    ``ens.start``) by damped Fisher scoring; every rank calls it with its own shots.

    Args:
        max_iter: most accepted steps (>= 1); tol: decrement at which to stop (objective
            units, dimensionless); lam: starting damping (> 0).
    Raises:
        nbfunc.ensemble.distributed.ShotError: a shot failed on some rank (all ranks raise).
    """
    if not (max_iter >= 1 and tol > 0 and lam > 0):
        raise ValueError(f"refine: need max_iter >= 1, tol > 0, lam > 0; got {max_iter}, {tol}, {lam}")
    state = ens.start if start is None else start
    value, nll = objective(ens, comm, state)
    history, message, converged, it = [value], f"stopped after max_iter = {max_iter} steps", False, 0
    while it < max_iter:
        blocks = with_amplitude_curvature(all_blocks(ens, comm, state))
        while True:
            step = take_step(ens, comm, state, blocks, lam)
            trial = State(state.f_asu + step.df, tuple(t + d for t, d in zip(state.thetas, step.dthetas)))
            new, new_nll = objective(ens, comm, trial)
            if math.isfinite(new) and new <= value:
                break
            lam *= 10
            if lam > MAX_LAMBDA:
                stuck = math.isfinite(new)
                return Refined(state, value, nll, tuple(history), it, stuck,
                               "no step lowers the objective: at its minimum up to rounding"
                               if stuck else "the objective is not finite at any trial step")
        damping, lam = lam, max(lam / 10, MIN_LAMBDA)
        state, value, nll, it = trial, new, new_nll, it + 1
        history.append(value)
        if step.decrement < tol and damping <= CONVERGED_LAMBDA:
            converged, message = True, f"decrement {step.decrement:.3g} < tol = {tol:g}"
            break
    return Refined(state, value, nll, tuple(history), it, converged, message)


# --------------------------------------------------------------------------------------------
# Uncertainties of the amplitudes with the shot parameters marginalised
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Errors:
    """Standard errors at a refined state (restraints included in the information).

    Attributes:
        information: (n_asu, n_asu) ``S``, the amplitudes' Fisher information with every
            shot's parameters marginalised (Schur complement), 1/e^2.
        f_std: (n_asu,) standard error of each amplitude (e); inf where the data (and
            restraints) do not determine it.
        f_correlation: (n_asu, n_asu) correlations of the amplitudes.
        theta_std: one (m,) per local shot: marginal standard errors of its free elements
            (their units), the amplitudes' uncertainty included.
    """

    information: torch.Tensor
    f_std: torch.Tensor
    f_correlation: torch.Tensor
    theta_std: tuple[torch.Tensor, ...]


def errors(ens: Ensemble, comm: Comm, state: State) -> Errors:
    """`Errors` at ``state``: the undamped Schur complement, all-reduced, inverted by
    `nbfunc.uncertainty.invert_information`; per shot ``Cov(theta_s) = D_s^-1 + D_s^-1
    B_s^T Cov(F) B_s D_s^-1``."""
    blocks = all_blocks(ens, comm, state)
    schur, _, diag, _ = unpack_reduced(ens, state, all_sum(comm, local_schur(ens, state, blocks, 0.0)))
    n = ens.amap.n_asu
    seen = torch.nonzero(diag > 0)[:, 0]
    cov = torch.full_like(schur, math.nan)
    corr = torch.eye(n, dtype=schur.dtype, device=schur.device)
    if len(seen):
        inv = invert_information(schur[seen[:, None], seen[None, :]])
        cov[seen[:, None], seen[None, :]] = inv.covariance
        corr[seen[:, None], seen[None, :]] = inv.correlation
    f_std = torch.sqrt(torch.diagonal(cov).clamp(min=0)).nan_to_num(nan=math.inf)
    theta_std = []
    for centre, theta, blk in zip(ens.start.thetas, state.thetas, blocks):
        _, r_grad, r_curv = restraint(theta, centre, ens.theta_sigma)
        _, b, d, _, _ = split(blk, r_grad, r_curv)
        d_inv = torch.linalg.pinv(damped(d, 0.0), hermitian=True)
        c_f = cov[blk.cols[:, None], blk.cols[None, :]]
        marginal = d_inv + d_inv @ b.T @ c_f @ b @ d_inv if len(blk.cols) else d_inv
        theta_std.append(torch.sqrt(torch.diagonal(marginal).clamp(min=0)).nan_to_num(nan=math.inf))
    return Errors(schur, f_std, corr, tuple(theta_std))
