"""`nbfunc.likelihood.POSITIVE_LEAVES`: the leaves a fit keeps > 0 (in log space)."""
from __future__ import annotations

import pydantic
import pytest
import torch

from _uncertainty_support import TINY, tree
from nbfunc.likelihood import POSITIVE_LEAVES, poisson_problem


def test_every_positive_leaf_is_a_leaf_of_a_tree():
    """No misspelt path: each one is a leaf of a grid tree or of a spectrum's source list."""
    paths = set(tree().leaf_paths()) | set(tree(TINY + " -bandwidth 1").leaf_paths())
    assert POSITIVE_LEAVES - paths == set()


def test_diffuse_gamma_is_positive_and_sigma_and_b_are_not():
    p = tree(TINY + " -diffuse_gamma 3 4 2.5 -diffuse_sigma 0 0.4 0.5 -bfactor 0")
    problem = poisson_problem(p, torch.zeros(6, 6, dtype=torch.float64),
                              ["crystal.diffuse_gamma", "crystal.diffuse_sigma", "crystal.B"])
    assert problem.positive.tolist() == [True] * 3 + [False] * 4
    assert problem.names[0] == "crystal.diffuse_gamma[0]" and problem.names[-1] == "crystal.B"


def test_the_tree_refuses_a_gamma_a_log_space_fit_could_not_start_from():
    p = tree(TINY + " -diffuse")
    values = {k: getattr(p.crystal, k) for k in type(p.crystal).model_fields}
    values["diffuse_gamma"] = torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    with pytest.raises(pydantic.ValidationError, match="diffuse_gamma"):
        type(p.crystal).model_validate(values)
