"""Peak memory and end-to-end time of the command line, and memory against loop counts.

    python benchmarks/bench_memory.py --json memory.json

* ``cli``: ``python -m nbfunc <bench_1024 flags> -floatfile out.bin -nonoise -nopgm`` in a
  temporary directory, float64 (the default) and ``-dtype float32``: peak resident set size of
  the process and its wall time, start-up and file writing included. ``import_only`` is the
  peak RSS of a process that only imports torch and nbfunc, the floor under every figure.
* ``mosaic``: one `nbfunc.simulate` of a 256x256 image with 10 and with 100 mosaic domains at
  the same ``-chunk`` (evaluations held at once), each in a fresh process; 10x more
  evaluations should not need more memory. ``baseline`` is the same process stopped before
  rendering, so ``render_increment_mb`` is what the render itself added.

Peak RSS is ``ru_maxrss`` of the child alone (`common.peak_rss`). Renders run eagerly
(``NANOBRAGG_DISABLE_COMPILE=1``) unless ``--compiled`` is given; the command line chooses
for itself (it renders bench_1024 eagerly).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import sys
import time

import common

MOSAIC_FLAGS = (common.BASE_1024 + "-detpixels 256 -pixel 0.4 -mosaic 0.5 -oversample 1".split())
DEFAULT_CHUNK = 1 << 18


def mosaic_worker(domains: int, chunk: int, render: bool) -> None:
    """Build the mosaic workload's parameters and, when ``render``, render it once."""
    import nbfunc
    from nbfunc.cli.derive import params_from_args

    p = params_from_args(MOSAIC_FLAGS + ["-mosaic_dom", str(domains), "-chunk", str(chunk)])
    if render:
        nbfunc.simulate(p)


def cli_runs(extra: list[str], repeats: int) -> dict:
    """Peak RSS and wall time of ``python -m nbfunc`` on bench_1024, ``repeats`` times."""
    cmd = [sys.executable, "-m", "nbfunc", *common.BASE_1024, *extra,
           "-floatfile", "out.bin", "-nonoise", "-nopgm"]
    runs = [common.peak_rss(cmd) for _ in range(max(1, repeats))]
    ok = [r for r in runs if r["returncode"] == 0]
    out = {"command": " ".join(["python", *cmd[1:]]), "runs": runs}
    if ok:
        out.update(peak_rss_mb=max(r["peak_rss_mb"] for r in ok),
                   wall_median_s=round(statistics.median(r["wall_s"] for r in ok), 3),
                   wall_min_s=min(r["wall_s"] for r in ok))
    return out


def mosaic_runs(chunk: int, mode: str) -> dict:
    """Peak RSS of one render with 10 and with 100 mosaic domains, and of the baseline."""

    script = os.path.abspath(__file__)
    out: dict = {"flags": " ".join(MOSAIC_FLAGS) + " -mosaic_dom N -chunk " + str(chunk),
                 "chunk": chunk, "mode": mode}
    with tempfile.TemporaryDirectory(prefix="nbbench_") as scratch:
        env = common.mode_env(mode, scratch)
        for label, extra in (("baseline", ["--domains", "10", "--no-render"]),
                             ("domains_10", ["--domains", "10"]),
                             ("domains_100", ["--domains", "100"])):
            out[label] = common.peak_rss([sys.executable, script, "--worker", "--chunk", str(chunk),
                                          *extra], env=env)
    base = out["baseline"]["peak_rss_mb"]
    small, large = out["domains_10"]["peak_rss_mb"], out["domains_100"]["peak_rss_mb"]
    out["peak_ratio_100_over_10"] = round(large / small, 3)
    out["render_increment_mb"] = {"domains_10": round(small - base, 1),
                                  "domains_100": round(large - base, 1)}
    if small > base:
        out["increment_ratio_100_over_10"] = round((large - base) / (small - base), 3)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                        help="evaluations per chunk of the mosaic renders")
    parser.add_argument("--repeats", type=int, default=2, help="command-line runs per dtype")
    parser.add_argument("--compiled", action="store_true", help="compile the mosaic renders")
    parser.add_argument("--part", dest="parts", action="append", choices=("cli", "mosaic"),
                        help="repeat to choose several (default: both)")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--domains", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--no-render", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        mosaic_worker(args.domains, args.chunk, not args.no_render)
        return
    parts = args.parts or ["cli", "mosaic"]
    started = time.perf_counter()
    result: dict = {"benchmark": "memory", "machine": common.machine()}
    if "cli" in parts:
        result["import_only"] = common.peak_rss([sys.executable, "-c", "import torch, nbfunc.cli.main"])
        result["cli"] = {"float64": cli_runs([], args.repeats),
                         "float32": cli_runs(["-dtype", "float32"], args.repeats)}
    if "mosaic" in parts:
        result["mosaic"] = mosaic_runs(args.chunk, "compiled" if args.compiled else "eager")
    result["loadavg_1min_end"] = round(os.getloadavg()[0], 2)
    result["total_s"] = round(time.perf_counter() - started, 1)
    common.report(result, args.json)


if __name__ == "__main__":
    main()
