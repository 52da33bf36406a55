"""Pull test of nbfunc's maximum-likelihood fit and Fisher standard errors.

Simulates a truth (64 x 64 pixels, tetragonal-like 20 x 20 x 30 A cell with Gaussian spots and
a water background, so every pixel has mu > 0), draws N Poisson replicas with a seeded
``torch.Generator``, fits 7 parameters of each from a start perturbed by ``--start-scale``
standard errors, and reports per parameter the mean and width of the pulls
``(fit - truth)/sigma`` with sigma the Fisher standard error at each fit (and, for
comparison, at the truth). Expected: mean 0, width 1.

    python benchmarks/pull_test.py --replicas 200 --json pulls.json --seed 0 --plots docs/figures

Prints the JSON summary; ``--json`` also writes it to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import nbfunc
from nbfunc.cli.derive import params_from_args
from nbfunc.replicas import fit_replicas, poisson_replicas, pull_summary
from nbfunc.uncertainty import uncertainty

TRUTH_ARGS = ("-cell 20 20 30 90 90 90 -misset 61 27 42 -default_F 300 -N 5 -gauss_xtal "
              "-lambda 1 -distance 100 -detpixels 64 -pixel 0.3 -oversample 1 -water 0.03")
"""The truth: the direct beam and a handful of Gaussian spots of up to ~1.1e4 photons on a
~52 photon water background (every pixel has mu > 0)."""
SQUARE_ARGS = TRUTH_ARGS.replace("-gauss_xtal ", "")
"""``--square``: the same truth with square (sinc) spots, the configuration whose derivatives
come from the per-pixel partial sums (`nbfunc.render.PartialsRules`): a timing workload (its
pulls do not pass, benchmarks/README.md)."""
FREE = ("crystal.cell_a", "crystal.cell_c", "detector.distance", "detector.beam_center_f",
        "detector.beam_center_s", "crystal.misset[0]", "crystal.Na")
TARGET_MEAN, TARGET_WIDTH = 0.1, 0.1


def machine() -> dict:
    """Where the benchmark ran."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


def truth_image(p: nbfunc.Params) -> torch.Tensor:
    """The expected image (slow, fast), rendered eagerly (a one-off render is not worth a compile)."""
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        return nbfunc.simulate(p)


def run(replicas: int, seed: int, start_scale: float, batch: int, max_iter: int, tol: float,
        truth_args: str = TRUTH_ARGS) -> dict:
    """Simulate, draw, fit and summarise; returns the JSON-ready summary plus raw tensors."""
    t0, c0 = time.perf_counter(), time.process_time()
    p = params_from_args(truth_args.split())
    mu = truth_image(p)
    at_truth = uncertainty(p, mu, list(FREE))
    truth, sigma = at_truth.values, at_truth.std
    generator = torch.Generator().manual_seed(seed)
    counts = poisson_replicas(mu, replicas, generator)
    noise = torch.randn(replicas, len(FREE), generator=generator, dtype=torch.float64)
    starts = truth + start_scale * sigma * noise
    t1 = time.perf_counter()
    fits = [fit_replicas(p, counts[i:i + batch], list(FREE), starts[i:i + batch],
                         max_iter=max_iter, tol=tol) for i in range(0, replicas, batch)]
    t2 = time.perf_counter()
    values = torch.cat([f.values for f in fits])
    std = torch.cat([f.std for f in fits])
    converged = torch.cat([f.converged for f in fits])
    iterations = torch.cat([f.iterations for f in fits])
    ok = converged & torch.isfinite(std).all(1)
    at_fit = pull_summary(values[ok], truth, std[ok], FREE)
    at_true = pull_summary(values[ok], truth, sigma.expand_as(std)[ok], FREE)
    parameters = {}
    for i, name in enumerate(FREE):
        s = at_fit[name]
        parameters[name] = {
            "unit": at_truth.units[i], "truth": float(truth[i]), "sigma_at_truth": float(sigma[i]),
            "mean": s["mean"], "mean_err": s["mean_err"], "width": s["width"], "width_err": s["width_err"],
            "mean_sigma_truth": at_true[name]["mean"], "width_sigma_truth": at_true[name]["width"],
            "pass": abs(s["mean"]) <= TARGET_MEAN and abs(s["width"] - 1) <= TARGET_WIDTH}
    summary = {
        "benchmark": "pull_test", "machine": machine(), "replicas": replicas, "seed": seed,
        "used_replicas": int(ok.sum()), "converged": int(converged.sum()),
        "iterations_mean": float(iterations.float().mean()), "iterations_max": int(iterations.max()),
        "truth_args": truth_args, "free": list(FREE), "start_scale_sigma": start_scale,
        "tol": tol, "expected_counts": {"min": float(mu.min()), "max": float(mu.max()),
                                        "total": float(mu.sum())},
        "condition_number_at_truth": at_truth.condition_number,
        "parameters": parameters,
        "target": {"abs_mean_max": TARGET_MEAN, "width": [1 - TARGET_WIDTH, 1 + TARGET_WIDTH]},
        "all_pass": all(v["pass"] for v in parameters.values()),
        "runtime_s": {"setup": t1 - t0, "fits": t2 - t1, "total": time.perf_counter() - t0,
                      "per_replica": (t2 - t1) / replicas, "cpu_total": time.process_time() - c0,
                      "load_average_1min": os.getloadavg()[0]},
    }
    raw = {"values": values[ok], "std": std[ok], "truth": truth, "at_truth": at_truth}
    return summary, raw


def write_plots(folder: str, raw: dict) -> list[str]:
    """Pull histograms, correlation heatmap and corner plot (PNG) into ``folder``."""
    from nbfunc.plots import corner_plot, correlation_heatmap, pull_histograms

    pulls = (raw["values"] - raw["truth"]) / raw["std"]
    return [str(pull_histograms(pulls, FREE, os.path.join(folder, "pull_histograms.png"))),
            str(correlation_heatmap(raw["at_truth"], os.path.join(folder, "correlation.png"),
                                    "correlation at the truth")),
            str(corner_plot(raw["at_truth"], os.path.join(folder, "corner.png"),
                            samples=raw["values"], center=raw["truth"]))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=200, help="number of Poisson replicas")
    parser.add_argument("--json", help="write the summary to this file")
    parser.add_argument("--seed", type=int, default=0, help="seed of the torch.Generator")
    parser.add_argument("--plots", help="folder for the PNG figures (needs matplotlib)")
    parser.add_argument("--start-scale", type=float, default=3.0,
                        help="start = truth + this * sigma * N(0, 1)")
    parser.add_argument("--batch", type=int, default=250,
                        help="replicas fitted together (vmap); 250 was the fastest on two cores "
                             "(benchmarks/README.md)")
    parser.add_argument("--max-iter", type=int, default=30)
    parser.add_argument("--tol", type=float, default=1e-8, help="on the squared Newton decrement")
    parser.add_argument("--square", action="store_true",
                        help="square spots instead of Gaussian ones (SQUARE_ARGS)")
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error(f"--replicas must be >= 2, got {args.replicas}")
    summary, raw = run(args.replicas, args.seed, args.start_scale, args.batch, args.max_iter, args.tol,
                       SQUARE_ARGS if args.square else TRUTH_ARGS)
    if args.plots:
        summary["plots"] = write_plots(args.plots, raw)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
