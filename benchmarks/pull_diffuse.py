"""Pull test of the diffuse-scattering parameters and the per-shot B factor.

The truth: a 16 x 16 detector of a small triclinic cell with diffBragg's diffuse scattering
(Laue group Pmmm, anisotropic gamma, isotropic sigma) and B = 25 A^2. Draws N Poisson replicas
with a seeded ``torch.Generator``, fits gamma_x, sigma_x and B of each (Fisher scoring, all
replicas at once) from a start perturbed by ``--start-scale`` standard errors, and prints per
parameter the mean and width of the pulls ``(fit - truth)/sigma`` (sigma: the Fisher standard
error at each fit). Expected: mean 0 and width 1 within their standard errors.

    python benchmarks/pull_diffuse.py --replicas 400 --seed 0

Prints the JSON summary.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import nbfunc
from nbfunc.cli.derive import params_from_args
from nbfunc.params import Crystal
from nbfunc.replicas import fit_replicas, poisson_replicas, pull_summary
from nbfunc.uncertainty import uncertainty

TRUTH_ARGS = ("-cell 30 34 38 88 92 95 -misset 5 15 -25 -default_F 30 -N 3 -lambda 1 "
              "-distance 20 -pixel 1 -detpixels 16 -oversample 1 -fluence 1e29")
DIFFUSE = {"diffuse": True, "diffuse_gamma": [2.0, 2.5, 3.0], "diffuse_sigma": [0.3, 0.3, 0.3],
           "diffuse_laue_group": "Pmmm", "bfactor": True, "B": 25.0}
FREE = ("crystal.diffuse_gamma[0]", "crystal.diffuse_sigma[0]", "crystal.B")


def truth_tree() -> nbfunc.Params:
    p = params_from_args(TRUTH_ARGS.split())
    crystal = {**dict(p.crystal), **{k: torch.as_tensor(v, dtype=torch.float64)
                                     if isinstance(v, (list, float)) else v for k, v in DIFFUSE.items()}}
    return nbfunc.Params(**{**dict(p), "crystal": Crystal(**crystal)})


def run(replicas: int, seed: int, start_scale: float, batch: int) -> dict:
    t0 = time.perf_counter()
    with torch.compiler.set_stance("force_eager"):
        p = truth_tree()
        mu = nbfunc.simulate(p).detach()
        at_truth = uncertainty(p, mu, list(FREE))
        truth, sigma = at_truth.values, at_truth.std
        generator = torch.Generator().manual_seed(seed)
        counts = poisson_replicas(mu, replicas, generator)
        starts = truth + start_scale * sigma * torch.randn(replicas, len(FREE), generator=generator,
                                                           dtype=torch.float64)
        fits = [fit_replicas(p, counts[i:i + batch], list(FREE), starts[i:i + batch])
                for i in range(0, replicas, batch)]
    values = torch.cat([f.values for f in fits])
    std = torch.cat([f.std for f in fits])
    ok = torch.cat([f.converged for f in fits]) & torch.isfinite(std).all(1)
    summary = pull_summary(values[ok], truth, std[ok], FREE)
    return {"truth_args": TRUTH_ARGS, "diffuse": DIFFUSE, "replicas": replicas, "converged": int(ok.sum()),
            "seed": seed, "start_scale": start_scale, "seconds": time.perf_counter() - t0,
            "total_counts": float(mu.sum()),
            "parameters": {name: {"truth": float(truth[i]), "sigma_at_truth": float(sigma[i]), **summary[name]}
                           for i, name in enumerate(FREE)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-scale", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(run(args.replicas, args.seed, args.start_scale, args.batch), indent=2))


if __name__ == "__main__":
    main()
