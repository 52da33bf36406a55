"""The asymmetric unit and its map onto a shot's hkl grid."""
import numpy as np
import pytest
import torch

from nbfunc.ensemble.asu import asu_map, asu_values, fhkl_grid
from nbfunc.ensemble.symmetry import equivalents, resolution, systematically_absent


def grid_hkl(amap):
    axes = [np.arange(o, o + n) for o, n in zip(amap.origin, amap.index.shape)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1)


class TestAsuMap:
    def test_every_grid_point_takes_its_orbit_value(self):
        amap = asu_map("P 43 21 2", (20, 20, 30, 90, 90, 90), 4.0)
        f = torch.arange(1, amap.n_asu + 1, dtype=torch.float64)
        grid = fhkl_grid(f, amap.index).numpy()
        hkl = grid_hkl(amap).reshape(-1, 3)
        flat = grid.reshape(-1)
        d = resolution(hkl, amap.cell)
        zero = (d < amap.dmin) | systematically_absent(hkl, amap.group) | (np.abs(hkl).sum(1) == 0)
        assert (flat[zero] == 0).all() and (flat[~zero] > 0).all()
        # every Laue equivalent inside the grid (Friedel mates included) has the same value
        eq = equivalents(hkl[~zero], amap.group) - np.asarray(amap.origin)
        values = grid[tuple(eq.reshape(-1, 3).T)].reshape(eq.shape[:2])
        assert (values == flat[~zero][:, None]).all()

    def test_p1_holds_half_the_reflections(self):
        amap = asu_map("P 1", (10, 12, 14, 80, 95, 100), 3.0)
        hkl = grid_hkl(amap).reshape(-1, 3)
        inside = (resolution(hkl, amap.cell) >= 3.0).sum() - 1  # without (0, 0, 0)
        assert amap.n_asu * 2 == inside

    def test_box_covers_dmin(self):
        amap = asu_map("P 1", (10, 12, 14, 70, 100, 110), 2.5)
        big = np.stack(np.meshgrid(*[np.arange(-12, 13)] * 3, indexing="ij"), -1).reshape(-1, 3)
        near = big[resolution(big, amap.cell) >= 2.5]
        assert (np.abs(near) <= -np.asarray(amap.origin)).all()

    def test_gradient_gathers_mates(self):
        amap = asu_map("P 21 21 21", (20, 25, 30, 90, 90, 90), 5.0)
        f = torch.full((amap.n_asu,), 10.0, dtype=torch.float64)
        weights = torch.rand(tuple(amap.index.shape), dtype=torch.float64)
        grad = torch.func.grad(lambda x: (fhkl_grid(x, amap.index) * weights).sum())(f)
        expected = torch.zeros(amap.n_asu + 1, dtype=torch.float64).index_add(
            0, amap.index.reshape(-1), weights.reshape(-1))[:-1]
        torch.testing.assert_close(grad, expected)

    def test_values_from_a_grid_use_any_mate(self):
        amap = asu_map("P 21 21 21", (20, 25, 30, 90, 90, 90), 6.0)
        f = torch.arange(1, amap.n_asu + 1, dtype=torch.float64)
        full = fhkl_grid(f, amap.index).numpy()
        # keep only the h <= 0 half, as a file listing other mates would
        half = full.copy()
        half[-amap.origin[0] + 1:] = np.nan
        torch.testing.assert_close(asu_values(amap, half, amap.origin, -1.0), f)

    @pytest.mark.parametrize("dmin", [0.0, -1.0, float("nan")])
    def test_bad_dmin(self, dmin):
        with pytest.raises(ValueError, match="dmin"):
            asu_map("P 1", (10, 10, 10, 90, 90, 90), dmin)

    def test_too_many_reflections(self):
        with pytest.raises(ValueError, match="give a larger dmin"):
            asu_map("P 1", (100, 100, 100, 90, 90, 90), 1.0)
