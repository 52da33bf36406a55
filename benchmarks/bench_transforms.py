"""Cost of the torch.func transforms users call, relative to a compiled forward render.

    python benchmarks/bench_transforms.py --json benchmarks/results/transforms.json

Two cases, each against a forward render of the same pixels (`nbfunc.simulate_pixels`):

* ``bench_roi``: bench_1024 (cubic cell, N 5, 2x oversample) on its centred 256x256 ROI
  (0.26 M evaluations).
* ``loop_heavy``: a triclinic, misset cell with 10 mosaic domains x 5 phi steps x 9
  divergence sources on a 64x64 detector (1.8 M evaluations).

For each case: ``grad`` (``torch.func.grad`` of the Poisson negative log-likelihood of the
pixels with respect to the whole tree), ``jacfwd`` (the pixels with respect to 10 scalar
leaves), ``hessian`` (the likelihood with respect to 6 scalar leaves); each is timed
interleaved with the forward (`common.measure_interleaved`), so a ratio sees one machine
load. Also ``vmap`` (64 members of 64x64 pixels, against a loop of forwards) and
``uncertainty`` (`nbfunc.uncertainty` with 10 free leaves on bench_roi).

With ``--busy`` every transform and the vmap comparison are timed a second time in the same
worker while another process keeps one core busy (`common.busy_process`): the ratios then,
and how much each side slowed against its quiet timing (the issue's check that transforms
slow no more than the forward does when the machine is shared).

Each runs in a ``compiled`` worker (every render compiled: `nbfunc.compile.COMPILE_AFTER` and
``COMPILE_AFTER_TRANSFORMS`` = 0; the transforms run the compiled functions derived from the kernel, `nbfunc.derived`) and
an ``eager`` worker (NANOBRAGG_DISABLE_COMPILE=1). ``cold_s`` of the compiled worker includes
the compiles (torch's on-disk inductor cache may hold some of them from earlier runs).
"""
from __future__ import annotations

import argparse
import os
import time

import common

BENCH_ROI = common.BASE_1024 + ["-roi", "384", "639", "384", "639"]
LOOP_HEAVY = ("-cell 70 80 90 75 85 95 -misset 10 -20 30 -default_F 100 -lambda 1 -distance 100 "
              "-N 5 -detpixels 64 -pixel 0.4 -mosaic 0.5 -mosaic_dom 10 -phi 0 -osc 1 -phisteps 5 "
              "-divergence 1 -divsteps 3 -square_div -oversample 1").split()
CASES = {"bench_roi": BENCH_ROI, "loop_heavy": LOOP_HEAVY}

JAC_LEAVES = ("crystal.cell_a", "crystal.cell_b", "crystal.cell_c", "crystal.cell_alpha",
              "crystal.cell_beta", "crystal.cell_gamma", "detector.distance",
              "detector.beam_center_f", "detector.beam_center_s", "beam.wavelength")
"""The 10 scalar leaves of ``jacfwd`` and ``uncertainty``; the first 6 are the Hessian's."""
VMAP_MEMBERS = 64
VMAP_FLAGS = "-default_F 100 -lambda 1 -N 5 -detpixels 64 -pixel 0.4 -oversample 2".split()


def _case(flags: list[str]):
    """The tree, its observed counts (a shifted cell) and the Poisson likelihood of a tree."""
    import torch

    import nbfunc
    from nbfunc.cli.derive import params_from_args

    p = params_from_args(flags)
    shifted = nbfunc.replace_leaves(p, {"crystal.cell_a": p.crystal.cell_a * 1.001})
    with torch.no_grad():
        observed = nbfunc.simulate_pixels(shifted) + 1.0

    def nll(q):
        mu = nbfunc.simulate_pixels(q) + 1.0
        return (mu - observed * torch.log(mu)).sum()

    return p, nll


def _leaf_function(p, names, fn):
    """``fn`` of the tree as a function of the named scalar leaves, and their values."""
    import nbfunc
    from nbfunc.tree import get_leaf

    return (lambda *x: fn(nbfunc.replace_leaves(p, dict(zip(names, x))))), tuple(
        get_leaf(p, n) for n in names)


def transforms(name: str, args) -> dict:
    """grad, jacfwd and hessian of case ``name``, each interleaved with the forward."""
    import torch

    import nbfunc
    from nbfunc.render import evaluation_count

    p, nll = _case(CASES[name])
    pixels, x10 = _leaf_function(p, JAC_LEAVES, nbfunc.simulate_pixels)
    loss6, x6 = _leaf_function(p, JAC_LEAVES[:6], nll)
    jobs = {
        "grad": lambda: torch.func.grad(nll)(p),
        "jacfwd": lambda: torch.func.jacfwd(pixels, argnums=tuple(range(10)))(*x10),
        "hessian": lambda: torch.func.hessian(loss6, argnums=tuple(range(6)))(*x6),
    }
    out = {"flags": " ".join(CASES[name]), "evaluations": evaluation_count(p)}
    for job in args.jobs:
        stats = common.measure_interleaved({"forward": lambda: nbfunc.simulate_pixels(p),
                                            job: jobs[job]}, args.repeats, args.budget)
        for s in stats.values():
            s.pop("result")
        out[job] = {**stats, "ratio_vs_forward": common.ratio(stats[job], stats["forward"])}
        if args.busy:
            out[job]["busy"] = _busy_ratio({"forward": lambda: nbfunc.simulate_pixels(p),
                                            job: jobs[job]}, job, "forward", args, stats)
    return out


def _busy_ratio(fns: dict, name: str, reference: str, args, quiet: dict) -> dict:
    """``fns`` timed again, interleaved, while a second process keeps one core busy
    (`common.busy_process`): the ratio of ``name`` to ``reference`` then, and how much each
    slowed against the ``quiet`` timings of the same process (ratios of warm medians)."""
    with common.busy_process():
        stats = common.measure_interleaved(fns, args.repeats, args.budget)
    for s in stats.values():
        s.pop("result", None)
    slowdown = {k: round(stats[k]["warm_median_s"] / quiet[k]["warm_median_s"], 3) for k in fns}
    return {**stats, "ratio": common.ratio(stats[name], stats[reference]),
            "slowdown_vs_quiet": slowdown}


def ensemble(args) -> dict:
    """vmap over 64 stacked 64x64 members against a loop of forwards."""
    import torch

    import nbfunc
    from nbfunc.cli.derive import params_from_args

    members = [params_from_args(VMAP_FLAGS + ["-cell", *[f"{95 + 0.1 * i:.1f}"] * 3, "90", "90",
                                              "90", "-distance", f"{90 + 0.5 * i}"])
               for i in range(VMAP_MEMBERS)]
    stacked = nbfunc.stack(members)
    batched = torch.func.vmap(nbfunc.simulate)
    stats = common.measure_interleaved({
        "loop": lambda: torch.stack([nbfunc.simulate(m) for m in members]),
        "vmap": lambda: batched(stacked)}, args.repeats, args.budget)
    diff = float((stats["loop"].pop("result") - stats["vmap"].pop("result")).abs().max())
    out = {"members": VMAP_MEMBERS, "max_abs_diff_vmap_vs_loop": diff, **stats,
           "loop_over_vmap": common.ratio(stats["loop"], stats["vmap"])}
    if args.busy:
        out["busy"] = _busy_ratio({"loop": lambda: torch.stack([nbfunc.simulate(m) for m in members]),
                                   "vmap": lambda: batched(stacked)}, "loop", "vmap", args, stats)
    return out


def error_bars(args) -> dict:
    """`nbfunc.uncertainty` with 10 free leaves on bench_roi, against one forward."""
    import torch

    import nbfunc
    from nbfunc.uncertainty import uncertainty

    p, _ = _case(BENCH_ROI)
    with torch.no_grad():
        counts = nbfunc.simulate(p) + 1.0
    stats = common.measure_interleaved({
        "forward": lambda: nbfunc.simulate(p),
        "uncertainty": lambda: uncertainty(p, counts, list(JAC_LEAVES))},
        args.repeats, args.budget)
    for s in stats.values():
        s.pop("result")
    return {**stats, "ratio_vs_forward": common.ratio(stats["uncertainty"], stats["forward"])}


def worker(args) -> dict:
    """Every measurement in this process's compile mode."""
    import nbfunc.compile

    nbfunc.compile.COMPILE_AFTER = nbfunc.compile.COMPILE_AFTER_TRANSFORMS = 0
    out = {"compile_disabled": nbfunc.compile.COMPILE_DISABLED, **common.code_version()}
    for part in args.parts:
        if part in CASES:
            run = lambda: transforms(part, args)  # noqa: E731
        else:
            run = {"vmap": lambda: ensemble(args), "uncertainty": lambda: error_bars(args)}[part]
        out[part], warned = common.call_recording_warnings(run)
        out[part]["warnings"] = warned
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", dest="modes", action="append", choices=("compiled", "eager"),
                        help="repeat to choose several (default: both)")
    parts = (*CASES, "vmap", "uncertainty")
    parser.add_argument("--part", dest="parts", action="append", choices=parts,
                        help="repeat to choose several (default: all)")
    parser.add_argument("--job", dest="jobs", action="append", choices=("grad", "jacfwd", "hessian"),
                        help="transforms timed per case; repeat (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="warm calls per median")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of warm calls at most")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--busy", action="store_true",
                        help="time every transform and vmap again while a second process keeps "
                             "one core busy")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.parts = args.parts or list(parts)
    args.jobs = args.jobs or ["grad", "jacfwd", "hessian"]
    if args.worker:
        common.emit_worker_result(worker(args))
        return
    started = time.perf_counter()
    result = {"benchmark": "transforms", "machine": common.machine()}
    passed = [f"--repeats={args.repeats}", f"--budget={args.budget}"]
    passed += [f"--part={part}" for part in args.parts] + [f"--job={job}" for job in args.jobs]
    passed += ["--busy"] * args.busy
    for mode in args.modes or ["compiled", "eager"]:
        result[mode] = common.run_worker([os.path.abspath(__file__), "--worker", *passed], mode,
                                         timeout_s=3600.0)
    result["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    result["total_s"] = round(time.perf_counter() - started, 1)
    common.report(result, args.json)


if __name__ == "__main__":
    main()
