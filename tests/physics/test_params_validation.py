"""`Params` validation: a tree that validates renders a finite image, or validation says why not.

Each refused tree is one that rendered an all-NaN image, failed deep in torch, or tried to
allocate without bound before these checks; each error is one line naming the field, the
value and the fix.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from pydantic import ValidationError

import nbfunc
from nbfunc import Beam, Crystal, Detector, Params, Sampling, SourceGrid, SourceList
from nbfunc.cli.derive import params_from_args
from nbfunc.tree import get_leaf

NAN, INF = float("nan"), float("inf")


def detector(**changes) -> Detector:
    values = dict(distance=100, beam_center_f=0.8, beam_center_s=0.8, pixel_size=0.1,
                  fpixels=16, spixels=16)
    values.update(changes)
    return Detector(**values)


def crystal(**changes) -> Crystal:
    values = dict(cell_a=50, cell_b=50, cell_c=50, Na=5, Nb=5, Nc=5, default_F=100)
    values.update(changes)
    return Crystal(**values)


def params(beam=None, det=None, cr=None, sampling=None) -> Params:
    return Params(beam=beam or Beam(wavelength=1.0), detector=det or detector(),
                  crystal=cr or crystal(), sampling=sampling or Sampling())


def refusal(build) -> tuple[str, dict]:
    """The first error's message and the error itself, of a build that must be refused."""
    with pytest.raises(ValidationError) as caught:
        build()
    first = caught.value.errors()[0]
    return first["msg"], first


def assert_one_line(message: str) -> None:
    assert "\n" not in message and len(message) < 300, message


def renders_finite(p: Params) -> bool:
    return bool(torch.isfinite(nbfunc.simulate(p)).all())


SKEWED = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.1, 0.0, 1.0))
MIRROR = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, -1.0))
TURN = ((math.cos(0.3), -math.sin(0.3), 0.0), (math.sin(0.3), math.cos(0.3), 0.0), (0.0, 0.0, 1.0))

REFUSED = {
    "zero spindle axis": (lambda: crystal(spindle_axis=(0, 0, 0)), "spindle_axis", "(0, 0, 0)"),
    "NaN spindle axis": (lambda: crystal(spindle_axis=(NAN, 0, 1)), "spindle_axis", "nan"),
    "infinite spindle axis": (lambda: crystal(spindle_axis=(INF, 0, 1)), "spindle_axis", "inf"),
    "singular base_orientation": (
        lambda: crystal(base_orientation=((1, 0, 0), (1, 0, 0), (0, 0, 1))), "base_orientation",
        "det = 0"),
    "skewed base_orientation": (lambda: crystal(base_orientation=SKEWED), "base_orientation",
                                "tolerance 1e-06"),
    "improper base_orientation": (lambda: crystal(base_orientation=MIRROR), "base_orientation",
                                  "det = -1"),
    "NaN base_orientation": (
        lambda: crystal(base_orientation=((NAN, 0, 0), (0, 1, 0), (0, 0, 1))), "base_orientation",
        "nan"),
    "zero mosaic axis": (lambda: crystal(mosaic_domains=2, mosaic_axes=((0, 0, 1), (0, 0, 0)),
                                         mosaic_scales=(0.0, 1.0)), "mosaic_axes[1]", "(0, 0, 0)"),
    "long mosaic axis": (lambda: crystal(mosaic_domains=2, mosaic_axes=((0, 0, 1), (0, 0, 2)),
                                         mosaic_scales=(0.0, 1.0)), "mosaic_axes[1]", "length 2"),
    "NaN mosaic scale": (lambda: crystal(mosaic_domains=2, mosaic_axes=((0, 0, 1), (1, 0, 0)),
                                         mosaic_scales=(0.0, NAN)), "mosaic_scales[1]", "nan"),
    "infinite thick_step_fraction": (lambda: detector(thick_step_fraction=INF),
                                     "thick_step_fraction", "inf"),
    "NaN source fraction": (lambda: SourceGrid(hdiv_fracs=(NAN,)), "hdiv_fracs[0]", "nan"),
    "infinite dispersion fraction": (
        lambda: SourceGrid(hdiv_fracs=(0.0, 0.0), vdiv_fracs=(0.0, 0.0), disp_fracs=(0.0, INF)),
        "disp_fracs[1]", "inf"),
    "NaN source direction": (lambda: SourceList(directions=[[-1, 0, 0], [NAN, 0, 0]],
                                                wavelengths=[1.0, 1.0]), "directions", "nan"),
    "infinite source wavelength": (lambda: SourceList(directions=[[-1, 0, 0]], wavelengths=[INF]),
                                   "wavelengths", "inf"),
    "NaN default_F": (lambda: crystal(default_F=NAN), "default_F", "nan"),
    "NaN leaf tensor": (lambda: detector(distance=torch.tensor(NAN)), "distance", "nan"),
    "infinite fhkl entry": (lambda: crystal(fhkl=torch.ones(2, 2, 2).index_fill(0, torch.tensor([1]), INF)),
                            "fhkl", "index (1, 0, 0)"),
    "float16 leaf": (lambda: detector(distance=torch.tensor(100.0, dtype=torch.float16)),
                     "distance", "float16"),
    "complex leaf": (lambda: detector(distance=torch.tensor(100.0 + 1j)), "distance", "complex"),
    "meta leaf": (lambda: detector(distance=torch.tensor(100.0, device="meta")), "distance", "meta"),
    "zero detector axis": (lambda: detector(odet_vector=(0, 0, 0)), "odet_vector", "(0, 0, 0)"),
    "NaN two-theta axis": (lambda: detector(twotheta_axis=(0, NAN, 0)), "twotheta_axis", "nan"),
    "parallel detector axes": (lambda: detector(fdet_vector=(0, 0, 1), sdet_vector=(0, 0, -2)),
                               "sdet_vector", "parallel to fdet_vector"),
    "polarization along the beam": (lambda: Beam(wavelength=1.0, polar_vector=(2, 0, 0)),
                                    "polar_vector", "parallel to beam_vector"),
    "NaN beam vector": (lambda: Beam(wavelength=1.0, beam_vector=(NAN, 0, 0)), "beam_vector", "nan"),
    "huge square detector": (lambda: detector(fpixels=10**7, spixels=10**7), "spixels", "= 100000000000000 pixels"),
    "detector just over 2^31 pixels": (lambda: detector(fpixels=2**16, spixels=2**15),
                                       "spixels", "2147483648"),
    "infinite dmin": (lambda: Sampling(dmin=INF), "dmin", "inf"),
}


class TestRefused:
    @pytest.mark.parametrize("case", REFUSED)
    def test_names_field_value_and_fix_in_one_line(self, case):
        build, field, shown = REFUSED[case]
        message, error = refusal(build)
        assert field.split("[")[0] in error["loc"], error
        assert field in message and shown in message, message
        assert re.search(r"; .*\b(give|replace|convert)\b", message), message
        assert_one_line(message)

    def test_huge_detector_is_refused_before_anything_is_allocated(self):
        message, _ = refusal(lambda: params(det=detector(fpixels=10**7, spixels=10**7),
                                            sampling=Sampling(roi=(0, 3, 0, 3))))
        assert "more than 2^31 - 1" in message and "GiB" in message

    def test_largest_allowed_detector_validates(self):
        assert 46340 * 46341 <= 2**31 - 1 < 46341 * 46341
        assert detector(fpixels=46340, spixels=46341).spixels == 46341
        refusal(lambda: detector(fpixels=46341, spixels=46341))


class TestOneDtypeAndDevice:
    def test_mixed_float32_and_float64_leaves_are_refused(self):
        message, error = refusal(lambda: params(
            beam=Beam(wavelength=torch.tensor(1.0, dtype=torch.float32))))
        assert error["loc"] == ()
        assert "float64 on cpu but beam.wavelength is float32 on cpu" in message, message
        assert ".to(dtype=" in message
        assert_one_line(message)

    def test_a_tree_converted_as_a_whole_validates_and_renders(self):
        p = params().to(dtype=torch.float32)
        assert {get_leaf(p, path).dtype for path in p.leaf_paths()} == {torch.float32}
        assert Params.model_validate(p.model_dump()) == p
        assert renders_finite(p)

    def test_a_leaf_on_another_device_is_refused(self):
        """A group validated on its own and then given one leaf on another device (``meta``
        stands for a GPU here): the tree that holds it is refused in one line."""
        from nbfunc.tree import replace_leaves

        moved = replace_leaves(detector(), {"distance": torch.tensor(100.0, dtype=torch.float64,
                                                                      device="meta")})
        message, error = refusal(lambda: params(det=moved))
        assert error["loc"] == ()
        assert "detector.distance is float64 on meta but beam.wavelength is float64 on cpu" in message
        assert "device=" in message
        assert_one_line(message)

    def test_to_device_moves_every_leaf_and_keeps_the_static_arrays(self):
        p = params(cr=crystal(mosaic_spread=0.5, mosaic_domains=3))
        moved = p.to(device="meta")
        assert {get_leaf(moved, path).device.type for path in moved.leaf_paths()} == {"meta"}
        assert moved.crystal.mosaic_axes is p.crystal.mosaic_axes  # static: not moved
        back = p.to(dtype=torch.float32, device="cpu")
        assert {get_leaf(back, path).device.type for path in back.leaf_paths()} == {"cpu"}
        assert renders_finite(back)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
    def test_mixed_devices_are_refused(self):
        message, _ = refusal(lambda: params(
            beam=Beam(wavelength=torch.tensor(1.0, dtype=torch.float64, device="cuda"))))
        assert "on cuda:0 but" in message or "on cpu but" in message, message


class TestJson:
    def test_shape_and_data_that_disagree(self):
        data = json.loads(params().model_dump_json())
        data["detector"]["distance"]["shape"] = [2]
        message, error = refusal(lambda: Params.model_validate_json(json.dumps(data)))
        assert error["loc"] == ("detector", "distance")
        assert message.endswith('distance: tensor shape [2] holds 2 values but "data" has 1; make '
                                'the product of "shape" equal the number of values in "data"')

    @pytest.mark.parametrize("change, shown", [
        ({"shape": [-1]}, "[-1]"), ({"shape": "3"}, "'3'"), ({"data": ["a"]}, "not a list"),
        ({"data": [[1.0, 2.0], [3.0]]}, "not a list"), ({"dtype": "float128"}, "'float128'"),
        ({"data": [None]}, "not a list")])
    def test_malformed_json_tensors(self, change, shown):
        data = json.loads(params().model_dump_json())
        data["crystal"]["misset"].update(change)
        message, error = refusal(lambda: Params.model_validate_json(json.dumps(data)))
        assert error["loc"] == ("crystal", "misset") and shown in message, message
        assert_one_line(message)

    def test_non_finite_json_data(self):
        text = params().model_dump_json().replace('"data":[100.0]', '"data":[Infinity]', 1)
        message, _ = refusal(lambda: Params.model_validate_json(text))
        assert "= inf is not finite" in message, message


class TestGeometryAndRange:
    def test_detector_plane_along_the_beam(self):
        message, _ = refusal(lambda: params(det=detector(odet_vector=(0, 1, 0))))
        assert message.startswith("Value error, detector.odet_vector/rotx/roty/rotz/twotheta: the "
                                  "placed detector is not finite (beam . normal = 0)"), message
        assert_one_line(message)

    def test_dispersion_that_makes_a_wavelength_negative(self):
        grid = SourceGrid(dispersion=3.0, hdiv_fracs=(0.0, 0.0), vdiv_fracs=(0.0, 0.0),
                          disp_fracs=(-0.5, 0.5))
        message, _ = refusal(lambda: params(beam=Beam(wavelength=1.0, sources=grid)))
        assert "beam.sources.dispersion" in message and "wavelength -0.5 Angstrom" in message, message

    @pytest.mark.parametrize("build, field", [
        (lambda: params(cr=crystal(default_F=1e200)), "crystal.default_F/fhkl: F^2"),
        (lambda: params(cr=crystal(Na=1e100, Nb=1e100, Nc=1e100)), "crystal.Na/Nb/Nc"),
        (lambda: params(cr=crystal(water_size=1e100)), "crystal.water_size"),
        (lambda: params(det=detector(pixel_size=1e300)), "detector.pixel_size: the solid angle"),
        (lambda: params(cr=crystal(cell_a=1e200, cell_b=1e200, cell_c=1e200)), "crystal.cell_a/b/c: the oriented cell overflows"),
    ])
    def test_values_whose_image_overflows(self, build, field):
        message, _ = refusal(build)
        assert field in message, message
        assert_one_line(message)

    def test_float32_conversion_is_checked_for_float32_overflow(self):
        p = params(cr=crystal(default_F=1e19))
        assert renders_finite(p)
        with pytest.raises(ValidationError, match="beyond what float32 holds.*or render in float64"):
            p.to(dtype=torch.float32)


class TestStillValid:
    @pytest.mark.parametrize("flags", [
        "",
        "-mosaic 2 -mosaic_dom 3 -phisteps 2 -osc 0.3",
        "-divergence 0.5 -dispersion 0.1 -divsteps 2 -dispsteps 2",
        "-detector_thick 0.1 -detector_thicksteps 3 -detector_abs 50 -oversample 2",
        "-xds -twotheta 20 -detector_rotx 5 -detector_roty 3 -detector_rotz 2",
        "-spindle_axis 0 1 1 -polar_vector 0 1 0 -beam_vector 1 0 0 -fdet_vector 0 0 1 "
        "-sdet_vector 0 -1 0 -odet_vector 1 0 0 -twotheta_axis 0 1 0",
        "-round_xtal -fudge 0.5 -water 10 -nopolar -curved_det -point_pixel",
    ])
    def test_command_line_trees_validate_and_round_trip(self, flags):
        args = ("-cell 50 60 70 85 95 100 -misset 10 -20 30 -default_F 100 -N 3 -lambda 1 "
                "-distance 50 -pixel 0.5 -detpixels 6 " + flags).split()
        for dtype in (torch.float64, torch.float32):
            p = params_from_args(args, dtype=dtype)
            assert Params.model_validate_json(p.model_dump_json()) == p
            assert renders_finite(p)

    def test_rotation_and_mosaic_axes_within_tolerance(self):
        rounded = tuple(tuple(round(x, 7) for x in row) for row in TURN)
        p = params(cr=crystal(base_orientation=rounded, mosaic_spread=1.0, mosaic_domains=2,
                              mosaic_axes=((0, 0, 1), (0.6, 0.8, 0)), mosaic_scales=(0.0, 0.5)))
        assert renders_finite(p)

    def test_validators_do_not_run_under_transforms(self):
        p = params(cr=crystal(Na=2, Nb=2, Nc=2), det=detector(fpixels=4, spixels=4))
        images = torch.func.vmap(nbfunc.simulate)(nbfunc.stack([p, p]))
        jac = torch.func.jacfwd(nbfunc.simulate)(p)
        assert images.shape == (2, 4, 4) and jac.detector.distance.shape == (4, 4)
        assert torch.isfinite(images).all() and torch.isfinite(jac.detector.distance).all()


EXTREMES = {
    "distance 1 um": dict(det=dict(distance=1e-3)),
    "distance 1000 km": dict(det=dict(distance=1e9)),
    "wavelength 1e-4 Angstrom": dict(beam=dict(wavelength=1e-4)),
    "wavelength 1e4 Angstrom": dict(beam=dict(wavelength=1e4)),
    "N = 1e6": dict(cr=dict(Na=1e6, Nb=1e6, Nc=1e6)),
    "cell 1e-3 Angstrom": dict(cr=dict(cell_a=1e-3, cell_b=1e-3, cell_c=1e-3)),
    "cell 1e6 Angstrom": dict(cr=dict(cell_a=1e6, cell_b=1e6, cell_c=1e6)),
    "nearly flat cell": dict(cr=dict(cell_alpha=1e-3, cell_beta=1e-3, cell_gamma=1.5e-3)),
    "pixel 100 m": dict(det=dict(pixel_size=1e5)),
    "beam centre 1e300 mm": dict(det=dict(beam_center_f=1e300)),
    "huge rotations": dict(det=dict(rotx=1e300), cr=dict(misset=[1e300, 0, 0], phi_start=1e300)),
    "gauss spots, fudge 1e-300": dict(cr=dict(fudge=1e-300, shape="gauss")),
    "point pixel on the beam": dict(det=dict(point_pixel=True, beam_center_f=0.05, beam_center_s=0.05)),
    "curved detector at 1 um": dict(det=dict(curved=True, distance=1e-3)),
    "thick absorbing sensor": dict(det=dict(thickness=1e6, mu=1e6, thicksteps=3,
                                            thick_step_fraction=1e6, absorption=True)),
    "fluence 1e300": dict(beam=dict(fluence=1e300)),
}


@pytest.mark.parametrize("case", EXTREMES)
def test_extreme_valid_values_render_finite(case):
    kw = EXTREMES[case]
    p = params(beam=Beam(**{"wavelength": 1.0, **kw.get("beam", {})}),
               det=detector(**kw.get("det", {})), cr=crystal(**kw.get("cr", {})))
    assert renders_finite(p)


# --------------------------------------------------------------------------------------------
# conversions and leaf replacement: one-line errors, not torch's
# --------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_to_a_device_torch_cannot_use_is_one_runtime_error(device):
    """Torch's CPU-only build raises a bare AssertionError for CUDA."""
    with pytest.raises(RuntimeError, match=f"device '{device}' is not usable here") as caught:
        params().to(device=device)
    assert_one_line(str(caught.value))


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, "float32"])
def test_to_a_dtype_that_is_not_floating_is_refused(dtype):
    with pytest.raises(TypeError, match="not a floating torch dtype") as caught:
        params().to(dtype=dtype)
    assert_one_line(str(caught.value))


@pytest.mark.parametrize("node, field", [("sampling", "oversample"), ("detector", "thicksteps"),
                                         ("crystal", "phisteps")])
def test_counts_beyond_a_c_int_are_refused(node, field):
    """10**19 sub-pixels overflowed torch's integers; 10**19 sensor layers never finished."""
    tree = json.loads(params().model_dump_json())
    tree[node][field] = 10**19
    with pytest.raises(ValidationError, match="less than or equal to 2147483647"):
        Params.model_validate(tree)


@pytest.mark.parametrize("name, needles", [
    ("beam.bogus", ["'beam.bogus'", "did you mean", "nbfunc.leaf_paths(tree)"]),
    ("", ["not leaves of this tree: ''"]),
    ("beam.wavelength.x", ["did you mean 'beam.wavelength'"]),
    ("detector.fpixels", ["'detector.fpixels' is a static setting"]),
])
def test_replace_leaves_names_an_unknown_leaf_in_one_short_line(name, needles):
    with pytest.raises(KeyError) as caught:
        nbfunc.replace_leaves(params(), {name: torch.tensor(1.0)})
    message = caught.value.args[0]
    assert_one_line(message)
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("extra", [{"device": "cuda"}, {"evil": 1}])
def test_a_json_tensor_with_unknown_keys_is_refused(extra):
    """A key such as "device" was ignored, leaving the tree where the user did not ask."""
    tree = json.loads(params().model_dump_json())
    tree["beam"]["wavelength"].update(extra)
    message, _ = refusal(lambda: Params.model_validate(tree))
    assert f"unknown JSON tensor keys ['{next(iter(extra))}']" in message
    assert_one_line(message)


# --------------------------------------------------------------------------------------------
# Domain-size tensor (crystal.Ncells_def) and per-shot scale (crystal.G)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build, shown", [
    (lambda: crystal(Ncells_def=[1.0, 0.0, 0.0]), "used only by the Gaussian shape, not 'square'"),
    (lambda: crystal(Ncells_def=[0.0, 0.5, 0.0], shape="round"), "not 'round'"),
    (lambda: crystal(Ncells_def=[5.0, 0.0, 0.0], shape="gauss"), "not positive definite (det 0"),
    (lambda: crystal(Ncells_def=[4.5, 4.5, -4.5], shape="gauss"), "not positive definite"),
])
def test_offdiagonal_size_terms_are_refused_in_one_line(build, shown):
    message, _ = refusal(build)
    assert "crystal.Ncells_def" in message and shown in message and "; give" in message, message
    assert_one_line(message)


@pytest.mark.parametrize("changes, field", [
    (dict(Ncells_def=[1.0, 2.0]), "Ncells_def"), (dict(Ncells_def=[0.0, INF, 0.0]), "Ncells_def"),
    (dict(G=0.0), "G"), (dict(G=-1.0), "G"), (dict(G=NAN), "G"), (dict(G=[1.0, 2.0]), "G"),
])
def test_bad_offdiagonals_and_scales_are_refused(changes, field):
    message, error = refusal(lambda: crystal(**changes))
    assert error["loc"] == (field,) and field in message, message
    assert_one_line(message)


def test_a_scale_whose_image_overflows_is_refused():
    message, _ = refusal(lambda: params(cr=crystal(G=1e300, default_F=1e10)))
    assert "crystal.G" in message, message
    assert_one_line(message)


@pytest.mark.parametrize("changes", [
    dict(Ncells_def=[4.99, 0.0, 0.0]),                 # nearly singular domain-size matrix
    dict(Ncells_def=[2.0, -2.0, 2.0], G=1e-300),
    dict(Ncells_def=[3.0, 3.0, 3.0], G=1e20, fudge=1e-300),
])
def test_valid_offdiagonals_and_scales_render_finite(changes):
    assert renders_finite(params(cr=crystal(shape="gauss", **changes),
                                 det=detector(fpixels=4, spixels=4)))
