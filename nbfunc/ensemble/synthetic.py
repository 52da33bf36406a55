"""Small synthetic ensembles: shots rendered from known amplitudes with Poisson noise, and
the files of a refinement spec. For examples and tests; randomness is an explicit generator.
"""
from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np
import torch

from nbfunc.ensemble.asu import AsuMap
from nbfunc.ensemble.model import Shot, make_shot, shot_tree
from nbfunc.params import Params
from nbfunc.render import simulate
from nbfunc.tree import replace_leaves


def random_missets(n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3) misset angles (deg), uniform in [0, 360): random orientations (not uniform on
    the rotation group; enough to sample different reflections per shot)."""
    return 360 * torch.rand(n, 3, generator=generator, dtype=torch.float64)


def synthetic_shots(base: Params, amap: AsuMap, f_asu: torch.Tensor, missets: torch.Tensor,
                    generator: torch.Generator) -> list[Shot]:
    """One `Shot` per row of ``missets`` (n, 3) deg: ``base`` turned by it, rendered with the
    amplitudes ``f_asu`` (n_asu,) (e), counts drawn from Poisson(mu) with ``generator``."""
    shots = []
    for i, misset in enumerate(missets):
        p = replace_leaves(base, {"crystal.misset": misset.to(base.crystal.misset.dtype)})
        blank = make_shot(i, p, torch.zeros(p.detector.spixels, p.detector.fpixels), amap)
        mu = simulate(shot_tree(blank, amap, f_asu))
        shots.append(make_shot(i, p, torch.poisson(mu, generator=generator), amap))
    return shots


def write_shots(folder, shots: Sequence[Shot], trees: Sequence[Params] | None = None) -> list[dict]:
    """Write each shot's tree (``shot_NNNN.json``, `Params.save`) and counts
    (``shot_NNNN.npy``); returns the spec's ``shots`` entries (paths relative to ``folder``).
    ``trees`` (one per shot) replaces the shots' own trees, e.g. perturbed starting values."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for k, shot in enumerate(shots):
        stem = f"shot_{shot.index:04d}"
        (trees[k] if trees is not None else shot.params).save(folder / f"{stem}.json")
        np.save(folder / f"{stem}.npy", shot.counts.numpy())
        entries.append({"params": f"{stem}.json", "counts": f"{stem}.npy"})
    return entries


def write_spec(path, spec: dict) -> None:
    """Write a refinement spec (a dict of `nbfunc.ensemble.spec.RefineSpec` fields) as JSON."""
    pathlib.Path(path).write_text(json.dumps(spec, indent=1))
