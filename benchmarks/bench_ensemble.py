"""Many shots over torch.distributed: joint refinement and dataset generation on 1, 2 and 4
local processes (torchrun), the same total work each time.

    python benchmarks/bench_ensemble.py --json benchmarks/results/ensemble.json

``refine``: a synthetic ensemble (P 21 21 21, 20 x 25 x 30 A, amplitudes uniform in [50, 150] e
to 5 A; ``--shots`` shots of ``--pixels`` square in random orientations, Poisson counts) is
written as a refinement spec with missets perturbed by 0.03 deg and amplitudes by 5 %, then
refined by ``torchrun --nproc_per_node N -m nbfunc.ensemble refine`` for each N. Reported:
wall time, steps, shots x steps per second, each rank's peak resident memory; the largest
difference of the refined amplitudes and missets from the one-process run in standard errors;
and the pulls ``(refined - true)/std`` of the well-measured amplitudes (std < 20 e) and of the
missets (mean near 0 and standard deviation near 1 when the errors are right). Also the size
of what one step all-reduces (the amplitude block of the Schur complement).

``generate``: ``--dataset-shots`` shots of 256 x 256 pixels (random orientation and crystal size,
Poisson noise) by ``torchrun -m nbfunc.ensemble generate`` for each N: wall time, shots per
second, peak memory per rank.

Every process runs one intra-op thread (OMP_NUM_THREADS=1, as torchrun sets for N > 1), so N
processes use up to N cores; on a machine with fewer cores the larger N share them.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import common

MISSET = ("crystal.misset[0]", "crystal.misset[1]", "crystal.misset[2]")
"""The refined result's names of the three misset angles (deg)."""
GROUP, CELL, DMIN = "P 21 21 21", (20.0, 25.0, 30.0, 90.0, 90.0, 90.0), 5.0
BASE = "-cell 20 25 30 90 90 90 -default_F 1 -N 4 -lambda 1 -distance 40 -pixel 1.5 -detpixels {}"
DATASET = {"flags": "-cell 60 70 80 90 90 90 -default_F 100 -N 8 -lambda 1 -distance 100 "
                    "-detpixels 256 -pixel 0.05 -oversample 1",
           "seed": 0, "shots_per_file": 8, "noise": True,
           "vary": {"crystal.misset": "random_orientation", "crystal.Na": {"uniform": [6, 10]}}}


def write_ensemble(folder: str, n_shots: int, pixels: int, seed: int) -> dict:
    """Synthetic shots and their refinement spec in ``folder``; returns the truth."""
    import torch

    import nbfunc
    from nbfunc.ensemble.asu import asu_map
    from nbfunc.ensemble.synthetic import random_missets, synthetic_shots, write_shots, write_spec

    g = torch.Generator().manual_seed(seed)
    amap = asu_map(GROUP, CELL, DMIN)
    f_true = 50 + 100 * torch.rand(amap.n_asu, generator=g, dtype=torch.float64)
    base = nbfunc.params_from_args(BASE.format(pixels).split())
    shots = synthetic_shots(base, amap, f_true, random_missets(n_shots, g), g)
    moved = [nbfunc.replace_leaves(s.params, {"crystal.misset": s.params.crystal.misset
                                              + 0.03 * torch.randn(3, generator=g, dtype=torch.float64)})
             for s in shots]
    f0 = f_true * (1 + 0.05 * torch.randn(amap.n_asu, generator=g, dtype=torch.float64))
    hkl = os.path.join(folder, "start.hkl")
    with open(hkl, "w") as fh:
        fh.writelines(f"{h} {k} {l} {f:.6f}\n" for (h, k, l), f in zip(amap.hkl.tolist(), f0.tolist()))
    entries = write_shots(folder, shots, moved)
    write_spec(os.path.join(folder, "spec.json"),
               {"space_group": GROUP, "dmin": DMIN, "f_start": "start.hkl", "free": ["crystal.misset"],
                "restraints": {"F": 100.0}, "tol": 1e-3, "shots": entries})
    return {"hkl": amap.hkl.tolist(), "F": f_true.tolist(),
            "misset": [s.params.crystal.misset.tolist() for s in shots], "n_asu": amap.n_asu}


def torchrun(n: int, args: list[str], folder: str, timeout_s: float) -> dict:
    """``torchrun --nproc_per_node n`` of this script's worker (which runs ``args`` through
    nbfunc.ensemble's command line and records its rank's peak memory); wall time and ranks."""
    ranks = os.path.join(folder, f"ranks_{n}")
    os.makedirs(ranks, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           os.path.abspath(__file__), "--worker", ranks, "--", *args]
    start = time.perf_counter()
    # one intra-op thread per process for every N (torchrun sets it only for N > 1; two
    # threads per process beside a busy core made small renders ten times slower)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=folder, env=env)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"torchrun -n {n} failed: {run.stderr[-2000:]}")
    per_rank = [json.load(open(os.path.join(ranks, name))) for name in sorted(os.listdir(ranks))]
    return {"processes": n, "wall_s": round(wall, 2), "ranks": per_rank}


def worker(ranks: str, args: list[str]) -> None:
    """One rank: nbfunc.ensemble's command line, then this rank's time and peak memory."""
    from nbfunc.ensemble.__main__ import main

    start = time.perf_counter()
    status = main(args)
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(ranks, f"rank_{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "status": status, "seconds": round(time.perf_counter() - start, 2),
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}, fh)
    sys.exit(status)


def _pulls(values, truth, std) -> dict:
    import torch

    from nbfunc.ensemble.pulls import summarise

    return summarise(torch.tensor([(v - t) / s for v, t, s in zip(values, truth, std)],
                                  dtype=torch.float64)).__dict__


def refine_scaling(args, folder: str) -> dict:
    truth = write_ensemble(folder, args.shots, args.pixels, args.seed)
    spec_path = os.path.join(folder, "spec.json")
    spec = json.load(open(spec_path))
    runs, results = [], {}
    for n in args.procs:
        spec["out"] = f"refined_{n}.json"
        with open(spec_path, "w") as fh:
            json.dump(spec, fh)
        run = torchrun(n, ["refine", "spec.json"], folder, args.timeout)
        out = json.load(open(os.path.join(folder, spec["out"])))
        results[n] = out
        run.update(steps=out["iterations"], converged=out["converged"],
                   shot_steps_per_s=round(args.shots * out["iterations"] / run["wall_s"], 2))
        runs.append(run)
    one = results[args.procs[0]]
    well = [i for i, s in enumerate(one["sigma_F"]) if s is not None and s < 20]
    for run in runs:
        out = results[run["processes"]]
        f_diff = max(abs(out["F"][i] - one["F"][i]) / one["sigma_F"][i] for i in well)
        m_diff = max(abs(s2["values"][k] - s1["values"][k]) / s1["std"][k]
                     for s1, s2 in zip(one["shots"], out["shots"]) for k in MISSET)
        run["max_diff_vs_first_in_std"] = {"F": f_diff, "misset": m_diff}
    f_pulls = _pulls([one["F"][i] for i in well], [truth["F"][i] for i in well],
                     [one["sigma_F"][i] for i in well])
    misset = [(shot["values"][k], t, shot["std"][k]) for shot, true in zip(one["shots"], truth["misset"])
              for k, t in zip(MISSET, true)]
    n_asu = truth["n_asu"]
    return {"shots": args.shots, "pixels": args.pixels, "n_asu": n_asu, "well_measured": len(well),
            "allreduce_bytes_per_step": 8 * (n_asu * n_asu + n_asu + 4),
            "pulls_F": f_pulls, "pulls_misset": _pulls(*zip(*misset)), "runs": runs}


def generate_scaling(args, folder: str) -> dict:
    runs = []
    for n in args.procs:
        spec_path = os.path.join(folder, f"dataset_{n}.json")
        with open(spec_path, "w") as fh:
            json.dump({**DATASET, "shots": args.dataset_shots}, fh)
        run = torchrun(n, ["generate", spec_path, os.path.join(folder, f"shots_{n}")], folder, args.timeout)
        run["shots_per_s"] = round(args.dataset_shots / run["wall_s"], 2)
        runs.append(run)
    return {"shots": args.dataset_shots, "spec": {**DATASET, "shots": args.dataset_shots}, "runs": runs}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shots", type=int, default=50, help="shots of the refined ensemble")
    parser.add_argument("--pixels", type=int, default=16, help="pixels along each detector edge")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--dataset-shots", type=int, default=384)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--part", dest="parts", action="append", choices=("refine", "generate"))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per torchrun")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    out = {"benchmark": "ensemble", "machine": common.machine(), **common.code_version(),
           "loadavg_1min_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="nbens_") as folder:
        for part in args.parts or ["refine", "generate"]:
            out[part] = (refine_scaling if part == "refine" else generate_scaling)(args, folder)
    out["loadavg_1min_end"] = os.getloadavg()[0]
    common.report(out, args.json)


if __name__ == "__main__":
    main()
