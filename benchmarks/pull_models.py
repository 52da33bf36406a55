"""Pull tests of diffBragg's models: the domain-size matrix N, a spectrum's channel weights,
anisotropic mosaic spreads, diffuse scattering and the B factor.

Four truths:

* ``size_matrix`` (48 x 48 pixels, a 20 x 20 x 30 A cell with Gaussian spots of diffBragg's
  shape gauss_hkl on a water background, so every pixel has mu > 0): Na, Nb, Nc = 5, 6, 4 and
  Nd, Ne, Nf = 1, -0.7, 0.5 cells, all six free;
* ``spectrum_weights`` (the same spots): five channels at 0.90 ... 1.10 Angstrom of weights
  0.5, 1, 2, 1, 0.5, all five free, fluence fixed;
* ``mosaic_eta`` (40 x 40 pixels of 0.6 mm at 60 mm, cubic 40 A cell, N 6, Gaussian spots and
  a faint water ring): axis spreads ``eta = (1.0, 0.6, 0.8)`` deg on 12 quadrature domains,
  all three free;
* ``diffuse`` (16 x 16 pixels, a small triclinic cell): diffuse scattering of Laue group Pmmm
  (gamma (2, 2.5, 3) A, sigma 0.3 A) and B = 25 A^2; gamma_x, sigma_x and B free.

For each, draws ``--replicas`` Poisson images with a seeded ``torch.Generator``, fits each from
a start ``--start-scale`` standard errors off (`nbfunc.replicas.fit_replicas`), and reports per
parameter the mean and width of the pulls ``(fit - truth)/sigma`` (sigma: the Fisher standard
error at each fit; also at the truth for comparison) with their standard errors, and whether
they lie within 4 standard errors of 0 and 1. The tests run the same truths on fewer replicas
(tests/physics/test_pulls_models.py, test_aniso_mosaic.py, test_diffuse.py).

    python benchmarks/pull_models.py --replicas 1000 --json pulls_models.json

Prints the JSON summary; ``--json`` also writes it to a file.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time

import torch
from common import report

import nbfunc
from nbfunc.cli.derive import params_from_args
from nbfunc.io.spectrum import spectrum_sources
from nbfunc.replicas import fit_replicas, poisson_replicas, pull_summary
from nbfunc.tree import replace_leaves
from nbfunc.uncertainty import uncertainty

D = torch.float64
SPOTS = ("-cell 20 20 30 90 90 90 -misset 61 27 42 -default_F {F} -N {N} -gauss_hkl_xtal -lambda 1 "
         "-distance 100 -detpixels 48 -pixel 0.3 -oversample 1 -water 0.03")


def size_matrix():
    """(tree, free parameters) of the domain-size matrix case."""
    p = params_from_args(SPOTS.format(F=30, N=5).split())
    truth = {"crystal.Nb": 6.0, "crystal.Nc": 4.0, "crystal.Ncells_def": [1.0, -0.7, 0.5]}
    p = replace_leaves(p, {k: torch.tensor(v, dtype=D) for k, v in truth.items()})
    return p, ["crystal.Na", "crystal.Nb", "crystal.Nc", "crystal.Ncells_def[0]",
               "crystal.Ncells_def[1]", "crystal.Ncells_def[2]"]


def spectrum_weights():
    """(tree, free parameters) of the spectrum case."""
    p = params_from_args(SPOTS.format(F=30, N=8).split())
    sources = spectrum_sources([0.9, 0.95, 1.0, 1.05, 1.1], [0.5, 1.0, 2.0, 1.0, 0.5],
                               p.beam.beam_vector, normalize=False)
    return p.model_copy(update={"beam": p.beam.model_copy(update={"sources": sources})}), \
        ["beam.sources.weights"]


def mosaic_eta():
    """(tree, free parameters) of the anisotropic mosaic case (quadrature domains)."""
    p = params_from_args(("-cell 40 40 40 90 90 90 -misset 10 20 30 -default_F 100 -N 6 -gauss_xtal "
                          "-lambda 1 -distance 60 -detpixels 40 -pixel 0.6 -oversample 1 -fluence 1e28 "
                          "-water 0.01 -mosaic_quadrature -mosaic_dom 12 -eta 1.0 0.6 0.8").split())
    return p, ["crystal.eta[0]", "crystal.eta[1]", "crystal.eta[2]"]


def diffuse():
    """(tree, free parameters) of the diffuse scattering and B factor case."""
    p = params_from_args(("-cell 30 34 38 88 92 95 -misset 5 15 -25 -default_F 30 -N 3 -lambda 1 "
                          "-distance 20 -pixel 1 -detpixels 16 -oversample 1 -fluence 1e29 -diffuse "
                          "-diffuse_gamma 2 2.5 3 -diffuse_sigma 0.3 -laue_group Pmmm -bfactor 25").split())
    return p, ["crystal.diffuse_gamma[0]", "crystal.diffuse_sigma[0]", "crystal.B"]


CASES = {"size_matrix": size_matrix, "spectrum_weights": spectrum_weights, "mosaic_eta": mosaic_eta,
         "diffuse": diffuse}


def run_case(name: str, replicas: int, seed: int, start_scale: float, batch: int) -> dict:
    p, free = CASES[name]()
    t0 = time.perf_counter()
    with torch.no_grad():
        mu = nbfunc.simulate(p)
    at_truth = uncertainty(p, mu, free)
    truth, sigma = at_truth.values, at_truth.std
    generator = torch.Generator().manual_seed(seed)
    counts = poisson_replicas(mu, replicas, generator)
    starts = truth + start_scale * sigma * torch.randn(replicas, len(truth), generator=generator, dtype=D)
    fits = [fit_replicas(p, counts[i:i + batch], free, starts[i:i + batch])
            for i in range(0, replicas, batch)]
    values = torch.cat([f.values for f in fits])
    std = torch.cat([f.std for f in fits])
    converged = torch.cat([f.converged for f in fits])
    ok = converged & torch.isfinite(std).all(1)
    names = fits[0].names
    at_fit = pull_summary(values[ok], truth, std[ok], names)
    at_true = pull_summary(values[ok], truth, sigma.expand_as(std)[ok], names)
    used = int(ok.sum())
    mean_bound, width_bound = 4 / math.sqrt(used), 4 / math.sqrt(2 * (used - 1))
    parameters = {}
    for i, key in enumerate(names):
        s = at_fit[key]
        parameters[key] = {
            "unit": at_truth.units[i], "truth": float(truth[i]), "sigma_at_truth": float(sigma[i]),
            "mean": s["mean"], "mean_err": s["mean_err"], "width": s["width"],
            "width_err": s["width_err"], "mean_sigma_truth": at_true[key]["mean"],
            "width_sigma_truth": at_true[key]["width"],
            "pass": abs(s["mean"]) < mean_bound and abs(s["width"] - 1) < width_bound}
    return {"replicas": replicas, "used_replicas": used, "converged": int(converged.sum()),
            "iterations_max": int(torch.cat([f.iterations for f in fits]).max()),
            "expected_counts": {"min": float(mu.min()), "max": float(mu.max())},
            "condition_number_at_truth": at_truth.condition_number,
            "bounds": {"abs_mean": mean_bound, "abs_width_minus_1": width_bound},
            "parameters": parameters, "all_pass": all(v["pass"] for v in parameters.values()),
            "runtime_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=1000, help="Poisson replicas per case")
    parser.add_argument("--seed", type=int, default=0, help="seed of the torch.Generator")
    parser.add_argument("--start-scale", type=float, default=2.0,
                        help="start = truth + this * sigma * N(0, 1)")
    parser.add_argument("--batch", type=int, default=250, help="replicas fitted together (vmap)")
    parser.add_argument("--case", choices=sorted(CASES), action="append",
                        help="run only this case (repeatable; default: all)")
    parser.add_argument("--json", help="write the summary to this file")
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error(f"--replicas must be >= 2, got {args.replicas}")
    with torch.compiler.set_stance("force_eager"):
        cases = {name: run_case(name, args.replicas, args.seed, args.start_scale, args.batch)
                 for name in (args.case or sorted(CASES))}
    summary = {"benchmark": "pull_models", "seed": args.seed, "start_scale_sigma": args.start_scale,
               "machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "cpu": platform.processor() or platform.machine()},
               "cases": cases}
    report(summary, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
