"""``torch.func.vmap`` over ensembles of trees built with `nbfunc.stack`."""
from __future__ import annotations

import pytest
import torch

import nbfunc
from _transforms_support import assert_close_scaled, leaves_dict

f64 = lambda x: torch.tensor(x, dtype=torch.float64)


def ensemble(p):
    """Three members that differ in cell, distance, wavelength and misset."""
    changes = [
        {},
        {"crystal.cell_a": f64(52.0), "crystal.cell_gamma": f64(98.0), "detector.distance": f64(55.0),
         "beam.wavelength": f64(0.98), "crystal.misset": f64([12.0, -18.0, 33.0])},
        {"crystal.cell_b": f64(57.0), "detector.distance": f64(47.0), "beam.wavelength": f64(1.03),
         "crystal.misset": f64([5.0, -25.0, 28.0]), "detector.beam_center_f": f64(1.2)},
    ]
    return [nbfunc.replace_leaves(p, c) for c in changes]


def test_vmap_equals_loop(tiny):
    members = ensemble(tiny)
    batched = torch.func.vmap(nbfunc.simulate)(nbfunc.stack(members))
    looped = torch.stack([nbfunc.simulate(m) for m in members])
    assert batched.shape == (3,) + looped.shape[1:]
    assert not torch.equal(looped[0], looped[1])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12 * float(looped.abs().max()))


@pytest.mark.parametrize("name", ["mosaic_phi", "divergence_dispersion", "hkl", "sourcefile"])
def test_vmap_equals_loop_in_other_configurations(name, configs, eager):
    members = ensemble(configs[name])
    batched = torch.func.vmap(nbfunc.simulate)(nbfunc.stack(members))
    looped = torch.stack([nbfunc.simulate(m) for m in members])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12 * float(looped.abs().max()))


def test_vmap_over_one_leaf(tiny, eager):
    """Batch only the leaves passed through ``in_dims``: a distance scan."""
    distances = f64([45.0, 50.0, 55.0, 60.0])

    def at_distance(d):
        return nbfunc.simulate(nbfunc.replace_leaves(tiny, {"detector.distance": d}))

    batched = torch.func.vmap(at_distance)(distances)
    looped = torch.stack([at_distance(d) for d in distances])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12 * float(looped.abs().max()))


def test_vmap_of_jacobian_equals_loop(tiny, eager):
    members = ensemble(tiny)
    batched = torch.func.vmap(torch.func.jacfwd(nbfunc.simulate))(nbfunc.stack(members))
    for i, member in enumerate(members):
        single = torch.func.jacfwd(nbfunc.simulate)(member)
        for path, block in leaves_dict(single).items():
            assert_close_scaled(leaves_dict(batched)[path][i], block, 1e-10, path,
                                atol=1e-300)


def test_vmap_output_is_independent_per_member(tiny, eager):
    """Gradients of member i's image do not reach member j's leaves."""
    stacked = nbfunc.stack(ensemble(tiny))

    def first_total(tree):
        return torch.func.vmap(nbfunc.simulate)(tree)[0].sum()

    grad = torch.func.grad(first_total)(stacked)
    assert grad.detector.distance[0] != 0
    assert torch.all(grad.detector.distance[1:] == 0)
    assert torch.all(grad.crystal.misset[1:] == 0)
