"""What `nbfunc.simulate` refuses: anything but one tree."""
import pytest
import torch

import nbfunc

FLAGS = "-cell 50 50 50 90 90 90 -default_F 1 -detpixels 4".split()


@pytest.mark.parametrize("thing", [None, {}, "tree"])
def test_anything_but_a_tree_is_one_type_error(thing):
    with pytest.raises(TypeError, match=r"^expected an nbfunc.Params tree, got \w+; build one"):
        nbfunc.simulate(thing)


def test_a_stacked_tree_outside_vmap_points_to_vmap():
    p = nbfunc.params_from_args(FLAGS)
    stacked = nbfunc.stack([p, p, p])
    with pytest.raises(ValueError, match=r"stack of 3 trees .* torch.func.vmap\(nbfunc.simulate\)"):
        nbfunc.simulate(stacked)
    images = torch.func.vmap(nbfunc.simulate)(stacked)
    assert torch.equal(images[1], nbfunc.simulate(p))
