"""Forward rendering speed: evaluations per second, cold and warm, float32 and float64,
compiled and eager, and optionally against the C program.

    python benchmarks/bench_forward.py --workload all --json forward.json
    NANOBRAGG_C_BIN=/tmp/nanoBragg python benchmarks/bench_forward.py --workload bench_1024

Each (workload, dtype, mode) is measured in its own subprocess, because
``NANOBRAGG_DISABLE_COMPILE`` is read once at import: the eager worker runs with it set to 1,
the compiled worker with it set to 0 and an empty inductor cache, so that ``cold_s`` (the
first `nbfunc.simulate` call) includes the whole compilation. ``warm_median_s`` is the median
of the next calls. An evaluation is one (pixel, sensor layer, sub-pixel, source, phi step,
mosaic domain) term of nanoBragg's sum.

With ``NANOBRAGG_C_BIN`` pointing to a build of nanoBragg.c, the same flags are run through it
(``OMP_NUM_THREADS=2``, ``-nonoise -nopgm -noprogress``, in a temporary directory; wall time of
the whole process, so it includes start-up and writing the float image; half of the runs
before ours and half after, pooled, so that they see the same machine load), and ``c_over_ours``
is the C time divided by ours (of the medians, and of the minima). ``image_sum_rel_diff``
compares the two images' sums as a check that both rendered the same thing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time

import common

DTYPES = ("float32", "float64")
MODES = ("compiled", "eager")


def worker(workload: str, dtype_name: str, repeats: int, budget_s: float) -> dict:
    """Time `nbfunc.simulate` on one workload in this process's compile mode."""
    import torch

    import nbfunc
    from nbfunc.cli.derive import params_from_args
    from nbfunc.compile import COMPILE_DISABLED
    from nbfunc.render import evaluation_count

    flags = common.workload_flags(workload, os.getcwd())
    params = params_from_args(flags, dtype=getattr(torch, dtype_name))
    evaluations = evaluation_count(params)
    stats, warned = common.call_recording_warnings(
        lambda: common.measure(lambda: nbfunc.simulate(params), repeats, budget_s))
    image = stats.pop("result")
    stats.update(evaluations=evaluations,
                 evals_per_s_warm=round(evaluations / stats["warm_median_s"]),
                 evals_per_s_best=round(evaluations / stats["warm_min_s"]),
                 evals_per_s_cold=round(evaluations / stats["cold_s"]),
                 warnings=warned,
                 image_sum=float(image.double().sum()),
                 image_shape=list(image.shape),
                 compile_disabled=COMPILE_DISABLED, **common.code_version(),
                 torch_threads=torch.get_num_threads())
    return stats


def time_c(c_bin: str, workload: str, repeats: int) -> dict:
    """Wall times of ``repeats`` runs of the C program on ``workload``, and its image sum."""
    import numpy as np

    env = dict(os.environ, OMP_NUM_THREADS="2")
    times = []
    with tempfile.TemporaryDirectory(prefix="nbbench_c_") as workdir:
        flags = common.workload_flags(workload, workdir)
        cmd = [c_bin, *flags, "-nonoise", "-nopgm", "-noprogress", "-floatfile", "c_float.bin"]
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            if done.returncode != 0:
                return {"error": f"exit status {done.returncode}", "stderr_tail": done.stderr[-2000:]}
        image = np.fromfile(os.path.join(workdir, "c_float.bin"), dtype=np.float32)
    return {"seconds": [round(t, 4) for t in times], "image_sum": float(image.astype(np.float64).sum())}


def c_timings(before: dict, after: dict) -> dict:
    """C program runs made before and after ours, pooled (both see the load ours saw)."""
    if "error" in before or "error" in after:
        return before if "error" in before else after
    times = before["seconds"] + after["seconds"]
    return {"seconds": times, "median_s": round(statistics.median(times), 4),
            "min_s": round(min(times), 4), "OMP_NUM_THREADS": 2, "image_sum": before["image_sum"]}


def bench_workload(workload: str, args) -> dict:
    """All dtypes and modes of one workload, each in a fresh subprocess, plus the C time."""
    out: dict = {}
    c_bin = os.environ.get("NANOBRAGG_C_BIN")
    c_before = time_c(c_bin, workload, (args.repeats + 1) // 2) if c_bin else None
    for dtype in args.dtypes:
        for mode in args.modes:
            argv = [os.path.abspath(__file__), "--worker", "--workload", workload, "--dtype", dtype,
                    "--repeats", str(args.repeats), "--budget", str(args.budget)]
            out[f"{dtype}_{mode}"] = common.run_worker(argv, mode)
    if c_bin:
        c = c_timings(c_before, time_c(c_bin, workload, max(1, args.repeats // 2 + 1)))
        for key, ours in out.items():
            if "median_s" in c and "warm_median_s" in ours:
                c.setdefault("c_over_ours", {})[key] = {
                    "median": round(c["median_s"] / ours["warm_median_s"], 3),
                    "min": round(c["min_s"] / ours["warm_min_s"], 3)}
                c.setdefault("image_sum_rel_diff", {})[key] = round(
                    abs(ours["image_sum"] - c["image_sum"]) / max(abs(c["image_sum"]), 1e-30), 6)
        out["c_program"] = c
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="all", choices=(*common.WORKLOADS, "all"))
    parser.add_argument("--dtype", dest="dtypes", action="append", choices=DTYPES,
                        help="repeat to choose several (default: both)")
    parser.add_argument("--mode", dest="modes", action="append", choices=MODES,
                        help="repeat to choose several (default: both)")
    parser.add_argument("--repeats", type=int, default=3, help="warm calls per median")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of warm calls at most")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        common.emit_worker_result(worker(args.workload, args.dtypes[0], args.repeats, args.budget))
        return
    args.dtypes = args.dtypes or list(DTYPES)
    args.modes = args.modes or list(MODES)
    names = common.WORKLOADS if args.workload == "all" else (args.workload,)
    started = time.perf_counter()
    result = {"benchmark": "forward", "machine": common.machine(), "workloads": {}}
    for name in names:
        result["workloads"][name] = {"flags": common.display_flags(name), **bench_workload(name, args)}
    result["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    result["total_s"] = round(time.perf_counter() - started, 1)
    common.report(result, args.json)


if __name__ == "__main__":
    main()
