"""Saving and loading a parameter tree: `Params.save` and `Params.load`."""
import pydantic
import pytest
import torch

import nbfunc
from nbfunc.io.errors import NbfuncInputError
from nbfunc.params import PARAMS_MAX_BYTES, Params

FLAGS = ("-cell 70 80 90 75 85 95 -misset 10 -20 30 -default_F 100 -N 5 -detpixels 16 -mosaic 0.5 "
         "-mosaic_dom 3 -phi 0 -osc 1 -phisteps 2 -divergence 1 -divsteps 3 -roi 2 12 3 9").split()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_saved_tree_loads_equal_and_renders_the_same_image(tmp_path, dtype):
    p = nbfunc.params_from_args(FLAGS, dtype=dtype)
    p.save(tmp_path / "tree.json")
    q = Params.load(tmp_path / "tree.json")
    assert q == p and q.crystal.cell_a.dtype == dtype
    assert torch.equal(nbfunc.simulate(q), nbfunc.simulate(p))


def test_a_file_that_is_not_a_tree_is_refused_naming_the_field(tmp_path):
    path = tmp_path / "tree.json"
    nbfunc.params_from_args(FLAGS).save(path)
    path.write_text(path.read_text().replace('"pixel_size": {', '"pixel_edge": {'))
    with pytest.raises(pydantic.ValidationError, match="detector.pixel_size"):
        Params.load(path)


def test_a_missing_or_huge_file_is_one_line(tmp_path):
    with pytest.raises(NbfuncInputError, match="parameter tree") as info:
        Params.load(tmp_path / "missing.json")
    assert len(str(info.value).splitlines()) == 1
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as handle:
        handle.truncate(PARAMS_MAX_BYTES + 1)  # sparse: nothing is written or read
    with pytest.raises(NbfuncInputError, match="holds more than 4 GiB"):
        Params.load(huge)


def test_save_into_a_missing_folder_is_one_line(tmp_path):
    with pytest.raises(NbfuncInputError) as info:
        nbfunc.params_from_args(FLAGS).save(tmp_path / "nowhere" / "tree.json")
    assert len(str(info.value).splitlines()) == 1 and "nowhere" in str(info.value)
