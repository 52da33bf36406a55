"""Compare the benchmark JSON files with the project's targets and print a markdown table.

    python benchmarks/summarize.py --dir benchmarks/results [--json targets.json]

Reads ``forward.json``, ``grad.json`` and ``memory.json`` from ``--dir`` (those missing are
skipped) and reports, for each target, the measured figure and whether it is met. Ratios are
of warm medians, with the ratio of warm minima (less sensitive to other load on the machine)
in brackets.
"""
from __future__ import annotations

import argparse
import json
import os

C_REFERENCE_S = 0.35
"""The C program's time on bench_1024 with 2 OpenMP threads quoted in the targets (s)."""


def _load(directory: str, name: str) -> dict | None:
    path = os.path.join(directory, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _row(target: str, measured: str, value: float | None, ok) -> dict:
    met = None if value is None else bool(ok(value))
    return {"target": target, "measured": measured, "value": value, "met": met}


def forward_rows(fw: dict) -> list[dict]:
    """Speed-up over C on bench_1024: against the C run measured here and the quoted 0.35 s."""
    rows = []
    bench = fw.get("workloads", {}).get("bench_1024", {})
    c = bench.get("c_program", {})
    for dtype, goal in (("float64", 5.0), ("float32", 15.0)):
        ours = bench.get(f"{dtype}_compiled", {})
        if "warm_median_s" not in ours:
            continue
        speedup = c.get("c_over_ours", {}).get(f"{dtype}_compiled")
        if speedup:
            rows.append(_row(f"bench_1024 {dtype} >= {goal:g}x faster than C (C measured here)",
                             f"C {c['median_s']} s / ours {ours['warm_median_s']} s = "
                             f"{speedup['median']}x ({speedup['min']}x)",
                             speedup["median"], lambda v, g=goal: v >= g))
        quoted = round(C_REFERENCE_S / ours["warm_median_s"], 3)
        rows.append(_row(f"bench_1024 {dtype} >= {goal:g}x faster than C (quoted {C_REFERENCE_S} s)",
                         f"{C_REFERENCE_S} s / ours {ours['warm_median_s']} s = {quoted}x",
                         quoted, lambda v, g=goal: v >= g))
    return rows


def grad_rows(gr: dict) -> list[dict]:
    """Reverse gradient over forward, and vmap over a loop, in each mode measured."""
    rows = []
    for mode in ("compiled", "eager"):
        part = gr.get(mode, {})
        rev = part.get("reverse", {}).get("ratio_vs_forward")
        if rev:
            rows.append(_row(f"reverse gradient <= 3x forward ({mode})",
                             f"{rev['median']}x ({rev['min']}x)", rev["median"], lambda v: v <= 3.0))
        vm = part.get("vmap", {}).get("loop_over_vmap")
        if vm:
            rows.append(_row(f"vmap of 16 >= 1.5x faster than a loop ({mode} loop)",
                             f"{vm['median']}x ({vm['min']}x)", vm["median"], lambda v: v >= 1.5))
    return rows


def memory_rows(mem: dict) -> list[dict]:
    """Peak RSS of the command line and the effect of 10x more mosaic domains."""
    rows = []
    cli = mem.get("cli", {}).get("float64", {})
    if "peak_rss_mb" in cli:
        rows.append(_row("CLI peak RSS on bench_1024 <= 600 MB (float64)", f"{cli['peak_rss_mb']} MB",
                         cli["peak_rss_mb"], lambda v: v <= 600))
    mosaic = mem.get("mosaic", {})
    if "peak_ratio_100_over_10" in mosaic:
        rows.append(_row("100 vs 10 mosaic domains: peak RSS +<= 10%",
                         f"{mosaic['domains_10']['peak_rss_mb']} -> {mosaic['domains_100']['peak_rss_mb']} MB "
                         f"(x{mosaic['peak_ratio_100_over_10']})",
                         mosaic["peak_ratio_100_over_10"], lambda v: v <= 1.10))
    return rows


def forward_table(fw: dict) -> str:
    """Markdown table of every forward measurement: cold, warm, evaluations/s, C/ours."""
    lines = ["| Workload | Evaluations | dtype | Mode | Cold s | Warm median s (min) | M evals/s warm "
             "| C s | C/ours |", "|---|---|---|---|---|---|---|---|---|"]
    for name, bench in fw.get("workloads", {}).items():
        c = bench.get("c_program", {})
        for key, r in bench.items():
            if key in ("flags", "c_program"):
                continue
            dtype, mode = key.split("_", 1)
            if "warm_median_s" not in r:
                lines.append(f"| {name} | | {dtype} | {mode} | error: {r.get('error')} | | | | |")
                continue
            ratio = c.get("c_over_ours", {}).get(key, {})
            lines.append(f"| {name} | {r['evaluations'] / 1e6:.2f} M | {dtype} | {mode} | {r['cold_s']:.2f} "
                         f"| {r['warm_median_s']:.3f} ({r['warm_min_s']:.3f}) "
                         f"| {r['evals_per_s_warm'] / 1e6:.2f} | {c.get('median_s', '')} "
                         f"| {ratio.get('median', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    forward = _load(args.dir, "forward")
    if forward is not None:
        print(forward_table(forward) + "\n")
    rows = []
    for name, fn in (("forward", forward_rows), ("grad", grad_rows), ("memory", memory_rows)):
        data = _load(args.dir, name)
        if data is not None:
            rows += fn(data)
    print("| Target | Measured | Met |\n|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['measured']} | {'yes' if r['met'] else 'no'} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
