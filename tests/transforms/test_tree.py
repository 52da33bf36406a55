"""`Params` as a pytree: leaves, static context, rebuilding without validation, JSON, stacking."""
from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from pydantic import ValidationError

import nbfunc
from nbfunc import Beam, Crystal, Detector, Params, Sampling, SourceGrid, SourceList
from nbfunc.tree import get_leaf


def documented_paths(p: Params) -> list[str]:
    """Leaf paths from the classes' ``LEAVES`` and ``CHILDREN``, in declaration order."""
    paths = []

    def walk(node, prefix):
        cls = type(node)
        paths.extend(prefix + name for name in cls.LEAVES)
        for child in cls.CHILDREN:
            walk(getattr(node, child), prefix + child + ".")

    walk(p, "")
    return paths


class TestFlatten:
    def test_leaves_are_the_documented_tensors_in_leaf_paths_order(self, tiny, configs):
        for p in (tiny, configs["sourcefile"]):
            leaves, _ = pytree.tree_flatten(p)
            assert p.leaf_paths() == nbfunc.leaf_paths(p) == documented_paths(p)
            assert len(leaves) == len(p.leaf_paths())
            for path, leaf in zip(p.leaf_paths(), leaves):
                assert leaf is get_leaf(p, path), path
                assert isinstance(leaf, torch.Tensor) and leaf.dtype == torch.float64, path

    def test_grid_and_list_sources_have_their_own_leaves(self, tiny, configs):
        grid, listed = tiny.leaf_paths(), configs["sourcefile"].leaf_paths()
        assert grid[:6] == ["beam.wavelength", "beam.kahn_factor", "beam.fluence",
                            "beam.sources.dispersion", "beam.sources.hdivrange",
                            "beam.sources.vdivrange"]
        assert listed[3:6] == ["beam.sources.directions", "beam.sources.wavelengths",
                               "beam.sources.weights"]
        assert grid[6:] == listed[6:]
        assert len(grid) == 39

    def test_sampling_and_settings_are_not_leaves(self, tiny):
        paths = tiny.leaf_paths()
        assert not any(path.startswith("sampling") for path in paths)
        for static in ("detector.fpixels", "detector.thicksteps", "crystal.phisteps",
                       "crystal.shape", "crystal.mosaic_domains", "beam.polarization"):
            assert static not in paths

    def test_flatten_unflatten_round_trip(self, tiny):
        leaves, spec = pytree.tree_flatten(tiny)
        rebuilt = pytree.tree_unflatten(leaves, spec)
        assert rebuilt == tiny
        assert type(rebuilt) is Params and type(rebuilt.beam.sources) is SourceGrid


class TestUnflattenSkipsValidation:
    def test_batched_leaves(self, tiny):
        leaves, spec = pytree.tree_flatten(tiny)
        batched = pytree.tree_unflatten([leaf.expand((4,) + leaf.shape) for leaf in leaves], spec)
        assert batched.detector.distance.shape == (4,)
        assert batched.crystal.misset.shape == (4, 3)

    def test_wrong_shapes_and_invalid_values(self, tiny):
        leaves, spec = pytree.tree_flatten(tiny)
        bad = [torch.full((2, 5), float("nan")) for _ in leaves]
        tree = pytree.tree_unflatten(bad, spec)
        assert tree.detector.pixel_size.shape == (2, 5)
        negative = nbfunc.replace_leaves(tiny, {"detector.pixel_size": torch.tensor(-1.0),
                                                "crystal.cell_alpha": torch.tensor(200.0)})
        assert float(negative.detector.pixel_size) == -1.0

    def test_nested_trees_and_non_tensors_in_leaves(self, tiny):
        leaves, spec = pytree.tree_flatten(tiny)
        nested = pytree.tree_unflatten([tiny] * len(leaves), spec)   # a Hessian's layout
        assert nested.crystal.cell_a is tiny
        assert nested.crystal.cell_a.detector.distance is tiny.detector.distance
        empty = pytree.tree_unflatten([None] * len(leaves), spec)
        assert empty.beam.wavelength is None

    def test_validation_still_runs_on_user_input(self, tiny):
        data = tiny.model_dump()
        data["detector"]["pixel_size"] = -1.0
        with pytest.raises(ValidationError, match="pixel_size"):
            Params.model_validate(data)


class TestStaticContext:
    def test_changing_a_setting_changes_the_treespec(self, tiny):
        wider = tiny.model_copy(update={"detector": tiny.detector.model_copy(update={"fpixels": 7})})
        assert pytree.tree_structure(wider) != pytree.tree_structure(tiny)
        finer = tiny.model_copy(update={"sampling": Sampling(oversample=2)})
        assert pytree.tree_structure(finer) != pytree.tree_structure(tiny)

    def test_changing_a_leaf_keeps_the_treespec(self, tiny):
        moved = nbfunc.replace_leaves(tiny, {"detector.distance": torch.tensor(60.0, dtype=torch.float64)})
        assert pytree.tree_structure(moved) == pytree.tree_structure(tiny)
        assert moved != tiny

    def test_replace_leaves_rejects_unknown_paths(self, tiny):
        with pytest.raises(KeyError, match="detector.fpixels"):
            nbfunc.replace_leaves(tiny, {"detector.fpixels": torch.tensor(3.0)})


def _with_grid_and_mask(p: Params) -> Params:
    mask = torch.ones(p.detector.spixels, p.detector.fpixels, dtype=torch.bool)
    mask[0, :3] = False
    return Params(beam=p.beam, detector=p.detector, crystal=p.crystal,
                  sampling=Sampling(mask=mask, roi=(0, 4, 1, 5), dmin=0.5))


class TestJson:
    def test_round_trip_is_exact(self, configs):
        p = _with_grid_and_mask(configs["hkl"])
        assert p.crystal.fhkl.shape == (3, 3, 3) and p.sampling.mask is not None
        back = Params.model_validate_json(p.model_dump_json())
        assert back == p
        for path, a, b in zip(p.leaf_paths(), pytree.tree_leaves(p), pytree.tree_leaves(back)):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
        assert back.sampling.mask.dtype == torch.bool
        assert torch.equal(back.sampling.mask, p.sampling.mask)
        assert back.crystal.hkl_origin == (-1, -1, -1)
        assert pytree.tree_structure(back) == pytree.tree_structure(p)

    def test_round_trip_of_listed_sources_and_mosaic(self, configs):
        for name in ("sourcefile", "mosaic_phi"):
            p = configs[name]
            back = Params.model_validate_json(p.model_dump_json())
            assert back == p
            assert all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(p), pytree.tree_leaves(back)))
            assert pytree.tree_structure(back) == pytree.tree_structure(p)

    def test_round_trip_renders_the_same_image(self, configs, eager):
        p = configs["hkl"]
        back = Params.model_validate_json(p.model_dump_json())
        assert torch.equal(nbfunc.simulate(back), nbfunc.simulate(p))


def _detector(**changes):
    values = dict(distance=100, beam_center_f=3, beam_center_s=3, pixel_size=0.1, fpixels=8, spixels=8)
    values.update(changes)
    return Detector(**values)


class TestValidationErrors:
    @pytest.mark.parametrize("build, field, expected", [
        (lambda: _detector(pixel_size=-0.1), "pixel_size", "> 0 mm"),
        (lambda: _detector(distance=0.0), "distance", "> 0 mm"),
        (lambda: _detector(fpixels=0), "fpixels", "greater than 0"),
        (lambda: _detector(mu=-1.0), "mu", ">= 0"),
        (lambda: Beam(wavelength=float("nan")), "wavelength", "nan is not finite"),
        (lambda: Beam(wavelength=1.0, kahn_factor=2.0), "kahn_factor", "in [-1, 1]"),
        (lambda: Crystal(cell_a=50, cell_b=50, cell_c=50, cell_gamma=200), "cell_gamma",
         "in (0, 180) degrees"),
        (lambda: Crystal(cell_a=-50, cell_b=50, cell_c=50), "cell_a", "> 0 Angstrom"),
        (lambda: Crystal(cell_a=50, cell_b=50, cell_c=50, Na=0.5), "Na", ">= 1 unit cells"),
        (lambda: Crystal(cell_a=50, cell_b=50, cell_c=50, misset=[1.0, 2.0]), "misset", "three angles"),
        (lambda: SourceGrid(hdivrange=-1.0), "hdivrange", ">= 0"),
        (lambda: SourceList(directions=[[-1, 0, 0]], wavelengths=[1.0, 2.0]), "wavelengths", "shape (1,)"),
        (lambda: SourceList(directions=[[-1, 0, 0]], wavelengths=[1.0], weights=[1.0, 2.0]),
         "weights", "shape (1,)"),
        (lambda: SourceList(directions=[[-1, 0, 0]] * 2, wavelengths=[1.0, 2.0],
                            weights=[1.0, -0.5]), "weights", ">= 0"),
        (lambda: SourceList(directions=[[-1, 0, 0]] * 2, wavelengths=[1.0, 2.0],
                            weights=[0.0, 0.0]), "weights", "not all zero"),
        (lambda: SourceList(directions=[[-1, 0, 0]], wavelengths=[1.0], weights=[float("inf")]),
         "weights", "non-finite"),
    ])
    def test_error_names_field_and_range(self, build, field, expected):
        with pytest.raises(ValidationError) as info:
            build()
        text = str(info.value)
        assert field in text and expected in text, text

    @pytest.mark.parametrize("angles", [(90, 90, 200), (10, 10, 170), (100, 100, 170)])
    def test_impossible_cell_angles(self, angles):
        alpha, beta, gamma = angles
        with pytest.raises(ValidationError) as info:
            Crystal(cell_a=50, cell_b=50, cell_c=50, cell_alpha=alpha, cell_beta=beta, cell_gamma=gamma)
        text = str(info.value)
        assert "cell_" in text or "cell angles" in text
        assert "180" in text or "sum of the other two" in text, text

    def test_nested_error_gives_the_location(self, tiny):
        data = tiny.model_dump()
        data["beam"]["wavelength"] = float("nan")
        with pytest.raises(ValidationError) as info:
            Params.model_validate(data)
        assert info.value.errors()[0]["loc"][:2] == ("beam", "wavelength")

    def test_every_test_configuration_validates_again(self, configs):
        for name, p in configs.items():
            assert Params.model_validate_json(p.model_dump_json()) == p, name
            assert Params.model_validate(p.model_dump()) == p, name

    def test_mask_shape_must_match_detector(self, tiny):
        with pytest.raises(ValidationError, match=r"sampling.mask has shape \(2, 2\)"):
            Params(beam=tiny.beam, detector=tiny.detector, crystal=tiny.crystal,
                   sampling=Sampling(mask=torch.ones(2, 2)))


class TestStack:
    def test_stack_unstack_round_trip(self, tiny):
        members = [nbfunc.replace_leaves(tiny, {"detector.distance": torch.tensor(d, dtype=torch.float64),
                                                "crystal.misset": torch.tensor([d, 0.0, -d], dtype=torch.float64)})
                   for d in (40.0, 50.0, 60.0)]
        stacked = nbfunc.stack(members)
        assert stacked.detector.distance.shape == (3,)
        assert stacked.crystal.misset.shape == (3, 3)
        assert stacked.detector.fpixels == tiny.detector.fpixels
        back = nbfunc.unstack(stacked)
        assert len(back) == 3
        for a, b in zip(back, members):
            assert a == b
            assert pytree.tree_structure(a) == pytree.tree_structure(b)

    def test_stack_rejects_different_settings(self, tiny):
        other = tiny.model_copy(update={"detector": tiny.detector.model_copy(update={"fpixels": 7})})
        with pytest.raises(ValueError, match="static settings"):
            nbfunc.stack([tiny, other])

    def test_stack_rejects_different_leaf_shapes(self, configs):
        p = configs["hkl"]
        bigger = nbfunc.replace_leaves(p, {"crystal.fhkl": torch.zeros(4, 3, 3, dtype=torch.float64)})
        with pytest.raises(ValueError, match="crystal.fhkl"):
            nbfunc.stack([p, bigger])

    def test_stack_rejects_mixed_source_kinds(self, tiny, configs):
        with pytest.raises(ValueError):
            nbfunc.stack([tiny, configs["sourcefile"]])
