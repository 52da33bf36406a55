import math

import numpy as np
import pytest
import torch

from nbfunc.crng import mosaic_umats
from nbfunc.crystal import cell_volume, mosaic_draws, mosaic_rotations, oriented_cell, reciprocal_cell
from nbfunc.params import Crystal

D = torch.float64


def triclinic(**kw):
    return Crystal(cell_a=63, cell_b=57, cell_c=51, cell_alpha=78, cell_beta=88, cell_gamma=99, **kw)


def test_real_and_reciprocal_are_dual_up_to_the_c_construction():
    # nanoBragg's default-frame reciprocal cell is not exactly consistent with the cell angles
    # (its stdout prints 78.0213 88.0037 99.0023 for this cell): duality holds to 1e-4.
    real, recip = oriented_cell(triclinic(misset=[10.0, -20.0, 30.0]))
    product = (real / 1e-10) @ recip.T
    assert torch.allclose(product, torch.eye(3, dtype=D), atol=2e-4)
    assert torch.allclose(product - torch.diag(product.diagonal()), torch.zeros(3, 3, dtype=D), atol=1e-14)


def test_cell_constants_are_kept():
    real, _ = oriented_cell(triclinic(misset=[5.0, 6.0, 7.0]))
    a, b, c = (real / 1e-10).unbind(0)
    assert torch.allclose(torch.stack([a.norm(), b.norm(), c.norm()]), torch.tensor([63.0, 57.0, 51.0], dtype=D))
    angle = lambda u, v: torch.rad2deg(torch.acos(u @ v / u.norm() / v.norm()))
    # the C program's printed cell for these constants
    assert torch.allclose(torch.stack([angle(b, c), angle(a, c), angle(a, b)]),
                          torch.tensor([78.0213, 88.0037, 99.0023], dtype=D), atol=1e-4)


def test_default_frame_has_a_star_along_x():
    r = reciprocal_cell(*(torch.tensor(v, dtype=D) for v in (63, 57, 51)),
                        *(torch.deg2rad(torch.tensor(v, dtype=D)) for v in (78, 88, 99)))
    assert r[0, 1] == 0 and r[0, 2] == 0 and r[1, 2] == 0


def test_volume_of_cube():
    v = cell_volume(*(torch.tensor(50.0, dtype=D),) * 3, *(torch.tensor(math.pi / 2, dtype=D),) * 3)
    assert torch.allclose(v, torch.tensor(125000.0, dtype=D))


def test_misset_rotates_without_changing_volume():
    r0, _ = oriented_cell(triclinic())
    r1, _ = oriented_cell(triclinic(misset=[12.0, 7.5, 21.0]))
    assert torch.allclose(torch.linalg.det(r0), torch.linalg.det(r1))
    assert not torch.allclose(r0 / 1e-10, r1 / 1e-10)


def test_mosaic_matches_c_generator():
    spread = 0.4
    crystal = Crystal(cell_a=50, cell_b=50, cell_c=50, mosaic_spread=spread, mosaic_domains=8, mosaic_seed=-99)
    ours = mosaic_rotations(crystal).numpy()
    c_umats = mosaic_umats(math.radians(spread), 8, -99)
    assert np.abs(ours - c_umats).max() < 1e-9  # C rounds the angle to float32
    assert np.allclose(ours[0], np.eye(3))


def test_mosaic_draws_are_deterministic():
    (axes, scales), (again, scales_again) = mosaic_draws(5, -12345678), mosaic_draws(5, -12345678)
    assert torch.equal(axes, again) and torch.equal(scales, scales_again)
    assert not torch.equal(mosaic_draws(5, -1)[0], mosaic_draws(5, -2)[0])


def mosaic_crystal(**kw):
    return Crystal(cell_a=50, cell_b=50, cell_c=50, mosaic_spread=0.5, mosaic_domains=6,
                   mosaic_seed=-7, **kw)


class TestMosaicDrawsInTheTree:
    def test_draws_are_static_float64_arrays_not_leaves(self):
        crystal = mosaic_crystal()
        assert crystal.mosaic_axes.shape == (6, 3) and crystal.mosaic_scales.shape == (6,)
        assert crystal.mosaic_axes.dtype == torch.float64 and not crystal.mosaic_axes.requires_grad
        assert {"mosaic_axes", "mosaic_scales"} <= set(Crystal.static_fields())
        assert not {"mosaic_axes", "mosaic_scales"} & set(Crystal.LEAVES)

    def test_trees_built_apart_compare_equal_and_share_a_structure(self):
        import torch.utils._pytree as pytree

        one, two = mosaic_crystal(), mosaic_crystal()
        assert one.mosaic_axes is not two.mosaic_axes
        reseeded = Crystal(cell_a=50, cell_b=50, cell_c=50, mosaic_spread=0.5, mosaic_domains=6,
                           mosaic_seed=-8)
        assert one == two and one != reseeded
        spec_one, spec_two = pytree.tree_flatten(one)[1], pytree.tree_flatten(two)[1]
        assert spec_one == spec_two and hash(spec_one) == hash(spec_two)
        assert not spec_one != spec_two
        assert spec_one != pytree.tree_flatten(reseeded)[1]

    def test_draws_given_as_tuples_are_kept(self):
        crystal = mosaic_crystal()
        listed = mosaic_crystal(mosaic_axes=tuple(map(tuple, crystal.mosaic_axes.tolist())),
                                mosaic_scales=tuple(crystal.mosaic_scales.tolist()))
        assert torch.equal(listed.mosaic_axes, crystal.mosaic_axes)
        assert torch.equal(mosaic_rotations(listed), mosaic_rotations(crystal))

    def test_json_round_trip_keeps_the_draws_exactly(self):
        crystal = mosaic_crystal()
        back = Crystal.model_validate_json(crystal.model_dump_json())
        assert torch.equal(back.mosaic_axes, crystal.mosaic_axes) and back == crystal

    def test_a_tree_listing_other_draws_than_domains_is_refused_at_render(self):
        crystal = mosaic_crystal().model_copy(update={"mosaic_domains": 9})
        with pytest.raises(ValueError, match=r"list 6/6 draws but mosaic_domains is 9; build"):
            mosaic_rotations(crystal)
