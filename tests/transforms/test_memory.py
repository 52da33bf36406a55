"""Memory of transforms of chunked renders is set by the chunk, not by the image.

Measured in a fresh subprocess (peak resident memory above the memory after the imports):
``torch.func.grad`` and ``torch.func.hessian`` of an eager render of 1.8 M evaluations
(triclinic, misset, 10 mosaic domains x 5 phi steps x 9 sources on 64x64 pixels). Keeping
the whole graph of the eager kernel, as a transform does without `per_call_under_transforms`,
peaked at 9.4 GB (grad) and 5.7 GB (Hessian of two leaves) above that; one chunk of 2^16
evaluations needs some hundred MB.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nbfunc.compile import COMPILE_DISABLED

_MEASURE = """
import resource, sys, torch, nbfunc
from nbfunc.cli.derive import params_from_args
flags = ("-cell 70 80 90 75 85 95 -misset 10 -20 30 -default_F 100 -lambda 1 -distance 100 -N 5 "
         "-detpixels 64 -pixel 0.4 -mosaic 0.5 -mosaic_dom 10 -phi 0 -osc 1 -phisteps 5 "
         "-divergence 1 -divsteps 3 -square_div -oversample 1")
p = params_from_args(flags.split())
observed = (nbfunc.simulate_pixels(p) * 1.1 + 1.0).detach()
names = ["crystal.cell_a", "detector.distance"]
def nll(q):
    mu = nbfunc.simulate_pixels(q) + 1.0
    return (mu - observed * torch.log(mu)).sum()
def nll_of(*values):
    return nll(nbfunc.replace_leaves(p, dict(zip(names, values))))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "grad":
    out = torch.func.grad(nll)(p).crystal.cell_a
else:
    out = torch.func.hessian(nll_of, argnums=(0, 1))(p.crystal.cell_a, p.detector.distance)[0][0]
print(bool(torch.isfinite(out).all()), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""

LIMIT_MB = 1500
"""Peak growth allowed: the chunk's per-evaluation arrays (2^16 evaluations x a few hundred
float64 values for the Hessian's batched VJP) with room for the allocator, far below the
gigabytes of a whole-image graph."""


@pytest.mark.skipif(COMPILE_DISABLED, reason="run once, by the test command's compiled run: the "
                    "measuring subprocess always sets NANOBRAGG_DISABLE_COMPILE=1, so both runs "
                    "measure the same thing (~17 s)")
@pytest.mark.parametrize("transform", ["grad", "hessian"])
def test_transform_memory_is_set_by_the_chunk(transform):
    env = {**os.environ, "NANOBRAGG_DISABLE_COMPILE": "1"}
    out = subprocess.run([sys.executable, "-c", _MEASURE, transform], capture_output=True,
                         text=True, env=env, check=True, timeout=600)
    finite, grown_mb = out.stdout.split()
    assert finite == "True"
    assert int(grown_mb) < LIMIT_MB, f"{transform}: peak grew by {grown_mb} MB"
