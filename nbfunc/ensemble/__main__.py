"""``python -m nbfunc.ensemble refine SPEC.json``: refine an ensemble, on one process or under
``torchrun --nproc_per_node N -m nbfunc.ensemble refine SPEC.json``.
``python -m nbfunc.ensemble pulls --replicas R``: the pull test of the error bars (one process,
prints JSON).
``python -m nbfunc.ensemble generate SPEC.json FOLDER``: render a dataset of randomised shots
(`nbfunc.dataset`), also under torchrun.

Exit status: 0 done; 1 a shot failed (every rank stops, rank 0 prints the shot, rank and
error on one line); 2 bad input (one line).
"""
from __future__ import annotations

import argparse
import sys

from nbfunc.ensemble.distributed import DEFAULT_TIMEOUT_S, ShotError, finish, init_from_env, one_line
from nbfunc.ensemble.spec import run_refinement

PROG = "python -m nbfunc.ensemble"


def parser() -> argparse.ArgumentParser:
    """The command line's parser: subcommands ``refine`` and ``pulls``."""
    top = argparse.ArgumentParser(prog=PROG, description="Multi-shot refinement (docs/ensemble.md).")
    sub = top.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("refine", help="refine shared structure factors and per-shot parameters")
    ref.add_argument("spec", help="JSON refinement spec (docs/ensemble.md)")
    ref.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    ref.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                     help="seconds a rank waits for the others at a collective")
    gen = sub.add_parser("generate", help="render a dataset of randomised shots (nbfunc.dataset)")
    gen.add_argument("spec", help="JSON dataset spec (nbfunc.dataset)")
    gen.add_argument("folder", help="output folder (created; rerun to resume)")
    gen.add_argument("--device", default="cpu", help="cpu, or cuda (each rank uses cuda:LOCAL_RANK)")
    pulls = sub.add_parser("pulls", help="pull test of the error bars on synthetic replicas")
    pulls.add_argument("--replicas", type=int, default=6)
    pulls.add_argument("--shots", type=int, default=3, help="shots per replica")
    pulls.add_argument("--seed", type=int, default=10, help="seed of the first replica")
    return top


def pull_main(args) -> int:
    """Run the pull test and print its summaries as JSON."""
    import dataclasses
    import json

    from nbfunc.ensemble.pulls import pull_test

    if args.replicas < 1 or args.shots < 1:
        print(f"{PROG}: error: --replicas and --shots must be >= 1, got {args.replicas}, "
              f"{args.shots}", file=sys.stderr)
        return 2
    out = pull_test(args.replicas, args.seed, n_shots=args.shots)
    print(json.dumps({k: dataclasses.asdict(v) for k, v in out.items()}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = parser().parse_args(argv)
    if args.command == "pulls":
        return pull_main(args)
    if args.command == "generate":
        from nbfunc.dataset import main as generate

        return generate([args.spec, args.folder, "--device", args.device])
    try:
        comm = init_from_env(args.device, args.timeout)
    except (ValueError, RuntimeError) as err:
        print(f"{PROG}: error: {one_line(err, 250, named=False)}", file=sys.stderr)
        return 2
    try:
        out = run_refinement(args.spec, comm)
        if out is not None:
            state = "converged" if out["converged"] else "not converged"
            print(f"{PROG}: {len(out['shots'])} shots, {len(out['F'])} amplitudes, "
                  f"{out['iterations']} steps, {state}: {out['message']}")
        return 0
    except ShotError as err:
        if comm.rank == 0:
            print(f"{PROG}: error: {one_line(err, 250, named=False)}", file=sys.stderr)
        return 1
    except ValueError as err:
        where = f"(rank {comm.rank}) " if comm.world > 1 else ""
        print(f"{PROG}: error: {where}{one_line(err, 250, named=False)}", file=sys.stderr)
        return 2
    finally:
        finish(comm)


if __name__ == "__main__":
    sys.exit(main())
