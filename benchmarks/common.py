"""Shared pieces of the benchmarks: the machine, the workloads, timers and a peak-RSS probe.

Every benchmark script prints one JSON object (and writes it with ``--json PATH``). Scripts
never assert: a target that is not met is a number in the report, not a failure. Measurements
that depend on process-wide state (compilation on or off, the peak RSS of a run) are made in
fresh subprocesses started by `run_worker` or `peak_rss`, each in its own temporary working
directory so that no ``Fdump.bin`` left by an earlier run is picked up.

Workloads are nanoBragg flag lists (`workload_flags`), so the same run can be given to
`nbfunc.cli.derive.params_from_args`, to ``python -m nbfunc`` and to the C program.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Callable

JSON_MARK = "BENCH_JSON "
"""Prefix of the line on which a worker subprocess prints its JSON result."""

BASE_1024 = "-cell 100 100 100 90 90 90 -default_F 100 -lambda 1 -distance 100 -N 5".split()
"""bench_1024: 1024x1024 default detector, automatic 2x oversample, 4.2 M evaluations."""

HEAVY_LOOPS = (BASE_1024 + "-detpixels 256 -pixel 0.4 -mosaic 0.5 -mosaic_dom 10 -phi 0 -osc 1 "
               "-phisteps 5 -divergence 1 -divsteps 3 -square_div -oversample 1".split())
"""heavy_loops: 256x256, 10 mosaic domains x 5 phi steps x 9 divergence sources (29.5 M evaluations)."""

TRICLINIC = ("-cell 70 80 90 75 85 95 -N 2 -interpolate -lambda 1 -distance 300 -detpixels 256 "
             "-pixel 0.1 -oversample 2".split())
"""triclinic: tricubic interpolation of a generated -8..8 HKL grid (0.26 M evaluations). At
300 mm every pixel's h, k, l stay inside the grid, so interpolation is never switched off."""

WORKLOADS = ("bench_1024", "heavy_loops", "triclinic")
HKL_SPAN = 8


def write_hkl(path: str, span: int = HKL_SPAN) -> str:
    """Write an ``h k l F`` file with every h, k, l in -span..span and deterministic F values.

    F = 10 + (7h + 13k + 29l) mod 90, so the structure factors vary between neighbours (a
    useful test of interpolation) and the file is identical on every run.
    """
    with open(path, "w") as fh:
        for h in range(-span, span + 1):
            for k in range(-span, span + 1):
                for l in range(-span, span + 1):
                    fh.write(f"{h} {k} {l} {10 + (7 * h + 13 * k + 29 * l) % 90}\n")
    return path


def workload_flags(name: str, workdir: str) -> list[str]:
    """The nanoBragg flags of workload ``name``; files it needs are written in ``workdir``.

    Raises:
        ValueError: an unknown name, listing the known ones.
    """
    if name == "bench_1024":
        return list(BASE_1024)
    if name == "heavy_loops":
        return list(HEAVY_LOOPS)
    if name == "triclinic":
        hkl = write_hkl(os.path.join(os.path.abspath(workdir), "triclinic.hkl"))
        return list(TRICLINIC) + ["-hkl", hkl]
    raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------
def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.split(":")[0].strip() == name:
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        return None
    return None


def code_version() -> dict:
    """The nbfunc being measured: git HEAD and a hash of its source files as they are on disk
    (the working tree may differ from HEAD while the kernel is being changed)."""
    import hashlib

    import nbfunc

    root = os.path.dirname(os.path.abspath(nbfunc.__file__))
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as fh:
                digest.update(fh.read())
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        head = None
    return {"git_head": head, "nbfunc_source_sha256": digest.hexdigest()[:12]}


def machine() -> dict:
    """CPU model, cores, memory, Python and torch versions, thread settings and current load."""
    import torch

    flags = (_cpuinfo_field("flags") or "").split()
    return {
        "cpu_model": _cpuinfo_field("model name") or platform.processor(),
        "cpu_simd": [f for f in ("avx2", "fma", "avx512f") if f in flags],
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        **code_version(),
    }


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def time_call(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall seconds of one call of ``fn`` and its result."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(fn: Callable[[], object], repeats: int = 3, budget_s: float = 60.0) -> dict:
    """Cold (first call) and warm (median of up to ``repeats`` later calls) wall times.

    Warm calls stop early once ``budget_s`` seconds of warm calls have been spent; at least one
    warm call is always made. The spread (min, all values) is reported alongside the median
    because a shared 2-core machine is noisy.

    Returns:
        dict with ``cold_s``, ``warm_s`` (list), ``warm_median_s``, ``warm_min_s``,
        ``loadavg_1min`` (before and after) and ``result`` (the last call's return value; drop
        it before writing JSON).
    """
    return measure_interleaved({"fn": fn}, repeats, budget_s)["fn"]


def warm_median(fn: Callable[[], object], repeats: int = 3, budget_s: float = 60.0) -> dict:
    """`measure` without the result: cold, warm list, median and min (seconds)."""
    stats = measure(fn, repeats, budget_s)
    stats.pop("result")
    return stats


def measure_interleaved(fns: dict[str, Callable[[], object]], repeats: int = 3,
                        budget_s: float = 60.0) -> dict[str, dict]:
    """`measure` for several functions called in turn, so that their ratio sees the same load.

    Each function is called once cold (in the order given), then in rounds of one call each
    until ``repeats`` rounds are done or the warm calls have used ``budget_s`` seconds.

    Returns:
        {name: dict with ``cold_s``, ``warm_s``, ``warm_median_s``, ``warm_min_s``,
        ``loadavg_1min`` (the 1-minute load average before and after), ``result``}.
    """
    load_start = round(os.getloadavg()[0], 2)
    cold, results = {}, {}
    for name, fn in fns.items():
        cold[name], results[name] = time_call(fn)
    warm: dict[str, list[float]] = {name: [] for name in fns}
    rounds = 0
    while rounds < max(1, repeats) and (rounds == 0 or sum(map(sum, warm.values())) < budget_s):
        for name, fn in fns.items():
            seconds, results[name] = time_call(fn)
            warm[name].append(seconds)
        rounds += 1
    load = [load_start, round(os.getloadavg()[0], 2)]
    return {name: {"cold_s": round(cold[name], 4), "warm_s": [round(w, 4) for w in warm[name]],
                   "warm_median_s": round(statistics.median(warm[name]), 4),
                   "warm_min_s": round(min(warm[name]), 4), "loadavg_1min": load,
                   "result": results[name]}
            for name in fns}


BUSY_LOOP = "while True: pass"
"""The second busy process of `busy_process`: one Python thread spinning (no I/O, no memory)."""


@contextlib.contextmanager
def busy_process():
    """Another process keeping one core busy for the duration of the ``with`` block, as a user
    running something else beside nbfunc would. Yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(0.5)  # let it start spinning
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def ratio(numerator: dict, denominator: dict) -> dict:
    """Ratios of two timings: of the warm medians and of the warm minima (less load-sensitive)."""
    return {"median": round(numerator["warm_median_s"] / denominator["warm_median_s"], 3),
            "min": round(numerator["warm_min_s"] / denominator["warm_min_s"], 3)}


def call_recording_warnings(fn: Callable[[], object]) -> tuple[object, list[str]]:
    """``fn()`` and the distinct warnings it raised (first line of each, at most 20), leaving out
    DeprecationWarnings (torch's own, about torch.jit)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    seen: list[str] = []
    for w in caught:
        if issubclass(w.category, DeprecationWarning):
            continue
        line = f"{w.category.__name__}: {str(w.message).splitlines()[0][:300]}"
        if line not in seen:
            seen.append(line)
    return result, seen[:20]


# --------------------------------------------------------------------------------------------
# Subprocesses
# --------------------------------------------------------------------------------------------
def mode_env(mode: str, scratch: str) -> dict:
    """Environment for a worker in ``mode`` ``"compiled"`` or ``"eager"``.

    Compiled workers get an empty ``TORCHINDUCTOR_CACHE_DIR`` under ``scratch`` so that their
    cold time includes the whole compilation rather than a read of an earlier run's cache.
    """
    if mode not in ("compiled", "eager"):
        raise ValueError(f"mode must be 'compiled' or 'eager', got {mode!r}")
    env = dict(os.environ)
    env["NANOBRAGG_DISABLE_COMPILE"] = "1" if mode == "eager" else "0"
    if mode == "compiled":
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(scratch, "inductor_cache")
    return env


def emit_worker_result(result: dict) -> None:
    """Print a worker's result where `run_worker` finds it."""
    print(JSON_MARK + json.dumps(result), flush=True)


def run_worker(argv: list[str], mode: str, timeout_s: float = 900.0) -> dict:
    """Run ``python argv`` in ``mode`` in a fresh temporary directory; return the JSON it emitted.

    A worker that fails or prints no result gives ``{"error": ...}`` with the tail of its
    stderr, so one broken measurement does not lose the others.
    """
    with tempfile.TemporaryDirectory(prefix="nbbench_") as workdir:
        try:
            done = subprocess.run([sys.executable, *argv], cwd=workdir, env=mode_env(mode, workdir),
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(JSON_MARK):
            return json.loads(line[len(JSON_MARK):])
    return {"error": f"exit status {done.returncode}", "stderr_tail": done.stderr[-2000:]}


def display_flags(name: str) -> str:
    """Workload ``name``'s flags as one string, with generated files shown as ``$TMP/...``."""
    with tempfile.TemporaryDirectory() as scratch:
        text = " ".join(workload_flags(name, scratch))
        return text.replace(os.path.abspath(scratch), "$TMP")


def peak_rss(cmd: list[str], env: dict | None = None, cwd: str | None = None,
             timeout_s: float = 900.0) -> dict:
    """Run ``cmd`` and report its peak resident set size and wall time.

    The child is reaped with ``os.wait4``, whose ``ru_maxrss`` (KiB on Linux) belongs to that
    child alone (unlike ``RUSAGE_CHILDREN``, which keeps the maximum over every child ever
    waited for).

    Returns:
        dict with ``peak_rss_mb`` (MiB), ``wall_s``, ``returncode`` and, on failure,
        ``stderr_tail``.
    """
    with tempfile.TemporaryDirectory(prefix="nbbench_") as scratch, \
            tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        workdir = cwd or scratch
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=err)
        deadline = start + timeout_s
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        result = {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "wall_s": round(wall, 3),
                  "returncode": proc.returncode}
        if proc.returncode != 0:
            err.seek(0)
            result["stderr_tail"] = err.read()[-2000:].decode(errors="replace")
        return result


def report(result: dict, json_path: str | None) -> None:
    """Print ``result`` as indented JSON and write it to ``json_path`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        with open(json_path, "w") as fh:
            fh.write(text + "\n")
