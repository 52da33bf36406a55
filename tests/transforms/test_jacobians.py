"""Jacobians of `nbfunc.simulate` with respect to the parameter tree.

``jacfwd(simulate)(p)`` and ``jacrev(simulate)(p)`` return a tree shaped like ``p`` whose
block for a leaf has shape ``image.shape + leaf.shape``. Both must agree with each other for
every leaf, and with central differences for the leaves that each configuration exercises;
across ``CONFIGS`` every leaf of both source kinds is checked against finite differences.
"""
from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import nbfunc
from _transforms_support import (CONFIGS, assert_close_scaled, central_difference, eager_mode,
                                 leaves_dict, magnitude)


@pytest.fixture(scope="module")
def jacobians(configs):
    """``{config: (image, jacfwd tree, jacrev tree)}``, computed once per configuration."""
    out = {}
    with eager_mode():
        for name, p in configs.items():
            out[name] = (nbfunc.simulate(p), torch.func.jacfwd(nbfunc.simulate)(p),
                         torch.func.jacrev(nbfunc.simulate)(p))
    return out


def test_every_leaf_is_covered(configs):
    covered = {path for _, paths in CONFIGS.values() for path in paths}
    every = set(configs["triclinic"].leaf_paths()) | set(configs["sourcefile"].leaf_paths())
    assert every - covered == set()
    assert covered - every == set()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jacobian_tree_has_shape_of_params(name, configs, jacobians):
    p = configs[name]
    image, fwd, rev = jacobians[name]
    spec = pytree.tree_structure(p)
    assert pytree.tree_structure(fwd) == spec
    assert pytree.tree_structure(rev) == spec
    assert isinstance(fwd, nbfunc.Params) and isinstance(rev, nbfunc.Params)
    for path, leaf in leaves_dict(p).items():
        assert leaves_dict(fwd)[path].shape == image.shape + leaf.shape, path
        assert leaves_dict(rev)[path].shape == image.shape + leaf.shape, path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jacfwd_equals_jacrev(name, configs, jacobians):
    image, fwd, rev = jacobians[name]
    leaves = leaves_dict(configs[name])
    for path, block in leaves_dict(fwd).items():
        other = leaves_dict(rev)[path]
        assert torch.isfinite(block).all() and torch.isfinite(other).all(), path
        # rounding noise of a block that is zero in exact arithmetic stays below atol
        atol = 1e-13 * magnitude(image) / max(magnitude(leaves[path]), 1.0)
        assert_close_scaled(other, block, 1e-9, f"{name}: {path}", atol=atol)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jacobian_equals_central_differences(name, configs, jacobians, eager):
    p = configs[name]
    _, fwd, _ = jacobians[name]
    for path in CONFIGS[name][1]:
        block = leaves_dict(fwd)[path]
        assert block.abs().max() > 0, f"{path} does not change the image in configuration {name}"
        numeric = central_difference(nbfunc.simulate, p, path)
        assert_close_scaled(block, numeric, 1e-5, f"{name}: {path}")


def test_jacobian_of_selected_leaves(tiny, eager):
    """A function of a dict of leaves: the Jacobian is a dict of blocks."""
    chosen = {"detector.distance": tiny.detector.distance, "crystal.misset": tiny.crystal.misset}

    def render(leaves):
        return nbfunc.simulate(nbfunc.replace_leaves(tiny, leaves))

    jac = torch.func.jacrev(render)(chosen)
    full = torch.func.jacfwd(nbfunc.simulate)(tiny)
    assert set(jac) == set(chosen)
    assert jac["crystal.misset"].shape == (6, 6, 3)
    assert_close_scaled(jac["detector.distance"], full.detector.distance, 1e-9, "distance")
    assert_close_scaled(jac["crystal.misset"], full.crystal.misset, 1e-9, "misset")
    numeric = central_difference(nbfunc.simulate, tiny, "crystal.misset")
    assert_close_scaled(jac["crystal.misset"], numeric, 1e-5, "misset")
