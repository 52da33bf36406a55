"""Datasets of many shots: render N randomised shots from a JSON spec, sharded over ranks.

A spec names a base tree and how some of its leaves vary from shot to shot; shot ``i``'s
values are drawn from a random stream seeded by ``(seed, i)`` alone, so a shot is the same
whichever rank renders it, in whatever order, and however often the run is restarted. The
shots are cut into blocks of ``shots_per_file`` consecutive indices; block ``k`` is rendered
by rank ``k mod world_size`` and written as one NXmx HDF5 file (`nbfunc.io.nxmx`, one frame
per shot, in index order) with a JSON sidecar of every shot's drawn values::

    out/spec.json                            the spec (a rerun must give the same one)
    out/shots_0000000-0000049.json           shots 0..49: index and drawn values of each
    out/shots_0000000-0000049.h5             shots 0..49: NXmx, (50, slow, fast) photons
    out/manifest.json                        written when every block is done

Each file is written whole or not at all (`nbfunc.io.atomic`: a temporary file renamed into
place), the sidecar before the images, and a block counts as done when its ``.h5`` exists.
A run that is killed (any rank, at any moment) is resumed by running the same command again:
done blocks are skipped, temporary files of the killed run are removed, and the other blocks
are rendered; no shot is lost or written twice. The number of ranks may differ between runs.

Spec (JSON; lengths and angles in the tree's units, `nbfunc.params`)::

    {"flags": "-cell 79 79 38 90 90 90 -default_F 100 -N 10 -lambda 1 -distance 100 -detpixels 256",
     "shots": 1000, "seed": 0, "shots_per_file": 50, "noise": true,
     "vary": {"crystal.misset": "random_orientation",
              "crystal.Na": {"uniform": [5, 15]},
              "beam.fluence": {"normal": [1e24, 1e23]}}}

``flags`` (nanoBragg flags) or ``tree`` (a file written by `nbfunc.Params.save`, relative to
the spec) gives the base tree. ``vary`` maps leaf paths (`nbfunc.Params.leaf_paths`) to a
distribution: ``{"uniform": [low, high]}`` or ``{"normal": [mean, std]}`` (a bound may be a
list, one per element of a vector leaf), or ``"random_orientation"`` for ``crystal.misset``
(a rotation drawn uniformly over all orientations). Every drawn tree is validated; a draw
that is not a valid tree stops the run with the shot's index. ``noise``: Poisson counts
drawn per shot from the same stream (else expected photons). Varying a detector or beam leaf
needs ``shots_per_file`` 1 (an NXmx file has one geometry).

Run on one process, or on several with torchrun (the ranks share nothing but one collective
at the end, `nbfunc.ensemble.distributed.agree`: a failure on any rank is printed by rank 0 on
one line and every rank exits 1; otherwise rank 0 writes the manifest)::

    python -m nbfunc.dataset spec.json out/
    torchrun --nproc_per_node 4 -m nbfunc.dataset spec.json out/
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import sys
from typing import Literal, Union

import numpy as np
import pydantic
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from nbfunc.io.atomic import atomic_write_bytes
from nbfunc.io.errors import NbfuncInputError, first_validation_error, read_limited
from nbfunc.params import Params
from nbfunc.tree import get_leaf, replace_leaves

SPEC_MAX_BYTES = 1 << 20
"""Largest spec file read (1 MiB)."""

Bound = Union[float, list[float]]


class Uniform(BaseModel):
    """Uniform between ``low`` and ``high`` (each a number or one per element of the leaf)."""

    model_config = ConfigDict(extra="forbid")
    uniform: tuple[Bound, Bound]


class Normal(BaseModel):
    """Normal with ``mean`` and ``std`` (each a number or one per element of the leaf)."""

    model_config = ConfigDict(extra="forbid")
    normal: tuple[Bound, Bound]


Distribution = Union[Literal["random_orientation"], Uniform, Normal]


class DatasetSpec(BaseModel):
    """A dataset: base tree, number of shots, seed, file size and the leaves that vary."""

    model_config = ConfigDict(extra="forbid")
    flags: str | None = Field(None, description="nanoBragg flags of the base tree")
    tree: str | None = Field(None, description="Params.save file of the base tree")
    shots: int = Field(gt=0, description="number of shots")
    seed: int = Field(0, ge=0, description="seed of every shot's random stream")
    shots_per_file: int = Field(50, gt=0, description="consecutive shots per NXmx file")
    noise: bool = Field(True, description="Poisson counts (else expected photons)")
    vary: dict[str, Distribution] = Field(default_factory=dict,
                                          description="leaf path -> distribution")

    @model_validator(mode="after")
    def _one_base(self):
        if (self.flags is None) == (self.tree is None):
            raise ValueError("give the base tree as exactly one of 'flags' or 'tree'")
        return self

    @field_validator("vary")
    @classmethod
    def _orientation_is_misset(cls, vary):
        for path, dist in vary.items():
            if dist == "random_orientation" and path != "crystal.misset":
                raise ValueError(f"'random_orientation' is for crystal.misset, not {path}")
        return vary


def load_spec(path: str) -> DatasetSpec:
    """The spec in ``path`` (JSON), validated.

    Raises:
        NbfuncInputError: unreadable file, or JSON that is not a spec (one line).
    """
    raw = read_limited(path, "dataset spec", "give a JSON dataset spec (see nbfunc.dataset)",
                       SPEC_MAX_BYTES)
    try:
        return DatasetSpec.model_validate_json(raw)
    except pydantic.ValidationError as err:
        where, message = first_validation_error(err)
        raise NbfuncInputError(f"{path}: {where or 'spec'}: {message} (see nbfunc.dataset for "
                               "the spec's fields)") from None


def base_tree(spec: DatasetSpec, spec_dir: str = ".") -> Params:
    """The base tree of ``spec`` (float64), with every varied path checked to be a leaf."""
    if spec.flags is not None:
        from nbfunc.cli.derive import params_from_args

        tree = params_from_args(spec.flags.split())
    else:
        tree = Params.load(os.path.join(spec_dir, spec.tree))
    paths = tree.leaf_paths()
    for path in spec.vary:
        if path not in paths:
            raise NbfuncInputError(f"vary: {path} is not a leaf of the tree; leaves are "
                                   f"{', '.join(paths[:8])}, ... (Params.leaf_paths())")
    varied_geometry = [p for p in spec.vary if p.split(".")[0] in ("detector", "beam")]
    if varied_geometry and spec.shots_per_file > 1:
        raise NbfuncInputError(f"vary: {varied_geometry[0]} changes the geometry, and an NXmx "
                               "file holds one; set shots_per_file to 1")
    return tree


VALUES, NOISE = 0, 1
"""The two random streams of a shot: its drawn values, and its Poisson noise."""


def shot_stream(seed: int, index: int, purpose: int = VALUES) -> np.random.Generator:
    """A random stream of shot ``index``: numpy's PCG64 seeded by ``(seed, index, purpose)``
    (`VALUES` or `NOISE`), independent of every other shot's and of the other purpose."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index, purpose])))


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A (3, 3) rotation matrix drawn uniformly over all rotations (the matrix of a uniform
    unit quaternion, Shoemake's method)."""
    u1, u2, u3 = rng.random(3)
    a, b = math.sqrt(1 - u1), math.sqrt(u1)
    x, y, z, w = (a * math.sin(2 * math.pi * u2), a * math.cos(2 * math.pi * u2),
                  b * math.sin(2 * math.pi * u3), b * math.cos(2 * math.pi * u3))
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def misset_angles(r: np.ndarray) -> np.ndarray:
    """nanoBragg misset angles (deg, (3,)) of the rotation matrix ``r``: the angles for which
    `nbfunc.rotation.xyz_rotation_matrix` (``Rz Ry Rx``) equals ``r``."""
    ry = math.asin(max(-1.0, min(1.0, -r[2, 0])))
    return np.degrees([math.atan2(r[2, 1], r[2, 2]), ry, math.atan2(r[1, 0], r[0, 0])])


def draw(dist, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """One draw of ``dist`` for a leaf of ``shape`` (in the leaf's unit)."""
    if dist == "random_orientation":
        return misset_angles(random_rotation(rng))
    low, high = (np.broadcast_to(np.asarray(x, dtype=np.float64), shape)
                 for x in (dist.uniform if isinstance(dist, Uniform) else dist.normal))
    if isinstance(dist, Uniform):
        return rng.uniform(low, high)
    return rng.normal(low, high)


def shot_values(spec: DatasetSpec, base: Params, index: int) -> dict[str, list | float]:
    """Shot ``index``'s drawn values, ``{path: value}`` in ``spec.vary``'s order (JSON-ready)."""
    rng = shot_stream(spec.seed, index)
    out = {}
    for path, dist in spec.vary.items():
        value = draw(dist, tuple(get_leaf(base, path).shape), rng)
        out[path] = value.tolist() if np.ndim(value) else float(value)
    return out


def shot_tree(base: Params, values: dict, index: int) -> Params:
    """``base`` with ``values`` put in, validated (`Params.model_validate`).

    Raises:
        NbfuncInputError: the drawn values do not make a valid tree (one line, with the shot).
    """
    like = {path: torch.as_tensor(v, dtype=get_leaf(base, path).dtype) for path, v in values.items()}
    try:
        return Params.model_validate_json(replace_leaves(base, like).model_dump_json())
    except pydantic.ValidationError as err:
        where, message = first_validation_error(err)
        raise NbfuncInputError(f"shot {index}: the drawn values make an invalid tree ({where}: "
                               f"{message}); narrow the distribution in 'vary'") from None


def block_name(first: int, last: int) -> str:
    """File stem of the block of shots ``first..last``."""
    return f"shots_{first:07d}-{last:07d}"


def blocks(spec: DatasetSpec) -> list[tuple[int, int]]:
    """``(first, last)`` shot indices of every block, in order."""
    n = spec.shots_per_file
    return [(s, min(s + n, spec.shots) - 1) for s in range(0, spec.shots, n)]


def render_block(spec: DatasetSpec, base: Params, first: int, last: int,
                 device: str = "cpu") -> tuple[np.ndarray, list[Params], list[dict]]:
    """Images (shots, slow, fast) float32, trees and drawn values of shots ``first..last``."""
    import nbfunc

    values = [shot_values(spec, base, i) for i in range(first, last + 1)]
    trees = [shot_tree(base, v, i) for i, v in zip(range(first, last + 1), values)]
    images = []
    for i, tree in zip(range(first, last + 1), trees):
        with torch.no_grad():
            image = nbfunc.simulate(tree.to(device=device) if device != "cpu" else tree).cpu()
        if spec.noise:
            seed = int(shot_stream(spec.seed, i, NOISE).integers(2**63 - 1))
            image = torch.poisson(image.clamp(min=0), generator=torch.Generator().manual_seed(seed))
        images.append(image.to(torch.float32).numpy())
    return np.stack(images), trees, values


def write_block(folder: str, spec: DatasetSpec, base: Params, first: int, last: int,
                device: str = "cpu") -> str:
    """Render and write one block: the JSON sidecar, then the NXmx file. Returns its path."""
    import nbfunc
    from nbfunc.io.nxmx import write_nxmx

    images, trees, values = render_block(spec, base, first, last, device)
    stem = os.path.join(folder, block_name(first, last))
    record = {"shots": [{"index": i, "values": v} for i, v in zip(range(first, last + 1), values)]}
    atomic_write_bytes(stem + ".json", json.dumps(record, indent=1).encode())
    params = trees[0] if len(trees) == 1 else nbfunc.stack(trees)
    write_nxmx(stem + ".h5", images, params)
    return stem + ".h5"


def spec_text(spec: DatasetSpec) -> str:
    """The spec as the canonical JSON written to ``spec.json``."""
    return spec.model_dump_json(indent=1)


def prepare_folder(folder: str, spec: DatasetSpec, rank: int, mine: list[tuple[int, int]]) -> None:
    """Create ``folder`` with ``spec.json`` (rank 0), or check that it holds the same spec;
    remove the temporary files that a killed run left of the blocks ``mine`` (this rank's:
    no other rank writes them) and, on rank 0, of the spec and the manifest.

    Raises:
        NbfuncInputError: the folder cannot be created, or holds a dataset of another spec.
    """
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise NbfuncInputError(f"{folder}: cannot be the output folder ({exc.strerror}); give a "
                               "folder that exists or can be created") from None
    path = os.path.join(folder, "spec.json")
    text = spec_text(spec)
    if os.path.exists(path):
        if read_limited(path, "dataset spec", "", SPEC_MAX_BYTES).decode() != text:
            raise NbfuncInputError(f"{folder}: holds a dataset of another spec (its spec.json "
                                   "differs); choose a new folder, or rerun with the same spec")
    elif rank == 0:
        atomic_write_bytes(path, text.encode())
    names = [block_name(*b) + ext for b in mine for ext in (".json", ".h5")]
    names += ["spec.json", "manifest.json"] if rank == 0 else []
    for name in names:
        for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.nbfunc-tmp")):
            os.remove(stale)


def done_blocks(folder: str, spec: DatasetSpec) -> set[tuple[int, int]]:
    """Blocks whose NXmx file exists."""
    return {b for b in blocks(spec) if os.path.exists(os.path.join(folder, block_name(*b) + ".h5"))}


def manifest(folder: str, spec: DatasetSpec) -> dict:
    """The manifest: spec hash, every block's files and shots, and what is missing."""
    done = done_blocks(folder, spec)
    every = blocks(spec)
    return {"spec_sha256": hashlib.sha256(spec_text(spec).encode()).hexdigest(),
            "shots": spec.shots, "complete": len(done) == len(every),
            "files": [{"images": block_name(*b) + ".h5", "values": block_name(*b) + ".json",
                       "first": b[0], "last": b[1]} for b in every if b in done],
            "missing": [list(b) for b in every if b not in done]}


def generate(spec: DatasetSpec, folder: str, rank: int = 0, world_size: int = 1,
             spec_dir: str = ".", device: str = "cpu") -> list[str]:
    """Render this rank's blocks that are not done yet (block ``k`` on rank
    ``k mod world_size``). Returns the files written.

    Raises:
        NbfuncInputError: a bad spec, folder or draw (one line; a draw names its shot).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
    base = base_tree(spec, spec_dir)
    mine = [b for k, b in enumerate(blocks(spec)) if k % world_size == rank]
    prepare_folder(folder, spec, rank, mine)
    done = done_blocks(folder, spec)
    written = []
    for block in mine:
        if block in done:
            continue
        try:
            written.append(write_block(folder, spec, base, *block, device))
        except NbfuncInputError:
            raise
        except (RuntimeError, ValueError) as err:
            raise RuntimeError(f"shots {block[0]}-{block[1]}: {str(err).splitlines()[0]}") from None
    return written


def write_manifest(folder: str, spec: DatasetSpec) -> dict:
    """Write ``manifest.json`` (`manifest`) into ``folder``; returns it."""
    out = manifest(folder, spec)
    atomic_write_bytes(os.path.join(folder, "manifest.json"), json.dumps(out, indent=1).encode())
    return out


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status: 0 done, 1 a rank failed (rank 0 prints the
    first failure on one line; every rank learns of it at the same collective, so none waits
    for a failed one), 2 a bad process environment."""
    from nbfunc.ensemble.distributed import ShotError, agree, finish, init_from_env, one_line

    parser = argparse.ArgumentParser(prog="python -m nbfunc.dataset",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="dataset spec (JSON)")
    parser.add_argument("folder", help="output folder (created; rerun to resume)")
    parser.add_argument("--device", default="cpu",
                        help="cpu, or cuda (each rank uses cuda:LOCAL_RANK)")
    args = parser.parse_args(argv)
    try:
        comm = init_from_env(args.device)
    except (ValueError, RuntimeError) as err:
        print(f"nbfunc.dataset: {one_line(err, None, named=False)}", file=sys.stderr)
        return 2
    failure = None
    try:
        spec = load_spec(args.spec)
        generate(spec, args.folder, comm.rank, comm.world,
                 os.path.dirname(os.path.abspath(args.spec)), str(comm.device))
    except (NbfuncInputError, OSError, RuntimeError, ValueError) as err:
        failure = f"rank {comm.rank}: {one_line(err, None, named=False)}"
    try:
        agree(comm, failure)  # every rank reaches it, failed or not
    except ShotError as err:
        if comm.rank == 0:
            print(f"nbfunc.dataset: {err}", file=sys.stderr)
        finish(comm)
        return 1
    if comm.rank == 0:
        out = write_manifest(args.folder, spec)
        print(json.dumps({"folder": args.folder, "complete": out["complete"],
                          "files": len(out["files"]), "missing": len(out["missing"])}))
    finish(comm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
