"""Multi-shot refinement: per-shot trees, shared structure factors, torch.distributed.

See docs/ensemble.md. Modules: `symmetry` (space groups, equivalent reflections),
`asu` (the asymmetric unit and its map onto each shot's hkl grid), `model` (shots, the total
Poisson likelihood and its gradients), `distributed` (ranks, sums, failures), `scoring`
(joint Fisher scoring, errors with shot parameters marginalised), `spec` (the JSON spec and
the run on every rank), `synthetic` (small simulated ensembles), `pulls` (the pull test).
"""
from nbfunc.ensemble.asu import AsuMap, asu_map, fhkl_grid
from nbfunc.ensemble.distributed import LOCAL, Comm, ShotError, init_from_env, shard
from nbfunc.ensemble.model import (Ensemble, Shot, State, make_ensemble, make_shot, shot_tree,
                                   shot_value_and_grad, stacked_value_and_grad)
from nbfunc.ensemble.scoring import Errors, Refined, errors, refine
from nbfunc.ensemble.spec import RefineSpec, run_refinement
from nbfunc.ensemble.symmetry import space_group

__all__ = ["AsuMap", "asu_map", "fhkl_grid", "LOCAL", "Comm", "ShotError", "init_from_env",
           "shard", "Ensemble", "Shot", "State", "make_ensemble", "make_shot", "shot_tree",
           "shot_value_and_grad", "stacked_value_and_grad", "Errors", "Refined", "errors",
           "refine", "RefineSpec", "run_refinement", "space_group"]
