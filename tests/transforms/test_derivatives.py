"""Every leaf's derivative against converged central differences, near Bragg peaks.

The trees here put pixels close to reflections of orders ``k != 0`` (a misset triclinic cell
with small N, mosaic domains and phi steps), where the grating's derivative in N has a part
that grows like ``k / (h - k)`` (see `nbfunc.lattice.grating`). ``torch.func.grad`` of a
weighted sum of the image is compared leaf by leaf, element by element, with central
differences of the same render.
"""
from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

import nbfunc
from _transforms_support import central_difference, make_params

NEAR_PEAK = ("-cell 52 61 70 88 93 97 -default_F 50 -N 4 -lambda 1.3 -distance 90 -detpixels 20 "
             "-pixel 0.4 -misset 5 -3 12 -mosaic 0.3 -mosaic_dom 3 -phi 1 -osc 2 -phisteps 2 "
             "-oversample 1 -water 0.2")
"""The square-shape case in which jacfwd/jacrev in Nb and Nc once disagreed with central
differences by 4 % and 100 %, with a thin water layer (at a water size of 0 the derivative
of its ``size^3`` background is 0 and a central difference sees only its truncation error)."""

VARIANTS = {
    "square": "",
    "round": "-round_xtal -fudge 2",
    "gauss": "-gauss_xtal -fudge 2",
    "tophat": "-tophat_spots",
    "sources": "-dispersion 4 -dispsteps 2 -hdivrange 0.5 -hdivsteps 2",
    "thickness": "-detector_thick 80 -detector_abs 300 -thicksteps 2",
}

SKIP = {"tophat": {"crystal.fudge", "crystal.Na", "crystal.Nb", "crystal.Nc"}}
"""Leaves whose derivative is a sum of delta functions at the flat-top spot's edge (zero
almost everywhere): central differences see an edge only when a step crosses one."""


def _weights(shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_leaf_matches_central_differences(name, eager):
    p = make_params(VARIANTS[name], base=NEAR_PEAK)
    w = _weights((p.detector.spixels, p.detector.fpixels))

    def loss(q):
        return (w * nbfunc.simulate(q)).sum()

    grads = dict(zip(nbfunc.leaf_paths(p), pytree.tree_leaves(torch.func.grad(loss)(p))))
    scale = float(loss(p))
    checked = 0
    for path, leaf in zip(nbfunc.leaf_paths(p), pytree.tree_leaves(p)):
        if path in SKIP.get(name, ()) or leaf.numel() == 0:
            continue
        numeric = central_difference(loss, p, path)
        got = grads[path]
        assert torch.isfinite(got).all(), f"{name}: {path} not finite"
        # rounding of the two renders divided by the step (1e-6 relative) is ~1e-10 of the
        # loss per unit of the leaf; the relative 1e-5 is the step's truncation error
        atol = 1e-8 * scale / max(float(leaf.abs().max()), 1.0)
        err = (got - numeric).abs()
        bound = 1e-5 * numeric.abs() + atol
        assert bool((err <= bound).all()), (
            f"{name}: {path}: got {got.tolist()}, central differences {numeric.tolist()}")
        checked += 1
    assert checked >= 20
