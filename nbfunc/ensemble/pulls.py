"""Pull test of the ensemble's error bars: refine replicas of a synthetic ensemble from
perturbed starts and compare the errors made with the standard errors claimed.

For each replica (its own seed: true amplitudes, orientations, Poisson counts, perturbed
start), the pulls ``(refined - true) / std`` of the well-measured amplitudes (|F|) and of every
shot's free elements should have mean 0 and standard deviation 1 when the error bars are right.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nbfunc.cli.derive import params_from_args
from nbfunc.ensemble.asu import asu_map
from nbfunc.ensemble.distributed import LOCAL
from nbfunc.ensemble.model import Shot, make_ensemble
from nbfunc.ensemble.scoring import errors, refine
from nbfunc.ensemble.synthetic import random_missets, synthetic_shots
from nbfunc.tree import replace_leaves


@dataclass(frozen=True)
class PullSummary:
    """Pulls over all replicas: count, mean, standard deviation and largest |pull|."""

    count: int
    mean: float
    std: float
    largest: float


def summarise(pulls: torch.Tensor) -> PullSummary:
    """`PullSummary` of a (n,) tensor of pulls (``std``: the sample standard deviation).

    >>> summarise(torch.tensor([-1.0, 0.0, 1.0]))
    PullSummary(count=3, mean=0.0, std=1.0, largest=1.0)
    """
    n = pulls.numel()
    mean = float(pulls.mean()) if n else math.nan
    std = float(pulls.pow(2).mean().sub(mean * mean).mul(n / max(n - 1, 1)).sqrt()) if n > 1 else math.nan
    return PullSummary(n, mean, std, float(pulls.abs().max()) if n else math.nan)


def replica_pulls(seed: int, n_shots: int = 3, pixels: int = 10, well: float = 20.0,
                  f_scale: float = 0.05, misset_deg: float = 0.03, tol: float = 1e-4
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(amplitude pulls, misset pulls) of one replica: a P 21 21 21 crystal (20 x 25 x 30 A,
    amplitudes uniform in [50, 150] e to 5 A), ``n_shots`` shots of ``pixels`` square in random
    orientations, refined from amplitudes and missets perturbed by ``f_scale`` (relative) and
    ``misset_deg`` (deg), with a weak amplitude restraint (100 e). Amplitudes with
    ``std < well`` (e) count; ``tol`` is `refine`'s."""
    g = torch.Generator().manual_seed(seed)
    base = params_from_args(f"-cell 20 25 30 90 90 90 -default_F 1 -N 4 -lambda 1 -distance 40 "
                            f"-detpixels {pixels} -pixel 1.5".split())
    amap = asu_map("P 21 21 21", (20, 25, 30, 90, 90, 90), 5.0)
    f_true = 50 + 100 * torch.rand(amap.n_asu, generator=g, dtype=torch.float64)
    shots = synthetic_shots(base, amap, f_true, random_missets(n_shots, g), g)
    moved = [Shot(s.index, replace_leaves(s.params, {"crystal.misset": s.params.crystal.misset
                                                     + misset_deg * torch.randn(3, generator=g, dtype=torch.float64)}),
                  s.counts, s.include) for s in shots]
    f0 = f_true * (1 + f_scale * torch.randn(amap.n_asu, generator=g, dtype=torch.float64))
    ens = make_ensemble(amap, moved, n_shots, ["crystal.misset"], f0, {"F": 100.0})
    result = refine(ens, LOCAL, tol=tol)
    errs = errors(ens, LOCAL, result.state)
    keep = errs.f_std < well
    f_pulls = (result.state.f_asu.abs() - f_true)[keep] / errs.f_std[keep]
    misset = torch.cat([(theta - s.params.crystal.misset) / std
                        for theta, s, std in zip(result.state.thetas, shots, errs.theta_std)])
    return f_pulls, misset


def pull_test(replicas: int, first_seed: int = 10, **kwargs) -> dict[str, PullSummary]:
    """`replica_pulls` of seeds ``first_seed ..``, summarised: ``{"F": ..., "misset": ...}``."""
    parts = [replica_pulls(first_seed + k, **kwargs) for k in range(replicas)]
    return {"F": summarise(torch.cat([f for f, _ in parts])),
            "misset": summarise(torch.cat([m for _, m in parts]))}
