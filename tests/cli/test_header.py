"""The SMV header and the printed geometry are a function of the parameter tree
(`nbfunc.cli.header`): on every reference case they equal what the C program derives from
the flags (its variables Xbeam, Ybeam, lambda0, pixel_size, osc, ... in m and rad)."""
import pytest

from _cli_support import CASES, GOLDEN, golden_spec, needs_golden
from nbfunc.cli.derive import derive
from nbfunc.cli.rules import phi_steps, resolve_convention
from nbfunc.cli.header import (beam_centre_labels, convention_of, fits_convention,
                               header_from_tree, smv_fields)
from nbfunc.detector import detector_frame
from nbfunc.io.smv import smv_fields_mm, smv_header_text

RTD = 180.0 * 0.31830988618379067154  # the C program's 180 * M_1_PI


def c_header_text(params, f, noise: bool) -> bytes:
    """The header as the C program writes it from its own variables: the beam-centre labels
    and wavelength, pixel, phi, osc and two-theta straight from the flags (m, rad); the placed
    detector (distance, pix0, axes) from the frame both paths share."""
    conv = resolve_convention(f)
    frame = detector_frame(params.detector, params.beam.beam_vector)
    pix0, fdet, sdet = frame.pix0.tolist(), frame.fdet.tolist(), frame.sdet.tolist()
    dot = lambda u, v: sum(a * b for a, b in zip(u, v))
    distance = float(frame.distance)
    spot = [distance * b - p for b, p in zip(frame.beam.tolist(), pix0)]
    spixels = params.detector.spixels
    return smv_header_text(smv_fields_mm(
        fpixels=params.detector.fpixels, spixels=spixels, pixel_size_mm=f.pixel_size * 1000.0,
        distance_mm=distance * 1000.0, wavelength_A=f.lambda0 * 1e10,
        beam_x_mm=conv["xbeam"] * 1000.0, beam_y_mm=conv["ybeam"] * 1000.0,
        fbeam_mm=dot(fdet, spot) * 1000.0, sbeam_mm=dot(sdet, spot) * 1000.0,
        detsize_s_mm=f.detsize_s * 1000.0,
        dials_origin_mm=(1e3 * pix0[2], 1e3 * pix0[1], -1e3 * pix0[0]),
        orgx=-dot(pix0, fdet) / f.pixel_size + 0.5, orgy=-dot(pix0, sdet) / f.pixel_size + 0.5,
        close_distance_mm=float(frame.close_distance) * 1000.0, phi_deg=f.phi0 * RTD,
        osc_deg=phi_steps(f)[1] * RTD, twotheta_deg=f.detector_twotheta * RTD, noise_image=noise))


@pytest.fixture(scope="module")
def derived():
    """case -> (params, flags) of every reference case, derived once."""
    return {case: (lambda p_i: (p_i[0], p_i[1].flags))(derive(golden_spec(case)["args"],
                                                               cwd=str(GOLDEN / case)))
            for case in CASES}


@needs_golden
def test_tree_header_equals_the_c_programs_header_on_every_reference_case(derived):
    for case, (params, f) in derived.items():
        header = header_from_tree(params, f.beam_convention)
        for noise in (False, True):
            assert smv_header_text(smv_fields(header, noise)) == c_header_text(params, f, noise), case
        assert (header.convention, header.pivot) == (f.beam_convention.lower(),
                                                     resolve_convention(f)["pivot"].lower())


@needs_golden
def test_the_convention_read_from_the_tree_is_the_flags_one(derived):
    """MOSFLM and DENZO place the detector alike: a DENZO tree reads as MOSFLM."""
    assert {f.beam_convention for _, f in derived.values()} >= {"MOSFLM", "DENZO", "ADXV", "XDS",
                                                                "DIALS", "CUSTOM"}
    for case, (params, f) in derived.items():
        expected = "mosflm" if f.beam_convention == "DENZO" else f.beam_convention.lower()
        assert convention_of(params) == expected, case
        assert fits_convention(params, "DENZO") == (expected == "mosflm"), case


def test_beam_centre_labels_invert_the_conventions():
    # C: MOSFLM Fbeam = Ybeam + pixel/2, Sbeam = Xbeam + pixel/2; ADXV Sbeam = detsize_s - Ybeam
    assert beam_centre_labels("mosflm", 5.15, 6.15, 0.3, 64) == pytest.approx((6.0, 5.0))
    assert beam_centre_labels("denzo", 5.0, 6.0, 0.3, 64) == (6.0, 5.0)
    assert beam_centre_labels("adxv", 5.0, 6.0, 0.3, 64) == pytest.approx((5.0, 64 * 0.3 - 6.0))
    for name in ("xds", "dials", "custom"):
        assert beam_centre_labels(name, 5.0, 6.0, 0.3, 64) == (5.0, 6.0)
