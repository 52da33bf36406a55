"""The JSON spec of an ensemble refinement, and the run it describes on every rank.

A spec names the space group, the resolution, the starting amplitudes, the per-shot free
elements, the restraints and the shots (a `nbfunc.Params` JSON and an image each); paths are
relative to the spec's folder. Each rank reads only its own shots; rank 0 writes the result.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from nbfunc.ensemble.asu import AsuMap, asu_map, asu_values
from nbfunc.ensemble.distributed import LOCAL, Comm, gather_objects, per_shot, shard
from nbfunc.ensemble.model import Ensemble, Shot, State, make_ensemble, make_shot
from nbfunc.ensemble.scoring import Errors, Refined, errors, refine
from nbfunc.ensemble.symmetry import space_group
from nbfunc.params import Params

SPEC_MAX_BYTES = 64 << 20
"""Largest spec file read (bytes): a million shots' entries."""


class ShotSpec(BaseModel):
    """One shot: its tree and its observed image."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    params: str = Field(description="Params JSON (Params.save, -params_out)")
    counts: str = Field(description="observed photons (slow, fast): .npy, or .bin float32 as "
                        "-floatfile writes it")
    mask: str | None = Field(None, description=".npy (slow, fast), nonzero: use the pixel")


class RefineSpec(BaseModel):
    """What `run_refinement` does (units in each field's description)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    space_group: str = Field(description="Hermann-Mauguin symbol, e.g. 'P 21 21 21'")
    dmin: float = Field(gt=0, description="resolution limit of the amplitudes (Angstrom)")
    cell: tuple[float, float, float, float, float, float] | None = Field(
        None, description="reference cell for d-spacings (Angstrom, deg); default: the first "
        "shot's")
    f_start: float | str = Field(description="starting amplitude of every reflection (e), or an "
                                 "HKL file (h k l F per line)")
    free: list[str] = Field(["crystal.misset"], description="per-shot free leaves or elements")
    restraints: dict[str, float] = Field({}, description="{name: sigma}: 'F' (e) or a free "
                                         "leaf/element (its unit), centred on the start")
    shots: list[ShotSpec] = Field(min_length=1)
    max_iter: int = Field(30, ge=1)
    tol: float = Field(1e-3, gt=0, description="decrement at which to stop (about twice the "
                     "objective still to gain)")
    errors: bool = Field(True, description="compute standard errors at the optimum")
    out: str = Field("refined.json", description="result JSON, written by rank 0")

    @field_validator("dmin", "tol")
    @classmethod
    def _finite(cls, v, info):
        if not math.isfinite(v):
            raise ValueError(f"{info.field_name} must be finite, got {v}")
        return v


def load_spec(path) -> tuple[RefineSpec, pathlib.Path]:
    """The validated spec and its folder.

    Raises:
        ValueError: a missing, unreadable or invalid spec (one line naming the field).
    """
    from nbfunc.io.errors import first_validation_error, read_limited

    raw = read_limited(path, "ensemble spec", "give a JSON refinement spec (docs/ensemble.md)",
                       SPEC_MAX_BYTES)
    try:
        return RefineSpec.model_validate_json(raw), pathlib.Path(path).resolve().parent
    except ValidationError as err:
        where, message = first_validation_error(err)
        raise ValueError(f"{path}: {where or 'spec'}: {message} (docs/ensemble.md lists the "
                         "fields)") from None


def read_counts(path: pathlib.Path, shape: tuple[int, int]) -> np.ndarray:
    """An image (slow, fast) from .npy, or raw float32 (.bin, as ``-floatfile`` writes it)."""
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    data = np.fromfile(path, dtype="<f4")
    if data.size != shape[0] * shape[1]:
        raise ValueError(f"{path}: {data.size} float32 values, the detector has {shape[0]} x "
                         f"{shape[1]}; give this shot's -floatfile or a .npy image")
    return data.reshape(shape)


def load_shot(index: int, entry: ShotSpec, folder: pathlib.Path, amap: AsuMap):
    """The `Shot` of one spec entry (its files read here, on its rank)."""
    p = Params.load(folder / entry.params)
    counts = read_counts(folder / entry.counts, (p.detector.spixels, p.detector.fpixels))
    mask = None if entry.mask is None else np.load(folder / entry.mask, allow_pickle=False)
    return make_shot(index, p, torch.from_numpy(np.asarray(counts, dtype=np.float64)), amap, mask)


def start_amplitudes(spec: RefineSpec, folder: pathlib.Path, amap: AsuMap) -> torch.Tensor:
    """(n_asu,) starting amplitudes: the constant ``f_start``, or an HKL file's values
    (`asu_values`; reflections it lacks start at the mean of those it has)."""
    if not isinstance(spec.f_start, str):
        return torch.full((amap.n_asu,), float(spec.f_start), dtype=torch.float64)
    from nbfunc.io.hkl import read_hkl

    grid = read_hkl(folder / spec.f_start, default_F=math.nan)
    values = asu_values(amap, grid.F, (grid.h_min, grid.k_min, grid.l_min), math.nan)
    known = torch.isfinite(values)
    if not bool(known.any()):
        raise ValueError(f"{spec.f_start}: no reflection of the asymmetric unit to "
                         f"dmin = {amap.dmin:g} A is listed; give an HKL file of this crystal")
    return torch.where(known, values, values[known].mean())


def build(spec: RefineSpec, folder: pathlib.Path, comm: Comm = LOCAL) -> Ensemble:
    """This rank's `Ensemble` of the spec (its shard of the shots). Every rank reads the
    first shot's tree: it gives the default cell and names the free elements, so that every
    rank, with or without shots, checks the spec alike (a check failing on one rank only
    would leave the others waiting at the next collective)."""
    group = space_group(spec.space_group)
    first = Params.load(folder / spec.shots[0].params)
    cell = spec.cell or tuple(float(getattr(first.crystal, f"cell_{n}"))
                              for n in ("a", "b", "c", "alpha", "beta", "gamma"))
    amap = asu_map(group, cell, spec.dmin)
    mine = shard(len(spec.shots), comm)
    shots = per_shot(comm, list(mine), lambda i: load_shot(i, spec.shots[i], folder, amap),
                     lambda i: i)
    return on_device(make_ensemble(amap, shots, len(spec.shots), spec.free,
                                   start_amplitudes(spec, folder, amap), spec.restraints,
                                   reference=first), comm.device)


def on_device(ens: Ensemble, device: torch.device) -> Ensemble:
    """``ens`` with its trees, images, grid map and state on ``device`` (where the renders
    and the solves then run; CUDA with NCCL). Untested on a GPU so far."""
    if device.type == "cpu":
        return ens
    move = lambda t: t.to(device)
    shots = tuple(Shot(s.index, s.params.to(device=device), move(s.counts), move(s.include))
                  for s in ens.shots)
    start = State(move(ens.start.f_asu), tuple(map(move, ens.start.thetas)))
    return dataclasses.replace(ens, amap=dataclasses.replace(ens.amap, index=move(ens.amap.index)),
                               shots=shots, start=start, f_sigma=move(ens.f_sigma),
                               theta_sigma=move(ens.theta_sigma))


def result_json(ens: Ensemble, comm: Comm, refined: Refined, errs: Errors | None) -> dict[str, Any] | None:
    """The result as a JSON-able dict on rank 0 (None on the others): every shot's refined
    free elements (and errors) gathered from its rank, the amplitudes |F| and their errors."""
    shots = []
    for shot, theta, k in zip(ens.shots, refined.state.thetas, range(len(ens.shots))):
        entry = {"index": shot.index, "values": dict(zip(ens.free, theta.tolist()))}
        if errs is not None:
            entry["std"] = dict(zip(ens.free, errs.theta_std[k].tolist()))
        shots.append(entry)
    gathered = [s for part in gather_objects(comm, shots) for s in part]
    if comm.rank != 0:
        return None
    out = {"space_group": ens.amap.group.name, "dmin": ens.amap.dmin, "cell": list(ens.amap.cell),
           "hkl": ens.amap.hkl.tolist(), "F": refined.state.f_asu.abs().tolist(),
           "objective": refined.objective, "nll": refined.nll, "history": list(refined.history),
           "iterations": refined.iterations, "converged": refined.converged,
           "message": refined.message, "world_size": comm.world,
           "shots": sorted(gathered, key=lambda s: s["index"])}
    if errs is not None:
        out["sigma_F"] = [x if math.isfinite(x) else None for x in errs.f_std.tolist()]
    return out


def run_refinement(path, comm: Comm = LOCAL) -> dict[str, Any] | None:
    """Refine the ensemble a spec file describes; rank 0 writes ``spec.out`` (relative to
    the spec) and returns the result dict, the other ranks return None.

    Raises:
        ValueError: a bad spec (one line).
        nbfunc.ensemble.distributed.ShotError: a shot failed to load or render on some rank
            (every rank raises, naming the shot).
    """
    spec, folder = load_spec(path)
    ens = build(spec, folder, comm)
    refined = refine(ens, comm, max_iter=spec.max_iter, tol=spec.tol)
    errs = errors(ens, comm, refined.state) if spec.errors else None
    out = result_json(ens, comm, refined, errs)
    if out is not None:
        from nbfunc.io.atomic import atomic_write_bytes

        atomic_write_bytes(folder / spec.out, json.dumps(out, indent=1).encode())
    return out
