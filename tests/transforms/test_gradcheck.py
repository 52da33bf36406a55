"""``torch.autograd.gradcheck`` and ``gradgradcheck`` of `nbfunc.simulate` for every leaf.

Each leaf is checked in the first configuration of ``CONFIGS`` where it changes the image,
on a 3 x 4 pixel ROI of the 6 x 6 detector. The checked function of a dimensionless offset
``u`` is ``simulate(p with leaf = x0 + |x0| u) / max(image)``, so that gradcheck's absolute
step and tolerances mean the same for a fluence of 1e29 photons/m^2 and a misset of 10 deg.
Everything runs with torch.compile forced eager (the ``eager`` fixture), so that no
configuration waits for a compile. In the configuration of the pixel partials (square or
Gaussian spots, ``default_F``, flat detector) the first derivatives then come from
`nbfunc.render.PartialsRules` and the second ones from the renderer's own code
(`nbfunc.derived`).
"""
from __future__ import annotations

import pytest
import torch

import nbfunc
from _transforms_support import CONFIGS
from nbfunc.compile import COMPILE_DISABLED
from nbfunc.tree import get_leaf

ROI = (1, 4, 2, 4)
"""fast 1..4, slow 2..4 (inclusive): 12 rendered pixels."""

LEAF_CONFIG = {}
for _name, (_, _paths) in CONFIGS.items():
    for _path in _paths:
        LEAF_CONFIG.setdefault(_path, _name)


def unit_offset_function(p: nbfunc.Params, path: str):
    """(f(u), u0): the ROI image as a function of a dimensionless offset of one leaf."""
    p = p.model_copy(update={"sampling": p.sampling.model_copy(update={"roi": ROI})})
    x0 = get_leaf(p, path)
    unit = torch.clamp(x0.abs(), min=1.0)
    x1, x2, y1, y2 = ROI
    with torch.no_grad():
        norm = nbfunc.simulate(p).abs().max()

    def f(u):
        image = nbfunc.simulate(nbfunc.replace_leaves(p, {path: x0 + unit * u}))
        return image[y1:y2 + 1, x1:x2 + 1] / norm

    return f, torch.zeros_like(x0, requires_grad=True)


@pytest.mark.skipif(COMPILE_DISABLED, reason="run once, by the test command's compiled run: "
                    "its renders below nbfunc.compile.COMPILE_AFTER (tests/conftest.py), forced "
                    "eager besides, run the same eager kernel as NANOBRAGG_DISABLE_COMPILE=1 (~20 s)")
@pytest.mark.parametrize("path", list(LEAF_CONFIG))
def test_gradcheck_and_gradgradcheck(path, configs, eager):
    f, u0 = unit_offset_function(configs[LEAF_CONFIG[path]], path)
    assert torch.autograd.gradcheck(f, (u0,), eps=1e-6, atol=1e-6, rtol=1e-4)
    assert torch.autograd.gradgradcheck(f, (u0,), eps=1e-6, atol=1e-5, rtol=1e-3)
