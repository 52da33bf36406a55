"""Free elements, tiles and per-pixel likelihood terms."""
from __future__ import annotations

import pytest
import torch

from _uncertainty_support import render
from nbfunc.likelihood import (linearize, pack, parse_free, pixel_deviance, pixel_nll,
                               poisson_problem, row_bands, unpacker)

f64 = lambda x: torch.tensor(x, dtype=torch.float64)


def test_parse_free_expands_leaves_into_elements():
    leaves = {"m": f64([1.0, 2.0, 3.0]), "d": f64(4.0)}
    assert parse_free(["m", "d"], leaves) == [("m", 0), ("m", 1), ("m", 2), ("d", None)]
    assert parse_free(["m[2]", "d[0]"], leaves) == [("m", 2), ("d", None)]


def test_pack_gathers_the_free_elements_and_nothing_when_none_is_free():
    leaves = {"m": f64([1.0, 2.0, 3.0]), "d": f64(7.0)}
    assert torch.equal(pack(leaves, [("m", 2), ("d", None)]), f64([3.0, 7.0]))
    empty = pack(leaves, [])
    assert empty.shape == (0,) and empty.dtype == torch.float64


def test_unpacker_replaces_only_the_free_elements_and_is_linear():
    leaves = {"m": f64([1.0, 2.0, 3.0]), "d": f64(4.0)}
    unpack = unpacker(leaves, [("m", 1), ("d", None)])
    out = unpack(f64([20.0, 40.0]))
    torch.testing.assert_close(out["m"], f64([1.0, 20.0, 3.0]))
    assert out["d"].shape == () and float(out["d"]) == 40.0
    jac = torch.func.jacfwd(lambda t: unpack(t)["m"])(f64([20.0, 40.0]))
    torch.testing.assert_close(jac, f64([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]))
    batched = torch.func.vmap(lambda t: unpack(t)["m"])(f64([[5.0, 0.0], [6.0, 0.0]]))
    torch.testing.assert_close(batched, f64([[1.0, 5.0, 3.0], [1.0, 6.0, 3.0]]))


def test_row_bands_cover_the_used_rows_once():
    include = torch.ones(10, 4, dtype=torch.bool)
    include[4] = False
    bands = row_bands(include, 12)
    assert bands == [(0, 2), (3, 6), (7, 9)]
    with pytest.raises(ValueError, match="tile_pixels"):
        row_bands(include, 0)


def test_deviance_and_nll_differ_by_a_function_of_the_counts():
    counts = f64([0.0, 1.0, 7.0, 30.0])
    include = torch.tensor([True, True, True, True])
    a, b = f64([0.5, 2.0, 6.0, 33.0]), f64([1.5, 0.7, 9.0, 28.0])
    diff_a = pixel_nll(a, counts, include) - pixel_deviance(a, counts, include)
    diff_b = pixel_nll(b, counts, include) - pixel_deviance(b, counts, include)
    torch.testing.assert_close(diff_a, diff_b)
    assert float(pixel_deviance(counts + (counts == 0), counts, include)[1:].abs().max()) == 0.0
    left_out = pixel_nll(a, counts, torch.tensor([False, True, True, True]))
    assert float(left_out[0]) == 0.0
    assert float(pixel_nll(f64([-1.0]), f64([3.0]), torch.tensor([True]))[0]) == 0.0


def test_tiles_render_only_their_pixels(tiny, eager):
    mu = render(tiny)
    problem = poisson_problem(tiny, mu, ["detector.distance"], tile_pixels=12)
    assert len(problem.tiles) == 3
    values = torch.cat([t.model(problem.start) for t in problem.tiles])
    torch.testing.assert_close(values, mu.reshape(-1), rtol=1e-12, atol=0)
    jac, value = linearize(problem.tiles[0].model, problem.start)
    assert jac.shape == (12, 1) and value.shape == (12,)
