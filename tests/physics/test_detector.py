import torch

from nbfunc.detector import capture_fraction, detector_frame, solid_angle
from nbfunc.params import Detector

D = torch.float64
MOSFLM = dict(fdet_vector=(0, 0, 1), sdet_vector=(0, -1, 0), odet_vector=(1, 0, 0), twotheta_axis=(0, 0, -1))


def det(**kw):
    base = dict(distance=100.0, beam_center_f=5.0, beam_center_s=6.0, pixel_size=0.1, fpixels=100,
                spixels=100, **MOSFLM)
    base.update(kw)
    return Detector(**base)


def test_beam_pivot_puts_beam_spot_at_beam_centre():
    frame = detector_frame(det(rotx=3.0, roty=-2.0, rotz=5.0), (1.0, 0.0, 0.0))
    spot = frame.distance * frame.beam - frame.pix0
    assert torch.allclose(torch.stack([spot @ frame.fdet, spot @ frame.sdet]),
                          torch.tensor([5e-3, 6e-3], dtype=D), atol=1e-15)


def test_sample_pivot_keeps_close_distance():
    frame = detector_frame(det(pivot="sample", distance_kind="close", twotheta=15.0), (1.0, 0.0, 0.0))
    assert torch.allclose(frame.close_distance, torch.tensor(0.1, dtype=D))


def test_pivots_agree_without_rotation():
    a = detector_frame(det(), (1.0, 0.0, 0.0))
    b = detector_frame(det(pivot="sample"), (1.0, 0.0, 0.0))
    for x, y in zip(a, b):
        assert torch.allclose(x, y)


def test_axes_stay_orthonormal_under_rotations():
    f = detector_frame(det(rotx=-4.0, roty=2.5, rotz=-6.0, twotheta=20.0), (1.0, 0.0, 0.0))
    m = torch.stack([f.fdet, f.sdet, f.odet])
    assert torch.allclose(m @ m.T, torch.eye(3, dtype=D), atol=1e-14)


def test_solid_angle_on_axis_and_point_pixel():
    r = torch.tensor(0.1, dtype=D)
    assert torch.allclose(solid_angle(r, r, torch.tensor(1e-4, dtype=D), False), torch.tensor(1e-6, dtype=D))
    assert torch.allclose(solid_angle(r, r, torch.tensor(1e-4, dtype=D), True), torch.tensor(100.0, dtype=D))


def test_capture_fractions_sum_to_total_absorption():
    d = torch.nn.functional.normalize(torch.tensor([1.0, 0.2, 0.1], dtype=D), dim=0)
    o = torch.tensor([1.0, 0.0, 0.0], dtype=D)
    dz, mu = torch.tensor(50e-6, dtype=D), torch.tensor(1 / 150e-6, dtype=D)
    layers = [capture_fraction(d, o, torch.tensor(float(t), dtype=D), dz, mu) for t in range(4)]
    assert torch.allclose(sum(layers), 1 - torch.exp(-4 * dz * mu / d[0]))
