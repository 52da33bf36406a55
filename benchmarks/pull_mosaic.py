"""Pull test of fitted anisotropic mosaic spreads (``mosaic_model="quadrature"``, ``crystal.eta``).

Simulates a truth (40 x 40 pixels of 0.6 mm at 60 mm, cubic 40 A cell, N 6, Gaussian spots of
up to ~2500 photons and a faint water ring) with axis spreads ``eta = (1.0, 0.6, 0.8)`` deg on
``--domains`` quadrature domains, draws N Poisson replicas with a seeded ``torch.Generator``,
fits the three spreads of each from a start ``--start-scale`` standard errors away, and
reports the mean and width of the pulls ``(fit - truth)/sigma`` (sigma: the Fisher standard
error at each fit). Expected: mean 0, width 1, within the standard errors printed.

    python benchmarks/pull_mosaic.py --replicas 300 --json pulls_mosaic.json

(300 replicas of 12 domains: about 3 minutes on one core.) Prints the JSON summary; ``--json``
also writes it to a file. tests/physics/test_aniso_mosaic.py runs the same test on 30 replicas.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import nbfunc
from nbfunc.replicas import fit_replicas, poisson_replicas, pull_summary
from nbfunc.uncertainty import uncertainty

TRUTH_ARGS = ("-cell 40 40 40 90 90 90 -misset 10 20 30 -default_F 100 -N 6 -gauss_xtal -lambda 1 "
              "-distance 60 -detpixels 40 -pixel 0.6 -oversample 1 -fluence 1e28 -water 0.01")
TRUTH_ETA = (1.0, 0.6, 0.8)
FREE = ("crystal.eta[0]", "crystal.eta[1]", "crystal.eta[2]")


def truth_tree(domains: int) -> nbfunc.Params:
    """`TRUTH_ARGS` with quadrature domains and the axis spreads `TRUTH_ETA` (deg)."""
    p = nbfunc.params_from_args(TRUTH_ARGS.split())
    fields = {k: getattr(p.crystal, k) for k in type(p.crystal).model_fields
              if k not in ("mosaic_axes", "mosaic_scales")}
    fields.update(mosaic_model="quadrature", mosaic_domains=domains, eta=list(TRUTH_ETA))
    return p.model_copy(update={"crystal": nbfunc.Crystal(**fields)})


def run(replicas: int, domains: int, seed: int, start_scale: float, batch: int) -> dict:
    t0 = time.perf_counter()
    p = truth_tree(domains)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        mu = nbfunc.simulate(p)
    at_truth = uncertainty(p, mu, list(FREE))
    truth, sigma = at_truth.values, at_truth.std
    generator = torch.Generator().manual_seed(seed)
    counts = poisson_replicas(mu, replicas, generator)
    starts = truth + start_scale * sigma * torch.randn(replicas, len(FREE), generator=generator,
                                                       dtype=torch.float64)
    t1 = time.perf_counter()
    fits = [fit_replicas(p, counts[i:i + batch], list(FREE), starts[i:i + batch])
            for i in range(0, replicas, batch)]
    t2 = time.perf_counter()
    values = torch.cat([f.values for f in fits])
    std = torch.cat([f.std for f in fits])
    converged = torch.cat([f.converged for f in fits])
    iterations = torch.cat([f.iterations for f in fits])
    ok = converged & torch.isfinite(std).all(1)
    pulls = pull_summary(values[ok], truth, std[ok], FREE)
    parameters = {name: {"unit": at_truth.units[i], "truth": float(truth[i]),
                         "sigma_at_truth": float(sigma[i]), **pulls[name],
                         "within_3_errors": abs(pulls[name]["mean"]) <= 3 * pulls[name]["mean_err"]
                         and abs(pulls[name]["width"] - 1) <= 3 * pulls[name]["width_err"]}
                  for i, name in enumerate(FREE)}
    return {"benchmark": "pull_mosaic", "replicas": replicas, "domains": domains, "seed": seed,
            "truth_args": TRUTH_ARGS, "truth_eta_deg": list(TRUTH_ETA), "free": list(FREE),
            "start_scale_sigma": start_scale, "used_replicas": int(ok.sum()),
            "converged": int(converged.sum()), "iterations_max": int(iterations.max()),
            "expected_counts": {"max": float(mu.max()), "total": float(mu.sum())},
            "parameters": parameters,
            "all_within_3_errors": all(v["within_3_errors"] for v in parameters.values()),
            "runtime_s": {"setup": t1 - t0, "fits": t2 - t1, "per_replica": (t2 - t1) / replicas,
                          "load_average_1min": os.getloadavg()[0]},
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=300, help="number of Poisson replicas")
    parser.add_argument("--domains", type=int, default=12, help="quadrature domains (1 or >= 6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the torch.Generator")
    parser.add_argument("--start-scale", type=float, default=3.0,
                        help="start = truth + this * sigma * N(0, 1)")
    parser.add_argument("--batch", type=int, default=50, help="replicas fitted together (vmap)")
    parser.add_argument("--json", help="write the summary to this file")
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error(f"--replicas must be >= 2, got {args.replicas}")
    text = json.dumps(run(args.replicas, args.domains, args.seed, args.start_scale, args.batch), indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
