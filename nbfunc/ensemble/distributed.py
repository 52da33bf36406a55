"""Shots over processes with torch.distributed: sharding, sums, and failures that do not hang.

A `Comm` says which process this is among how many. With one process nothing is
initialised and every collective is the identity, so the same code runs under plain
``python`` and under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``; `init_from_env` reads them). The backend is gloo for CPU tensors and NCCL
for CUDA ones.

Every rank must reach every collective, or the others wait until the process group's
timeout. Work that can fail (reading a shot, rendering it) is therefore done between
collectives, its failure caught and turned into a one-line message, and `agree` is the next
collective on every rank: a rank that failed still calls it, all ranks learn of the failure
and raise `ShotError` naming the first failing shot, and no rank is left waiting.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 300.0
"""Seconds a collective waits for the other ranks before the process group gives up: far
above the time between collectives of a refinement (one render and Jacobian per shot), short
enough that a rank killed outright does not hold the others for torch's default 30 min."""


class ShotError(RuntimeError):
    """A shot failed on some rank: the message names the shot, the rank and the error."""


@dataclass(frozen=True)
class Comm:
    """This process's place among the processes of a run.

    Attributes:
        rank: 0 .. world - 1.
        world: number of processes.
        device: where the collectives' tensors live (CUDA for NCCL).
    """

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


LOCAL = Comm()
"""One process, no process group."""


def _env_int(name: str, default: str) -> int:
    text = os.environ.get(name, default)
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer; launch with "
                         "torchrun, or set RANK and WORLD_SIZE to integers") from None


def init_from_env(device: str | torch.device = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Comm:
    """Join the process group that ``torchrun`` (or the environment) describes.

    ``WORLD_SIZE`` unset or 1: `LOCAL` on ``device``, nothing initialised. Otherwise
    ``init_process_group`` with gloo (CPU) or NCCL (CUDA; each process takes GPU
    ``LOCAL_RANK``), ``env://`` rendezvous, and a ``timeout_s`` collective timeout.

    Raises:
        ValueError: non-integer ``RANK``/``WORLD_SIZE``, or a missing ``MASTER_ADDR``/
            ``MASTER_PORT`` (one line).
    """
    device = torch.device(device)
    world = _env_int("WORLD_SIZE", "1")
    if world <= 1:
        return Comm(0, 1, device)
    rank = _env_int("RANK", "0")
    missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but {' and '.join(missing)} unset; launch with "
                         "torchrun --nproc_per_node N, or set them")
    if device.type == "cuda":
        device = torch.device("cuda", _env_int("LOCAL_RANK", "0"))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
    return Comm(dist.get_rank(), dist.get_world_size(), device)


def finish(comm: Comm) -> None:
    """Leave the process group `init_from_env` joined (nothing for one process)."""
    if comm.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def shard(n_shots: int, comm: Comm) -> range:
    """The global indices of this rank's shots: a contiguous block, sizes differing by <= 1.

    >>> list(shard(5, Comm(1, 2)))
    [2, 3, 4]
    """
    return range(n_shots * comm.rank // comm.world, n_shots * (comm.rank + 1) // comm.world)


def all_sum(comm: Comm, tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks (every rank gets it); ``tensor`` itself for one
    process. Every rank must call it with the same shape and dtype."""
    if comm.world == 1:
        return tensor
    buffer = tensor.detach().to(comm.device, copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(tensor.device)


def gather_objects(comm: Comm, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if comm.world == 1:
        return [obj]
    out: list[Any] = [None] * comm.world
    dist.all_gather_object(out, obj)
    return out


def agree(comm: Comm, failure: str | None) -> None:
    """Raise `ShotError` on every rank if any rank passes a failure message.

    One all-reduce of a flag (and, on failure, a gather of the messages): a collective that
    a rank whose shot failed still reaches, so no rank hangs waiting for it.
    """
    flag = torch.tensor([0.0 if failure is None else 1.0], dtype=torch.float64)
    if float(all_sum(comm, flag)[0]) == 0:
        return
    messages = [m for m in gather_objects(comm, failure) if m is not None]
    raise ShotError(messages[0])


def one_line(err: BaseException, limit: int | None = 200, named: bool = True) -> str:
    """``"TypeName: message"`` (or, not ``named``, the message alone) on one line, cut to
    ``limit`` characters (None: not cut)."""
    text = " ".join((f"{type(err).__name__}: {err}" if named else str(err)).split())
    return text if limit is None or len(text) <= limit else text[:limit - 1] + "…"


def per_shot(comm: Comm, shots: Sequence[Any], fn: Callable[[Any], T],
             label: Callable[[Any], int]) -> list[T]:
    """``[fn(shot) for shot in shots]`` on this rank, then `agree`: a shot whose ``fn``
    raises stops this rank's loop and makes every rank raise `ShotError` naming
    ``label(shot)`` (its global index), the rank and the error."""
    results, failure = [], None
    for shot in shots:
        try:
            results.append(fn(shot))
        except Exception as err:  # reported to every rank by agree, never swallowed
            failure = f"shot {label(shot)} (rank {comm.rank}) failed: {one_line(err)}"
            break
    agree(comm, failure)
    return results
