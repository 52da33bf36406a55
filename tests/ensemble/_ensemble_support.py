"""A tiny synthetic ensemble shared by the tests: P 21 21 21, three 10x10 shots."""
from __future__ import annotations

import pathlib

import torch

import nbfunc
from nbfunc.ensemble.asu import AsuMap, asu_map
from nbfunc.ensemble.model import Ensemble, Shot, make_ensemble
from nbfunc.ensemble.synthetic import random_missets, synthetic_shots
from nbfunc.tree import replace_leaves

GROUP = "P 21 21 21"
CELL = (20.0, 25.0, 30.0, 90.0, 90.0, 90.0)
DMIN = 5.0
FLAGS = ("-cell 20 25 30 90 90 90 -default_F 1 -N 4 -lambda 1 -distance 40 -detpixels 10 "
         "-pixel 1.5")


def base_tree(pixels: int = 10) -> nbfunc.Params:
    flags = FLAGS.replace("-detpixels 10", f"-detpixels {pixels}")
    return nbfunc.params_from_args(flags.split())


def truth(seed: int = 5, n_shots: int = 3, pixels: int = 10
          ) -> tuple[AsuMap, torch.Tensor, list[Shot]]:
    """(map, true amplitudes (n_asu,), shots with Poisson counts)."""
    g = torch.Generator().manual_seed(seed)
    amap = asu_map(GROUP, CELL, DMIN)
    f_true = 50 + 100 * torch.rand(amap.n_asu, generator=g, dtype=torch.float64)
    shots = synthetic_shots(base_tree(pixels), amap, f_true, random_missets(n_shots, g), g)
    return amap, f_true, shots


def perturbed(shots: list[Shot], f_true: torch.Tensor, seed: int = 7, f_scale: float = 0.05,
              misset_deg: float = 0.03) -> tuple[list[nbfunc.Params], torch.Tensor]:
    """Starting trees (missets moved by ~misset_deg) and amplitudes (relative f_scale)."""
    g = torch.Generator().manual_seed(seed)
    trees = [replace_leaves(s.params, {"crystal.misset": s.params.crystal.misset
                                       + misset_deg * torch.randn(3, generator=g, dtype=torch.float64)})
             for s in shots]
    f0 = f_true * (1 + f_scale * torch.randn(len(f_true), generator=g, dtype=torch.float64))
    return trees, f0


def ensemble(amap, shots, trees, f0, free=("crystal.misset",), restraints=None) -> Ensemble:
    """An ensemble of ``shots`` whose trees are replaced by ``trees`` (the starting point)."""
    moved = [Shot(s.index, t, s.counts, s.include) for s, t in zip(shots, trees)]
    return make_ensemble(amap, moved, len(moved), list(free), f0, restraints)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(n: int, args: list[str], timeout: float = 120.0) -> list[tuple[int, str, str]]:
    """Run ``python -m nbfunc.ensemble *args`` as ``n`` ranks the way torchrun starts them
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment); returns
    (exit status, stdout, stderr) per rank. Every process is ended before returning."""
    import os
    import subprocess
    import sys

    port = free_port()
    procs = []
    try:
        for rank in range(n):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       NANOBRAGG_DISABLE_COMPILE="1")
            procs.append(subprocess.Popen([sys.executable, "-m", "nbfunc.ensemble", *args], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out, err))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def write_hkl(path, amap: AsuMap, f: torch.Tensor) -> None:
    """An ``h k l F`` file of the representatives."""
    lines = [f"{h} {k} {l} {x:.6f}" for (h, k, l), x in zip(amap.hkl.tolist(), f.tolist())]
    pathlib.Path(path).write_text("\n".join(lines) + "\n")


def _forked_rank(rank: int, world: int, port: int, argv: list[str], folder: str) -> None:
    import contextlib
    import io
    import os

    from nbfunc.ensemble.__main__ import main

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    pathlib.Path(folder, f"rank{rank}.json").write_text(
        __import__("json").dumps([status, out.getvalue(), err.getvalue()]))


def launch_forked(n: int, argv: list[str], folder, timeout: float = 60.0) -> list[tuple[int, str, str]]:
    """`launch` by forking this process (already importing torch and nbfunc, so no start-up
    cost): each child sets the torchrun environment and calls the command line's ``main``.
    Returns (exit status, stdout, stderr) per rank; every child is ended before returning."""
    import json
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_forked_rank, args=(r, n, port, argv, str(folder))) for r in range(n)]
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout)
        assert all(proc.exitcode == 0 for proc in procs), [proc.exitcode for proc in procs]
        return [tuple(json.loads(pathlib.Path(folder, f"rank{r}.json").read_text())) for r in range(n)]
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
