"""Properties of whole renders: scaling laws, equivalences, chunking, ROI and mask."""
import numpy as np
import pytest
import torch

from nbfunc.cli.derive import params_from_args
from nbfunc.params import Beam, Crystal, Detector, Params
from nbfunc.render import rendered_pixels, simulate, simulate_pixels

D = torch.float64
SMALL = "-cell 40 40 40 90 90 90 -default_F 100 -lambda 1 -distance 60 -detpixels 24 -pixel 0.4"


def render(flags: str, dtype=D) -> torch.Tensor:
    return simulate(params_from_args(flags.split(), dtype))


def centred(n_cells: float) -> Params:
    return Params(beam=Beam(wavelength=1.0),
                  detector=Detector(distance=100, beam_center_f=1.05, beam_center_s=1.05, pixel_size=0.1,
                                    fpixels=21, spixels=21),
                  crystal=Crystal(cell_a=50, cell_b=50, cell_c=50, Na=n_cells, Nb=n_cells, Nc=n_cells,
                                  default_F=10))


def test_direct_beam_pixel_scales_as_n_to_the_sixth():
    ratio = simulate(centred(6.0))[10, 10] / simulate(centred(3.0))[10, 10]
    assert torch.allclose(ratio, torch.tensor(64.0, dtype=D), rtol=1e-9)


def test_image_is_symmetric_for_centred_cubic_crystal():
    image = simulate(centred(4.0))
    assert torch.allclose(image, image.flip(0), rtol=1e-9)
    assert torch.allclose(image, image.flip(1), rtol=1e-9)


def test_twofold_about_the_beam_maps_k_l_to_minus_k_l(tmp_path):
    """Interpolated F is continuous, so exact symmetry survives rounding. a* along the MOSFLM beam: a 2-fold about the beam sends (h, k, l) to (h, -k, -l), so an
    F table with that symmetry gives an image symmetric under a half turn about the centre."""
    rng = np.random.default_rng(0)
    values, lines = {}, []
    for h in range(-4, 5):
        for k in range(-4, 5):
            for l in range(-4, 5):
                f = values.setdefault((h, -k, -l), float(rng.uniform(1, 100)))
                values[(h, k, l)] = f
                lines.append(f"{h} {k} {l} {f}")
    hkl = tmp_path / "twofold.hkl"
    hkl.write_text("\n".join(lines))
    p = params_from_args(f"-cell 30 30 30 90 90 90 -hkl {hkl} -N 3 -lambda 1 -distance 200 "
                         "-detpixels 21 -pixel 0.5 -Xbeam 5 -Ybeam 5 -interpolate".split())
    assert p.crystal.interpolate
    image = simulate(p)
    assert torch.allclose(image, image.flip(0).flip(1), rtol=1e-9)


def test_mosflm_equals_custom_with_same_vectors():
    mosflm = render(SMALL + " -mosflm -Xbeam 4.1 -Ybeam 5.3")
    custom = render(SMALL + " -fdet_vector 0 0 1 -sdet_vector 0 -1 0 -odet_vector 1 0 0 -beam_vector 1 0 0 "
                            "-polar_vector 0 0 1 -spindle_axis 0 0 1 -Xbeam 5.5 -Ybeam 4.3 -pivot beam")
    assert torch.allclose(mosflm, custom, rtol=1e-12)


def test_xds_equals_dials_rotated_frame():
    xds = render(SMALL + " -xds -ORGX 10.5 -ORGY 12.5")
    dials = render(SMALL + " -dials -ORGX 10.5 -ORGY 12.5")
    assert xds.shape == dials.shape and torch.isfinite(xds).all() and torch.isfinite(dials).all()
    assert torch.allclose(xds.sum(), dials.sum(), rtol=1e-9)


HEAVY = (SMALL + " -oversample 2 -oversample_thick -oversample_polar -detector_thick 100 -detector_abs 80 "
         "-thicksteps 2 -divergence 1 -divsteps 2 -dispersion 1 -dispsteps 2 -dmin 3 -mosaic 0.5 "
         "-mosaic_dom 3 -phi 1 -osc 2 -phisteps 2 -polar 0.6")


@pytest.mark.parametrize("flags", [HEAVY, SMALL + " -N 2 -interpolate", SMALL + " -oversample 3 -oversample_omega"])
def test_chunk_size_does_not_change_the_image(flags, tmp_path):
    if "-interpolate" in flags:
        lines = [f"{h} {k} {l} {1 + (h * 7 + k * 3 + l) % 11}" for h in range(-3, 4) for k in range(-3, 4)
                 for l in range(-3, 4)]
        (tmp_path / "g.hkl").write_text("\n".join(lines))
        flags += f" -hkl {tmp_path / 'g.hkl'}"
    assert torch.allclose(render(flags + " -chunk 1000"), render(flags), rtol=1e-12, atol=0)
    # chunks of one or a few evaluations on a 4x4 ROI (on the whole 24x24 image they are some
    # 18 000 eager kernel calls each with the heavy flags, 45 s)
    roi = flags + " -roi 10 13 9 12"
    reference = render(roi)
    for chunk in (1, 7):
        assert torch.allclose(render(roi + f" -chunk {chunk}"), reference, rtol=1e-12, atol=0), chunk


def test_roi_and_mask_zero_the_other_pixels():
    p = params_from_args((SMALL + " -roi 3 10 5 12").split())
    image = simulate(p)
    inside = torch.zeros_like(image, dtype=torch.bool)
    inside[5:13, 3:11] = True
    assert (image[~inside] == 0).all() and (image[inside] > 0).all()
    mask = torch.ones(24, 24, dtype=torch.bool)
    mask[6, 4] = False
    masked = simulate(p.model_copy(update={"sampling": p.sampling.model_copy(update={"mask": mask})}))
    assert masked[6, 4] == 0 and torch.equal(masked[inside & mask], image[inside & mask])


@pytest.mark.parametrize("roi, masked", [("3 10 5 12", False), ("3 10 5 12", True),
                                          ("20 40 22 30", False), ("30 40 0 5", False)])
def test_simulate_pixels_are_the_rendered_pixels_of_simulate(roi, masked):
    """ROI inside, clipped by the detector edge, wholly outside it (no pixel), and masked."""
    p = params_from_args((SMALL + " -roi " + roi).split())
    if masked:
        mask = torch.ones(24, 24, dtype=torch.bool)
        mask[6, 4] = mask[11, 9] = False
        p = p.model_copy(update={"sampling": p.sampling.model_copy(update={"mask": mask})})
    x0, x1, y0, y1 = (int(v) for v in roi.split())
    keep = torch.zeros(24, 24, dtype=torch.bool)
    keep[y0:y1 + 1, x0:x1 + 1] = True
    if masked:
        keep &= mask
    expected = torch.nonzero(keep.reshape(-1))[:, 0]
    assert torch.equal(rendered_pixels(p), expected)
    image = simulate(p)
    assert torch.equal(simulate_pixels(p), image.reshape(-1)[expected])
    assert (image.reshape(-1)[~keep.reshape(-1)] == 0).all()


def test_float32_close_to_float64():
    a, b = render(HEAVY, torch.float32), render(HEAVY)
    assert a.dtype == torch.float32
    assert torch.allclose(a.double(), b, rtol=2e-3, atol=1e-6 * b.max().item())


def test_water_background_scales_with_fluence_squared():
    base = SMALL + " -water 50 -N 1 -default_F 0.0001"
    a, b = render(base + " -fluence 1e24"), render(base + " -fluence 2e24")
    assert torch.allclose(b / a, torch.full_like(a, 4.0), rtol=1e-6)


def test_interpolation_on_a_grid_too_small_falls_back_to_nearest(tmp_path):
    """No 4x4x4 neighbourhood fits a 3x3x3 grid: the C program switches to nearest at once."""
    lines = [f"{h} {k} {l} {5 + h + 2 * k + 3 * l}" for h in range(-1, 2) for k in range(-1, 2) for l in range(-1, 2)]
    (tmp_path / "small.hkl").write_text("\n".join(lines))
    flags = f"{SMALL} -N 2 -default_F 1 -hkl {tmp_path / 'small.hkl'}"
    assert torch.equal(render(flags + " -interpolate"), render(flags + " -nointerpolate"))
