"""The pull-test tool: summaries, and one tiny replica."""
import math

import pytest
import torch

from nbfunc.ensemble.pulls import replica_pulls, summarise


def test_summary_of_known_pulls():
    s = summarise(torch.tensor([-2.0, 0.0, 2.0, 4.0]))
    assert (s.count, s.mean, s.largest) == (4, 1.0, 4.0)
    assert s.std == pytest.approx(math.sqrt(20 / 3))
    assert math.isnan(summarise(torch.zeros(0)).mean)


def test_one_replica_gives_finite_pulls():
    f_pulls, misset = replica_pulls(3, n_shots=2, pixels=8, tol=1e-2)
    assert misset.shape == (6,) and len(f_pulls) > 10
    assert bool(torch.isfinite(f_pulls).all()) and bool(torch.isfinite(misset).all())
    assert float(f_pulls.abs().max()) < 6 and float(misset.abs().max()) < 6
