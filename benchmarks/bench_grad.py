"""Cost of derivatives and of ensembles, relative to a forward render.

    python benchmarks/bench_grad.py --json grad.json

Three measurements, each made in a compiled and in an eager subprocess (``mode``):

* ``reverse``: one reverse-mode gradient of the Poisson negative log-likelihood of the
  rendered pixels with respect to every floating leaf of the parameter tree (forward with
  the graph, then ``torch.autograd.grad``), over one forward render of the same pixels
  without a graph (`nbfunc.simulate_pixels` both). On a centred ROI of bench_1024
  (``--reverse-roi`` pixels square): the likelihood of `nbfunc.likelihood`, which sums over
  the rendered pixels only.
* ``jacfwd``: ``torch.func.jacfwd`` of the image with respect to 10 scalar leaves, over one
  forward render, on a ``--jacfwd-roi`` square ROI of bench_1024.
* ``vmap``: ``torch.func.vmap(nbfunc.simulate)`` over 16 stacked 64x64 members with
  different cells and distances, against a Python loop of 16 `nbfunc.simulate` calls
  (``loop_over_vmap`` > 1 means vmap is faster). In the compiled worker both run compiled
  (vmap as compiled batched functions); in the eager worker both run eagerly. The compiled
  worker compiles every render (`nbfunc.compile.COMPILE_AFTER` = 0).

Each pair is timed interleaved (`common.measure_interleaved`: one call of each in turn), so
both sides of a ratio see the same machine load; ratios are given of the warm medians and of
the warm minima. The first call of each is reported as ``cold_s``. Warnings raised during a
measurement (for example vmap falling back to a slow loop) are listed with it.
"""
from __future__ import annotations

import argparse
import os
import time

import common

JAC_LEAVES = ("crystal.cell_a", "crystal.cell_b", "crystal.cell_c", "crystal.cell_alpha",
              "crystal.cell_beta", "crystal.cell_gamma", "detector.distance",
              "detector.beam_center_f", "detector.beam_center_s", "beam.wavelength")
"""The 10 scalar leaves of the forward-mode Jacobian."""

VMAP_MEMBERS = 16
VMAP_FLAGS = "-default_F 100 -lambda 1 -N 5 -detpixels 64 -pixel 0.4 -oversample 2".split()


def centred_roi(size: int, detpixels: int = 1024) -> list[str]:
    """``-roi`` flags for a ``size`` x ``size`` pixel square in the middle of the detector."""
    lo = (detpixels - size) // 2
    return ["-roi", str(lo), str(lo + size - 1), str(lo), str(lo + size - 1)]


def _timed_pair(fns: dict, args) -> tuple[dict, dict]:
    """Interleaved timings of ``fns`` (results split off) and their results."""
    stats = common.measure_interleaved(fns, args.repeats, args.budget)
    return stats, {name: s.pop("result") for name, s in stats.items()}


def reverse(args, dtype) -> dict:
    """Reverse-mode gradient of a Poisson NLL w.r.t. all floating leaves, over forward time."""
    import torch
    import torch.utils._pytree as pytree

    import nbfunc
    from nbfunc.cli.derive import params_from_args

    p = params_from_args(common.BASE_1024 + centred_roi(args.reverse_roi), dtype=dtype)
    shifted = nbfunc.replace_leaves(p, {"crystal.cell_a": p.crystal.cell_a + 0.05})
    observed = nbfunc.simulate_pixels(shifted).detach() + 1.0
    paths = [path for path, leaf in zip(p.leaf_paths(), pytree.tree_leaves(p))
             if leaf.is_floating_point() and leaf.numel() > 0]

    def gradient():
        leaves = {path: nbfunc.tree.get_leaf(p, path).detach().clone().requires_grad_(True)
                  for path in paths}
        mu = nbfunc.simulate_pixels(nbfunc.replace_leaves(p, leaves)) + 1.0
        nll = (mu - observed * torch.log(mu)).sum()
        return torch.autograd.grad(nll, list(leaves.values()), allow_unused=True)

    stats, results = _timed_pair({"forward": lambda: nbfunc.simulate_pixels(p), "gradient": gradient},
                                 args)
    grads = dict(zip(paths, results["gradient"]))
    return {"roi_pixels": [args.reverse_roi, args.reverse_roi], "leaves": len(paths),
            "leaves_unused": [path for path, g in grads.items() if g is None],
            "leaves_nonfinite_gradient": [path for path, g in grads.items()
                                          if g is not None and not bool(torch.isfinite(g).all())],
            **stats, "ratio_vs_forward": common.ratio(stats["gradient"], stats["forward"])}


def jacobian(args, dtype) -> dict:
    """torch.func.jacfwd of the ROI image w.r.t. 10 scalar leaves, over forward time."""
    import torch

    import nbfunc
    from nbfunc.cli.derive import params_from_args

    p = params_from_args(common.BASE_1024 + centred_roi(args.jacfwd_roi), dtype=dtype)
    x0 = torch.stack([nbfunc.tree.get_leaf(p, path) for path in JAC_LEAVES])

    def image(x):
        return nbfunc.simulate(nbfunc.replace_leaves(p, dict(zip(JAC_LEAVES, x.unbind(0)))))

    stats, results = _timed_pair({"forward": lambda: image(x0),
                                  "jacfwd": lambda: torch.func.jacfwd(image)(x0)}, args)
    jac = results["jacfwd"]
    return {"roi_pixels": [args.jacfwd_roi, args.jacfwd_roi], "leaves": list(JAC_LEAVES),
            "jacobian_shape": list(jac.shape), "jacobian_finite": bool(torch.isfinite(jac).all()),
            **stats, "ratio_vs_forward": common.ratio(stats["jacfwd"], stats["forward"])}


def ensemble(args, dtype) -> dict:
    """vmap over 16 stacked members against a Python loop over the same members."""
    import torch

    import nbfunc
    from nbfunc.cli.derive import params_from_args

    members = [params_from_args(VMAP_FLAGS + ["-cell", *[f"{95 + 0.7 * i:.1f}"] * 3, "90", "90", "90",
                                              "-distance", f"{90 + 2 * i}"], dtype=dtype)
               for i in range(VMAP_MEMBERS)]
    stacked = nbfunc.stack(members)
    batched = torch.func.vmap(nbfunc.simulate)
    stats, results = _timed_pair({"loop": lambda: torch.stack([nbfunc.simulate(m) for m in members]),
                                  "vmap": lambda: batched(stacked)}, args)
    return {"members": VMAP_MEMBERS, "image_pixels": [64, 64], "oversample": 2,
            "max_abs_diff_vmap_vs_loop": float((results["loop"] - results["vmap"]).abs().max()),
            **stats, "loop_over_vmap": common.ratio(stats["loop"], stats["vmap"])}


def worker(args) -> dict:
    """All three measurements in this process's compile mode."""
    import torch

    import nbfunc.compile
    from nbfunc.compile import COMPILE_DISABLED

    # every render compiled in the compiled worker (by default a process compiles only after
    # nbfunc.compile.COMPILE_AFTER evaluations of eager work)
    nbfunc.compile.COMPILE_AFTER = nbfunc.compile.COMPILE_AFTER_TRANSFORMS = 0
    dtype = getattr(torch, args.dtype)
    out = {"compile_disabled": COMPILE_DISABLED, "dtype": args.dtype, **common.code_version()}
    for name, fn in (("reverse", reverse), ("jacfwd", jacobian), ("vmap", ensemble)):
        if name in args.parts:
            out[name], warned = common.call_recording_warnings(lambda: fn(args, dtype))
            out[name]["warnings"] = warned
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float64", choices=("float32", "float64"))
    parser.add_argument("--mode", dest="modes", action="append", choices=("compiled", "eager"),
                        help="repeat to choose several (default: both)")
    parser.add_argument("--part", dest="parts", action="append", choices=("reverse", "jacfwd", "vmap"),
                        help="repeat to choose several (default: all)")
    parser.add_argument("--reverse-roi", type=int, default=256, help="ROI edge (pixels) for reverse mode")
    parser.add_argument("--jacfwd-roi", type=int, default=128, help="ROI edge (pixels) for jacfwd")
    parser.add_argument("--repeats", type=int, default=7, help="warm calls per median")
    parser.add_argument("--budget", type=float, default=40.0, help="seconds of warm calls at most")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.parts = args.parts or ["reverse", "jacfwd", "vmap"]
    if args.worker:
        common.emit_worker_result(worker(args))
        return
    started = time.perf_counter()
    result = {"benchmark": "grad", "machine": common.machine(), "workload_flags": " ".join(common.BASE_1024),
              "vmap_member_flags": " ".join(VMAP_FLAGS) + " -cell a a a 90 90 90 -distance d"}
    passed = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
              ("dtype", "reverse_roi", "jacfwd_roi", "repeats", "budget")]
    passed += [f"--part={part}" for part in args.parts]
    for mode in args.modes or ["compiled", "eager"]:
        result[mode] = common.run_worker([os.path.abspath(__file__), "--worker", *passed], mode)
    result["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    result["total_s"] = round(time.perf_counter() - started, 1)
    common.report(result, args.json)


if __name__ == "__main__":
    main()
