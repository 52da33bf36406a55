"""What the per-pixel partial sums earn on the derivatives that fits call: a replica batch's
Jacobian (`nbfunc.replicas.batch_terms`: ``vmap`` over replicas of ``jacfwd`` over the free
leaves, as `fit_replicas` calls it) and ``torch.func.grad`` of a Poisson loss, each with the
sums (`nbfunc.render.PartialsRules`) and with the kernel's own derivatives (the sums switched
off), interleaved in one process.

Cases (``--case``, repeatable; default all):

* ``pull_gauss``: benchmarks/pull_test.py's truth (C program's Gaussian spots), its 7 leaves;
* ``pull_gauss_hkl``: the same with diffBragg's Gaussian spots (``-gauss_hkl_xtal -fudge 0.3``);
* ``spectrum_weights``, ``size_matrix``, ``mosaic_eta``: benchmarks/pull_models.py's truths
  and free leaves;
* ``roi_gauss``: bench_1024's centred 256x256 ROI with ``-gauss_xtal`` (``grad`` only: the
  whole tree).

    python benchmarks/bench_replica_jacobian.py --json benchmarks/results/replica_jacobian.json
    python benchmarks/bench_replica_jacobian.py --case roi_gauss --mode compiled

``--mode eager`` (default) renders with the eager kernel; ``--mode compiled`` compiles every
render (``COMPILE_AFTER = COMPILE_AFTER_TRANSFORMS = 0``; the first calls compile for minutes).
Prints one JSON object: per case and job, the median of ``--repeats`` warm calls per variant
(milliseconds) and their ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import nbfunc  # noqa: E402
import nbfunc.compile as nbcompile  # noqa: E402
import nbfunc.render as render  # noqa: E402
import pull_models  # noqa: E402
import pull_test  # noqa: E402
from common import machine  # noqa: E402
from nbfunc.cli.derive import params_from_args  # noqa: E402
from nbfunc.likelihood import pixel_deviance, poisson_problem  # noqa: E402
from nbfunc.replicas import batch_terms, poisson_replicas  # noqa: E402

ROI_GAUSS = ("-cell 100 100 100 90 90 90 -default_F 100 -lambda 1 -distance 100 -N 5 "
             "-gauss_xtal -roi 384 639 384 639 -detpixels 1024")


def cases() -> dict:
    """name -> (tree, free leaves or None for ``grad`` only)."""
    gauss = params_from_args(pull_test.TRUTH_ARGS.split())
    gauss_hkl = params_from_args(
        pull_test.TRUTH_ARGS.replace("-gauss_xtal", "-gauss_hkl_xtal -fudge 0.3").split())
    out = {"pull_gauss": (gauss, list(pull_test.FREE)),
           "pull_gauss_hkl": (gauss_hkl, list(pull_test.FREE))}
    for name in ("spectrum_weights", "size_matrix", "mosaic_eta"):
        out[name] = pull_models.CASES[name]()
    out["roi_gauss"] = (params_from_args(ROI_GAUSS.split()), None)
    return out


def jobs(p, free, replicas: int) -> dict:
    """job name -> a function of no arguments that runs it once."""
    with torch.no_grad():
        mu = nbfunc.simulate(p)
    target, used = mu * 1.1, torch.ones_like(mu, dtype=torch.bool)
    out = {"grad": lambda: torch.func.grad(
        lambda q: pixel_deviance(nbfunc.simulate(q), target, used).sum())(p)}
    if free is not None:
        counts = poisson_replicas(mu, replicas, torch.Generator().manual_seed(0))
        problem = poisson_problem(p, counts[0], free)
        flat = counts.reshape(replicas, -1)
        tile_counts = [flat if t.pixels is None else flat[:, t.pixels] for t in problem.tiles]
        theta = problem.start.expand(replicas, -1).clone()
        out["batch_terms"] = lambda: batch_terms(problem, tile_counts, theta)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", help="case name (repeatable; default all)")
    parser.add_argument("--mode", choices=("eager", "compiled"), default="eager")
    parser.add_argument("--replicas", type=int, default=50, help="replicas per batch_terms call")
    parser.add_argument("--repeats", type=int, default=5, help="warm calls per variant and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both variants")
    parser.add_argument("--json", help="write the summary to this file")
    args = parser.parse_args(argv)
    if args.mode == "compiled":
        if nbcompile.COMPILE_DISABLED:
            parser.error("--mode compiled with NANOBRAGG_DISABLE_COMPILE=1 set")
        nbcompile.COMPILE_AFTER = nbcompile.COMPILE_AFTER_TRANSFORMS = 0
    all_cases = cases()
    names = args.case or list(all_cases)
    unknown = [n for n in names if n not in all_cases]
    if unknown:
        parser.error(f"unknown case {unknown[0]!r}; choose from {', '.join(all_cases)}")
    sums_apply = render.partials_apply
    variants = {"sums": sums_apply, "kernel": lambda *a: False}
    results = {}
    for name in names:
        p, free = all_cases[name]
        for job, run in jobs(p, free, args.replicas).items():
            times = {v: [] for v in variants}
            first = {}
            for _ in range(args.rounds):
                for variant, choice in variants.items():
                    render.partials_apply = choice
                    start = time.perf_counter()
                    run()
                    first.setdefault(variant, time.perf_counter() - start)
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        run()
                        times[variant].append(time.perf_counter() - start)
            render.partials_apply = sums_apply
            median = {v: statistics.median(t) * 1e3 for v, t in times.items()}
            results.setdefault(name, {})[job] = {
                "sums_ms": round(median["sums"], 2), "kernel_ms": round(median["kernel"], 2),
                "kernel_over_sums": round(median["kernel"] / median["sums"], 3),
                "first_call_s": {v: round(t, 2) for v, t in first.items()},
                "free": free, "replicas": args.replicas if job == "batch_terms" else None}
            print(name, job, results[name][job], file=sys.stderr, flush=True)
    summary = {"benchmark": "replica_jacobian", "mode": args.mode, "machine": machine(),
               "results": results}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
