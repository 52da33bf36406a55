"""Tests for nbfunc.io.smv: SMV reading, the C program's header, int-file conversion."""

import math
from pathlib import Path

import numpy as np
import pytest

from nbfunc.io.errors import NbfuncInputError
from nbfunc.io.smv import (
    SMVHeaderFields,
    auto_int_scale,
    header_value,
    int_image,
    int_pixels,
    read_smv,
    smv_fields_mm,
    smv_header,
    write_smv,
)

GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "golden"
PU18 = GOLDEN / "pu18_water_noise_seed_flux_scale_adc"
PU19 = GOLDEN / "pu19_roi_dmin_fluence_intfile_autoscale"
needs_golden = pytest.mark.skipif(not PU18.exists(), reason=f"golden cases not found at {GOLDEN}")

SIMPLE_KEYS = {
    "pixel_size_mm": "PIXEL_SIZE", "distance_mm": "DISTANCE", "wavelength_A": "WAVELENGTH",
    "beam_center_x_mm": "BEAM_CENTER_X", "beam_center_y_mm": "BEAM_CENTER_Y",
    "adxv_center_x_mm": "ADXV_CENTER_X", "adxv_center_y_mm": "ADXV_CENTER_Y",
    "mosflm_center_x_mm": "MOSFLM_CENTER_X", "mosflm_center_y_mm": "MOSFLM_CENTER_Y",
    "denzo_x_beam_mm": "DENZO_X_BEAM", "denzo_y_beam_mm": "DENZO_Y_BEAM",
    "xds_orgx": "XDS_ORGX", "xds_orgy": "XDS_ORGY", "close_distance_mm": "CLOSE_DISTANCE",
    "phi_deg": "PHI", "osc_start_deg": "OSC_START", "osc_range_deg": "OSC_RANGE",
    "twotheta_deg": "TWOTHETA",
}


def fields_from_header(header: dict) -> SMVHeaderFields:
    """SMVHeaderFields rebuilt from a parsed header dict (exact keys)."""
    values = {name: float(header[key]) for name, key in SIMPLE_KEYS.items()}
    origin = tuple(float(v) for v in header["DIALS_ORIGIN"].split(","))
    return SMVHeaderFields(
        fpixels=int(header["SIZE1"]), spixels=int(header["SIZE2"]), dials_origin_mm=origin, **values
    )


def example_fields(**changes) -> SMVHeaderFields:
    base = dict(
        fpixels=3, spixels=2, pixel_size_mm=0.1, distance_mm=100.0, wavelength_A=1.0,
        beam_center_x_mm=0.1, beam_center_y_mm=0.1, adxv_center_x_mm=0.15,
        adxv_center_y_mm=0.05, mosflm_center_x_mm=0.1, mosflm_center_y_mm=0.1,
        denzo_x_beam_mm=0.15, denzo_y_beam_mm=0.15, dials_origin_mm=(-0.15, 0.15, -100.0),
        xds_orgx=1.5, xds_orgy=1.0, close_distance_mm=100.0, phi_deg=0.0,
        osc_start_deg=0.0, osc_range_deg=0.5, twotheta_deg=0.0,
    )
    base.update(changes)
    return SMVHeaderFields(**base)


class TestHeader:
    @needs_golden
    @pytest.mark.parametrize("path", [PU18 / "int.img", PU18 / "noise.img", PU19 / "int.img"])
    def test_reproduces_c_header_bytes(self, path):
        image = read_smv(path)
        raw = path.read_bytes()[:512]
        assert smv_header(fields_from_header(image.header)) == raw
        assert image.header_text.encode("latin-1") == raw

    @needs_golden
    def test_fields_in_header_units_match_c(self):
        # pu18: -mosflm, 64 x 0.3 mm pixels, distance 85 mm, lambda 1.1 A;
        # stdout: Xbeam=Ybeam=0.00975, Fbeam=Sbeam=0.0099, dials origin -9.9 9.9 -85
        fields = smv_fields_mm(
            fpixels=64, spixels=64, pixel_size_mm=0.3, distance_mm=85.0, wavelength_A=1.1,
            beam_x_mm=9.75, beam_y_mm=9.75, fbeam_mm=9.9, sbeam_mm=9.9,
            dials_origin_mm=(-9.9, 9.9, -85.0), orgx=33.5, orgy=33.5,
            close_distance_mm=85.0, phi_deg=0.0, osc_deg=0.0, twotheta_deg=0.0,
        )
        assert smv_header(fields) == (PU18 / "int.img").read_bytes()[:512]

    def test_layout(self):
        raw = smv_header(example_fields())
        assert len(raw) == 512
        text = raw.decode("ascii")
        assert text.startswith("{\nHEADER_BYTES=512;\nDIM=2;\nBYTE_ORDER=little_endian;\n")
        assert "\nDIALS_ORIGIN=-0.15,0.15,-100\nXDS_ORGX=1.5;\n" in text
        assert text.rstrip(" ").endswith("DETECTOR_SN=000;\nBEAMLINE=fake;\n}\f")

    def test_percent_g_formatting(self):
        text = smv_header(example_fields(distance_mm=123456789.0, wavelength_A=1e-7)).decode()
        assert "DISTANCE=1.23457e+08;" in text and "WAVELENGTH=1e-07;" in text

    def test_denzo_signed_zero_differs_between_int_and_noise(self):
        kw = dict(
            fpixels=1, spixels=1, pixel_size_mm=0.1, distance_mm=100.0, wavelength_A=1.0,
            beam_x_mm=0.0, beam_y_mm=0.0, fbeam_mm=-0.0, sbeam_mm=-0.0,
            dials_origin_mm=(0, 0, 0), orgx=0, orgy=0, close_distance_mm=100.0,
            phi_deg=0, osc_deg=0, twotheta_deg=0,
        )
        assert b"DENZO_X_BEAM=-0;" in smv_header(smv_fields_mm(**kw))
        assert b"DENZO_X_BEAM=0;" in smv_header(smv_fields_mm(noise_image=True, **kw))

    def test_header_value_follows_c_valueof(self):
        text = "{\nDISTANCE=85;\nXDS_ORGX=33.5;\nCLOSE_DISTANCE=70;\nODD\n}"
        assert header_value(text, "DISTANCE") == 70.0  # last occurrence: CLOSE_DISTANCE
        assert header_value(text, "ORGX") == 33.5
        assert header_value(text, "PHI") is None
        assert header_value(text, "ODD") == 0.0  # no '=' after it
        assert header_value({"SIZE1": "64", "BEAM": "x"}, "SIZE1") == 64.0
        assert header_value({"BEAM": "x"}, "BEAM") == 0.0


class TestReadWrite:
    def test_round_trip_and_fabio(self, tmp_path):
        fabio = pytest.importorskip("fabio")
        data = np.arange(6, dtype=np.uint16).reshape(2, 3) * 1000 + 7
        path = tmp_path / "image.img"
        write_smv(path, example_fields(), data)
        image = read_smv(path)
        np.testing.assert_array_equal(image.data, data)
        assert image.header["SIZE1"] == "3" and image.header["DIALS_ORIGIN"] == "-0.15,0.15,-100"
        img = fabio.open(str(path))
        np.testing.assert_array_equal(img.data, data)
        assert float(img.header["DISTANCE"]) == 100.0 and float(img.header["PIXEL_SIZE"]) == 0.1

    @needs_golden
    def test_reads_big_endian_and_mask_header(self, tmp_path):
        raw = (PU18 / "int.img").read_bytes()
        swapped = raw[:512].replace(b"little_endian", b"big_endian   ") + np.frombuffer(
            raw[512:], "<u2"
        ).astype(">u2").tobytes()
        (tmp_path / "big.img").write_bytes(swapped)
        expected = read_smv(PU18 / "int.img").data
        np.testing.assert_array_equal(read_smv(tmp_path / "big.img").data, expected)
        mask = read_smv(GOLDEN / "pu03_adxv_energy_nopolar_mask" / "mask.img")
        assert mask.data.shape == (56, 64)
        assert header_value(mask.header_text, "PIXEL_SIZE") == 0.35
        assert header_value(mask.header_text, "DISTANCE") is None

    def test_header_bytes_other_than_512(self, tmp_path):
        header = "{\nHEADER_BYTES=1024;\nSIZE1=2;\nSIZE2=1;\n}".encode().ljust(1024, b" ")
        (tmp_path / "a.img").write_bytes(header + np.array([5, 6], "<u2").tobytes())
        np.testing.assert_array_equal(read_smv(tmp_path / "a.img").data, [[5, 6]])

    @pytest.mark.parametrize(
        "raw, expected",
        [
            (b"", "expected an SMV header"),
            (b"P5\n3 2\n255\n" + bytes(6), "expected an SMV header"),
            (b"{\nHEADER_BYTES=512;\nSIZE1=2;\nSIZE2=2;\n}".ljust(518), "found 6 data bytes"),
            (b"{\nHEADER_BYTES=512;\nSIZE1=0;\nSIZE2=2;\n}".ljust(512), "SIZE1 is 0"),
            (b"{\nHEADER_BYTES=512;\nSIZE2=2;\n}".ljust(512), "SIZE1 is None"),
            (b"{\nHEADER_BYTES=512;\nTYPE=float;\nSIZE1=1;\nSIZE2=1;\n}".ljust(516), "TYPE=float"),
            (b"{\nHEADER_BYTES=512;\nBYTE_ORDER=mid;SIZE1=1;SIZE2=1;\n}".ljust(514), "BYTE_ORDER"),
            (b"{\nHEADER_BYTES=4096;\n}", "expected an SMV header"),
        ],
    )
    def test_bad_files(self, tmp_path, raw, expected):
        path = tmp_path / "bad.img"
        path.write_bytes(raw)
        with pytest.raises(NbfuncInputError, match=expected) as info:
            read_smv(path)
        assert str(path) in str(info.value)

    def test_missing_file(self, tmp_path):
        with pytest.raises(NbfuncInputError, match="none.img"):
            read_smv(tmp_path / "none.img")

    def test_unwritable_and_wrong_shape(self, tmp_path):
        data = np.zeros((2, 3), np.uint16)
        with pytest.raises(NbfuncInputError, match="no_dir"):
            write_smv(tmp_path / "no_dir" / "a.img", example_fields(), data)
        with pytest.raises(NbfuncInputError, match="expected uint16 \\(2, 3\\)"):
            write_smv(tmp_path / "a.img", example_fields(), np.zeros((3, 2), np.uint16))


class TestIntImage:
    @needs_golden
    def test_matches_c_int_image_with_scale(self):
        image = np.fromfile(PU18 / "float.bin", "<f4").reshape(64, 64)
        got = int_image(image, 0.8, 30.0, (0, 64, 0, 64))  # -scale 0.8 -adc 30
        np.testing.assert_array_equal(got, read_smv(PU18 / "int.img").data)

    @needs_golden
    def test_matches_c_int_image_autoscale_roi(self):
        image = np.fromfile(PU19 / "float.bin", "<f4").reshape(64, 64)
        scale = auto_int_scale(float(image.max()))
        assert "%g" % scale == "61.4552"  # as the C program printed
        got = int_image(image, scale, 40.0, (5, 40, 12, 58))
        np.testing.assert_array_equal(got, read_smv(PU19 / "int.img").data)

    def test_rounding_clamping_and_roi(self):
        image = np.array([[1.0, 2.4, 1e9, -5.0, math.nan]], np.float32)
        got = int_image(image, 1.0, 0.1, (0, 4, 0, 0))
        np.testing.assert_array_equal(got, [[1, 3, 65535, 0, 0]])
        assert int_image(image, 1.0, 0.1, (1, 1, 0, 0)).tolist() == [[0, 3, 0, 0, 0]]
        # the sum is rounded to float32 before floorf: 100.49999999 + 0.5 -> 101.0f -> 101
        assert int_image(np.array([[100.0]]), 1.0, 0.49999999, (0, 0, 0, 0))[0, 0] == 101
        assert int_image(np.array([[100.0]]), 1.0, 0.4999, (0, 0, 0, 0))[0, 0] == 100

    def test_pixels_of_any_shape_are_the_roi_values(self):
        """int_pixels converts the ROI's pixels alone; int_image is it inside the ROI, 0 out."""
        image = np.random.default_rng(2).exponential(900.0, (5, 6)).astype(np.float32)
        whole = int_image(image, 70.0, 12.0, (1, 3, 2, 4))
        assert int_pixels(image[2:5, 1:4], 70.0, 12.0).dtype == np.uint16
        np.testing.assert_array_equal(int_pixels(image[2:5, 1:4], 70.0, 12.0), whole[2:5, 1:4])
        np.testing.assert_array_equal(int_pixels(image[2:5, 1:4].ravel(), 70.0, 12.0),
                                      whole[2:5, 1:4].ravel())
        assert whole.sum() == whole[2:5, 1:4].sum()

    def test_auto_int_scale(self):
        assert auto_int_scale(110.0) == 500.0
        assert auto_int_scale(0.0) == 1.0


class TestBoundedRead:
    """`read_smv` reads the header and the pixels it announces, never an endless input."""

    def test_dev_zero_is_refused_after_one_header(self):
        with pytest.raises(NbfuncInputError, match="expected an SMV header"):
            read_smv("/dev/zero")

    def test_trailing_bytes_are_not_read(self, tmp_path):
        data = np.arange(12, dtype=np.uint16).reshape(3, 4)
        path = tmp_path / "x.img"
        write_smv(path, example_fields(fpixels=4, spixels=3), data)
        path.write_bytes(path.read_bytes() + b"\xff" * 1000)
        image = read_smv(path)
        np.testing.assert_array_equal(image.data, data)

    def test_a_header_declaring_too_many_pixels_is_refused(self, tmp_path):
        path = tmp_path / "huge.img"
        path.write_bytes(b"{\nHEADER_BYTES=512;\nSIZE1=100000;\nSIZE2=100000;\n}\n".ljust(512, b" "))
        with pytest.raises(NbfuncInputError, match="100000 x 100000 pixels"):
            read_smv(path)
