"""The explicit phi carryover: `initial_carry`, `simulate_with_carry` and tiled renders.

nanoBragg keeps the previously rotated cell at a phi step of exactly 0; the first step of
an evaluation then uses the last orientation of the evaluation before it, in raster order.
The flags are those of golden case pu12 (phi sweep starting exactly at 0) on 8 x 8 pixels.
"""
from __future__ import annotations

import inspect

import pytest
import torch
import torch.utils._pytree as pytree

import nbfunc
from nbfunc import PhiCarry, initial_carry, simulate, simulate_with_carry
from _transforms_support import assert_close_scaled, central_difference, make_params

PU12 = ("-mosflm -cell 56 56 56 90 90 90 -default_F 100 -N 6 -lambda 1.0 -distance 95 "
        "-misset -6 9 14 -mosaic 0.4 -mosaic_dom 8 -mosaic_seed 99 -osc 6 -phisteps 3 "
        "-detpixels 8 -pixel 2.4 -oversample 1")


@pytest.fixture(scope="module")
def carried():
    """The pu12 tree with phi starting exactly at 0."""
    return make_params("-phi 0", base=PU12)


@pytest.fixture(scope="module")
def not_carried():
    """The same sweep starting at 1e-20 deg: no step is exactly 0."""
    return make_params("-phi 1e-20", base=PU12)


def with_roi(p: nbfunc.Params, roi) -> nbfunc.Params:
    return p.model_copy(update={"sampling": p.sampling.model_copy(update={"roi": roi})})


def close(a, b, rtol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


def test_carry_changes_the_image_when_phi_starts_at_zero(carried, eager):
    image, carry = simulate_with_carry(carried, initial_carry(carried))
    plain = simulate(carried)
    assert isinstance(carry, PhiCarry) and carry.orientation.shape == (3, 3)
    assert (image - plain).abs().max() > 1e-3 * plain.abs().max()


def test_carry_has_no_effect_without_a_zero_phi_step(not_carried, eager):
    image, _ = simulate_with_carry(not_carried, initial_carry(not_carried))
    close(image, simulate(not_carried))


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_tiles_in_raster_order_equal_one_render(carried, rows, eager):
    """Bands of ``rows`` rows, each an ROI, threading the carry from band to band."""
    full, full_carry = simulate_with_carry(carried, initial_carry(carried))
    fpixels, spixels = carried.detector.fpixels, carried.detector.spixels
    carry = initial_carry(carried)
    covered = torch.zeros(spixels, fpixels, dtype=torch.bool)
    for top in range(0, spixels, rows):
        bottom = min(top + rows, spixels) - 1
        tile, carry = simulate_with_carry(with_roi(carried, (0, fpixels - 1, top, bottom)), carry)
        assert torch.all(tile[:top] == 0) and torch.all(tile[bottom + 1:] == 0)
        close(tile[top:bottom + 1], full[top:bottom + 1])
        covered[top:bottom + 1] = True
    assert covered.all()
    close(carry.orientation, full_carry.orientation)


def test_starting_a_tile_from_the_initial_carry_is_wrong(carried, eager):
    """Without threading, the first pixel of a later tile sees the unrotated cell."""
    full, _ = simulate_with_carry(carried, initial_carry(carried))
    tile, _ = simulate_with_carry(with_roi(carried, (0, 7, 4, 7)), initial_carry(carried))
    assert not torch.allclose(tile[4, 0], full[4, 0], rtol=1e-6)
    close(tile[4, 1:], full[4, 1:])


def test_image_depends_on_the_carry_only_at_the_first_evaluation(carried, eager):
    start = initial_carry(carried)
    jac = torch.func.jacrev(lambda c: simulate_with_carry(carried, c)[0])(start)
    assert isinstance(jac, PhiCarry)
    block = jac.orientation
    assert block.shape == (8, 8, 3, 3)
    assert block[0, 0].abs().max() > 0
    rest = block.reshape(64, 9)[1:]
    assert torch.all(rest == 0)


def test_carry_out_is_differentiable_in_the_leaves(carried, eager):
    def carry_out(p):
        return simulate_with_carry(p, initial_carry(p))[1].orientation

    jac = torch.func.jacfwd(carry_out)(carried)
    for path in ("crystal.cell_a", "crystal.misset", "crystal.phi_step"):
        block = nbfunc.tree.get_leaf(jac, path)
        assert block.abs().max() > 0, path
        assert_close_scaled(block, central_difference(carry_out, carried, path), 1e-6, path)
    assert torch.all(jac.detector.distance == 0)


def test_image_gradient_flows_through_the_carry(carried, eager):
    """d image / d cell through both the current cell and the carried orientation."""
    def first_pixel(p, carry):
        return simulate_with_carry(p, carry)[0][0, 0]

    start = initial_carry(carried)
    by_leaves = torch.func.grad(first_pixel)(carried, start)
    by_carry = torch.func.grad(first_pixel, argnums=1)(carried, start)
    assert by_carry.orientation.abs().max() > 0
    numeric = central_difference(lambda p: first_pixel(p, initial_carry(p)), carried, "crystal.cell_a")
    total = torch.func.grad(lambda p: first_pixel(p, initial_carry(p)))(carried)
    assert_close_scaled(total.crystal.cell_a, numeric, 1e-5, "cell_a")
    assert by_leaves.crystal.cell_a != total.crystal.cell_a   # the carry path contributes


def test_carry_is_a_pytree(carried, eager):
    carry = initial_carry(carried)
    leaves, spec = pytree.tree_flatten(carry)
    assert len(leaves) == 1 and leaves[0] is carry.orientation
    assert pytree.tree_unflatten(leaves, spec) == carry
    stacked = pytree.tree_map(lambda t: torch.stack([t, t.flip(0)]), carry)
    images = torch.func.vmap(lambda c: simulate_with_carry(carried, c)[0])(stacked)
    close(images[0], simulate_with_carry(carried, carry)[0])
    close(images[1], simulate_with_carry(carried, PhiCarry(carry.orientation.flip(0)))[0])


def test_simulate_never_depends_on_a_carry(carried, eager):
    assert list(inspect.signature(simulate).parameters) == ["p"]
    before = simulate(carried)
    simulate_with_carry(carried, PhiCarry(torch.randn(3, 3, dtype=torch.float64) * 1e-9))
    assert torch.equal(simulate(carried), before)
    for rows in ((0, 7, 0, 3), (0, 7, 4, 7)):
        tile = simulate(with_roi(carried, rows))
        x0, x1, y0, y1 = rows
        close(tile[y0:y1 + 1], before[y0:y1 + 1])


def test_initial_carry_is_the_unrotated_cell(carried):
    carry = initial_carry(carried)
    real, _ = nbfunc.crystal.oriented_cell(carried.crystal)
    assert torch.equal(carry.orientation, real)
    lengths = torch.linalg.vector_norm(carry.orientation, dim=-1)
    torch.testing.assert_close(lengths, torch.full((3,), 56e-10, dtype=torch.float64))
