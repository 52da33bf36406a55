"""The Schur-complement step and errors equal those of the whole joint system."""
import pytest
import torch

from _ensemble_support import ensemble, perturbed, truth
from nbfunc.ensemble.distributed import LOCAL
from nbfunc.ensemble.model import restraint
from nbfunc.ensemble.scoring import all_blocks, errors, take_step

RESTRAINTS = {"F": 40.0, "crystal.Na": 0.5}


@pytest.fixture(scope="module")
def system():
    """An ensemble of two 8x8 shots (misset and Na free, both restrained), its blocks at a
    perturbed state, and the joint gradient (N,) and information (N, N) built directly,
    N = n_asu + 2 m."""
    torch.set_num_threads(1)
    amap, f_true, shots = truth(n_shots=2, pixels=8)
    trees, f0 = perturbed(shots, f_true)
    ens = ensemble(amap, shots, trees, f0, free=("crystal.misset", "crystal.Na"),
                   restraints=RESTRAINTS)
    state = ens.start._replace(f_asu=ens.start.f_asu * 1.05,
                               thetas=tuple(t + 0.01 for t in ens.start.thetas))
    blocks = all_blocks(ens, LOCAL, state)
    n, m = amap.n_asu, len(ens.free)
    size = n + m * len(shots)
    info, grad = torch.zeros(size, size, dtype=torch.float64), torch.zeros(size, dtype=torch.float64)
    for k, (blk, theta, centre) in enumerate(zip(blocks, state.thetas, ens.start.thetas)):
        idx = torch.cat([blk.cols, n + k * m + torch.arange(m)])
        info[idx[:, None], idx[None, :]] += blk.terms.fisher
        grad[idx] += blk.terms.grad
        _, r_grad, r_curv = restraint(theta, centre, ens.theta_sigma)
        grad[n + k * m:n + (k + 1) * m] += r_grad
        info.diagonal()[n + k * m:n + (k + 1) * m] += r_curv
    _, r_grad, r_curv = restraint(state.f_asu, ens.start.f_asu, ens.f_sigma)
    grad[:n] += r_grad
    info.diagonal()[:n] += r_curv
    return ens, state, blocks, grad, info


def test_step_solves_the_joint_system(system):
    ens, state, blocks, grad, info = system
    lam = 0.1
    step = take_step(ens, LOCAL, state, blocks, lam)
    used = torch.nonzero(info.diagonal() > 0)[:, 0]
    damped = info[used[:, None], used[None, :]] + lam * torch.diag(info.diagonal()[used])
    direct = torch.zeros_like(grad)
    direct[used] = -torch.linalg.solve(damped, grad[used])
    ours = torch.cat([step.df, *step.dthetas])
    torch.testing.assert_close(ours, direct, rtol=1e-7, atol=1e-10 * float(direct.abs().max()))
    assert step.decrement == pytest.approx(float(-(grad @ direct)), rel=1e-8)


def test_errors_are_the_joint_inverse(system):
    ens, state, blocks, grad, info = system
    errs = errors(ens, LOCAL, state)
    n, m = ens.amap.n_asu, len(ens.free)
    # with the F restraint every amplitude is determined
    assert bool(torch.isfinite(errs.f_std).all())
    cov = torch.linalg.inv(info)
    torch.testing.assert_close(errs.f_std, cov.diagonal()[:n].sqrt(), rtol=1e-7, atol=0)
    for k, std in enumerate(errs.theta_std):
        torch.testing.assert_close(std, cov.diagonal()[n + k * m:n + (k + 1) * m].sqrt(),
                                   rtol=1e-7, atol=0)
    corr = cov[:n, :n] / torch.outer(cov.diagonal()[:n].sqrt(), cov.diagonal()[:n].sqrt())
    torch.testing.assert_close(errs.f_correlation, corr, rtol=1e-6, atol=1e-9)


def test_unobserved_amplitudes_get_infinite_errors(system):
    ens, state, _, _, _ = system
    free = ens.__class__(ens.amap, ens.shots, ens.n_shots, ens.free, ens.start,
                         torch.full_like(ens.f_sigma, float("inf")), ens.theta_sigma)
    errs = errors(free, LOCAL, state)
    seen = torch.zeros(ens.amap.n_asu, dtype=torch.bool)
    for blk in all_blocks(free, LOCAL, state):
        seen[blk.cols] = True
    assert bool(torch.isinf(errs.f_std[~seen]).all()) and bool(torch.isfinite(errs.f_std[seen]).any())
