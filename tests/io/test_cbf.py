"""Tests for nbfunc.io.cbf: miniCBF files read back with fabio, header values against the tree."""

import base64
import datetime
import hashlib

import fabio
import numpy as np
import pytest
import torch
from fabio.cbfimage import CbfImage
from fabio.compression import decByteOffset_numpy

import nbfunc
from nbfunc.cli.derive import params_from_args
from nbfunc.detector import detector_frame
from nbfunc.io.cbf import (
    COUNT_CUTOFF,
    byte_offset,
    cbf_bytes,
    count_image,
    header_convention,
    write_cbf,
)
from nbfunc.tree import stack

BASE = "-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 1.3 -distance 123.4 -pixel 0.172"
STAMP = datetime.datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=datetime.timezone.utc)


def tree(extra: str = "", pixels: str = "-detpixels 16"):
    return params_from_args(f"{BASE} {pixels} {extra}".split())


def spanning_counts() -> np.ndarray:
    """16x16 int32 counts whose neighbour differences need 1, 3 and 7 byte_offset bytes,
    with negative values and values beyond 127, 32767 and 2^30."""
    flat = np.arange(256, dtype=np.int64) % 7 - 3  # small deltas, negatives
    flat[20:40] = np.arange(20) * 200 + 128  # steps of 200 (> 127)
    flat[40] = -1
    flat[41:60] = 40000 * np.arange(1, 20)  # steps of 40000 (> 32767)
    flat[60] = -70000
    flat[61] = 2**31 - 1
    flat[62] = -(2**31) + 1
    flat[63] = 2**30 + 12345
    flat[100:110] = -(np.arange(10) ** 3) * 1000
    return flat.reshape(16, 16).astype(np.int32)


def read_back(tmp_path, data: bytes, name: str = "image.cbf"):
    path = tmp_path / name
    path.write_bytes(data)
    return path, fabio.open(str(path))


def header_records(image) -> dict:
    """The Pilatus lines as dxtbx reads them: '#' lines; a line of at most two words and two
    colons is the timestamp; otherwise drop '=' and ':', split on blanks, the second word is
    the key and the rest its value."""
    out = {}
    for record in image.header["_array_data.header_contents"].split("\n"):
        record = record.strip()
        if not record.startswith("#"):
            continue
        if len(record[1:].split()) <= 2 and record.count(":") == 2:
            out["timestamp"] = record[1:].strip()
            continue
        tokens = record.replace("=", "").replace(":", "").split()
        out[tokens[1]] = tokens[2:]
    return out


def number(record: list, i: int = 0) -> float:
    return float(record[i].strip("(),"))


class TestByteOffset:
    def test_fabio_reads_counts_back_identically(self, tmp_path):
        counts = spanning_counts()
        _, image = read_back(tmp_path, cbf_bytes(counts, tree()))
        assert image.data.dtype == np.int32
        np.testing.assert_array_equal(image.data, counts)

    def test_every_escape_width_is_used(self):
        counts = spanning_counts()
        # differences modulo 2^32 into int32, as 32-bit readers add them back
        step = np.diff(counts.ravel().astype(np.int64), prepend=0)
        step = np.abs((step + 2**31) % 2**32 - 2**31)
        widths = np.where(step <= 127, 1, np.where(step <= 32767, 3, 7))
        assert set(widths.tolist()) == {1, 3, 7}
        assert len(byte_offset(counts)) == int(widths.sum())

    def test_known_bytes(self):
        packed = byte_offset(np.array([1, 201, -32000, 70000], dtype=np.int32))
        assert packed.hex(" ") == "01 80 c8 00 80 37 82 80 00 80 70 8e 01 00"

    def test_difference_of_two_to_the_31_takes_the_64_bit_escape(self):
        counts = np.array([0, -(2**31), 0, 2**31 - 1, -1, 5], dtype=np.int32)
        packed = byte_offset(counts)
        assert packed[1:16].hex(" ") == ("80 00 80 00 00 00 80 " + "00 00 00 80 ff ff ff ff")
        decoded = decByteOffset_numpy(packed, size=counts.size, dtype=np.int64)
        np.testing.assert_array_equal(np.asarray(decoded), counts)

    def test_md5_is_of_the_packed_pixels(self, tmp_path):
        path, image = read_back(tmp_path, cbf_bytes(spanning_counts(), tree()))
        raw = CbfImage().read(str(path), only_raw=True)
        assert raw == byte_offset(spanning_counts())
        assert image.header["Content-MD5"] == base64.b64encode(hashlib.md5(raw).digest()).decode()
        assert int(image.header["X-Binary-Size"]) == len(raw)


class TestCounts:
    def test_floats_round_halves_up(self):
        photons = np.array([[0.0, 0.49, 0.5, 1.5, 2.5, -0.5, -1.5, 1e6 + 0.5]])
        assert count_image(photons).tolist() == [[0, 0, 1, 2, 3, 0, -1, 1000001]]

    def test_torch_photons_through_fabio(self, tmp_path):
        photons = torch.arange(256, dtype=torch.float64).reshape(16, 16) * 0.75
        _, image = read_back(tmp_path, cbf_bytes(photons, tree()))
        np.testing.assert_array_equal(image.data, np.floor(photons.numpy() + 0.5))

    @pytest.mark.parametrize("image, text", [
        (np.full((16, 16), np.nan), "finite"),
        (np.full((16, 16), 3e9), "signed 32-bit"),
        (np.full((16, 16), 2**31, dtype=np.int64), "signed 32-bit"),
        (np.zeros((16, 16), dtype=bool), "bool"),
        (np.zeros((16, 15)), "(16, 16)"),
    ])
    def test_bad_images_are_refused_in_one_line(self, image, text):
        with pytest.raises(ValueError) as err:
            cbf_bytes(image, tree())
        message = str(err.value)
        assert text in message and "\n" not in message and len(message) < 300


class TestHeader:
    EXTRA = "-Xbeam 0.53 -Ybeam 1.91 -phi 10 -osc 0.5 -phisteps 5 -detector_thick 450"

    def test_values_match_the_tree(self, tmp_path):
        p = tree(self.EXTRA)
        _, image = read_back(tmp_path, cbf_bytes(spanning_counts(), p, exposure_time_s=0.25,
                                                 count_cutoff=1048576, timestamp=STAMP))
        assert image.header["_array_data.header_convention"] == "GENERIC_MINI"
        assert image.header["X-Binary-Size-Fastest-Dimension"] == "16"
        assert image.header["X-Binary-Size-Second-Dimension"] == "16"
        h = header_records(image)
        pixel_m = 0.172e-3
        assert h["Pixel_size"] == ["0.000172", "m", "x", "0.000172", "m"]
        assert h["Silicon"][:3] == ["sensor,", "thickness", "0.00045"]
        assert number(h["Wavelength"]) == 1.3 and h["Wavelength"][1] == "A"
        assert number(h["Detector_distance"]) == pytest.approx(0.1234, rel=1e-14)
        # MOSFLM: Fbeam = Ybeam + pixel/2, Sbeam = Xbeam + pixel/2 (mm), from pixel (0, 0)'s corner
        beam_x, beam_y = number(h["Beam_xy"], 0), number(h["Beam_xy"], 1)
        assert beam_x == pytest.approx((1.91 + 0.086) / 0.172, rel=1e-14)
        assert beam_y == pytest.approx((0.53 + 0.086) / 0.172, rel=1e-14)
        assert h["Beam_xy"][2] == "pixels"
        assert number(h["Start_angle"]) == 10.0 and number(h["Phi"]) == 10.0
        assert number(h["Angle_increment"]) == pytest.approx(0.5, rel=1e-12)
        assert number(h["Phi_increment"]) == pytest.approx(0.5, rel=1e-12)
        assert number(h["Exposure_time"]) == 0.25 and number(h["Exposure_period"]) == 0.25
        assert number(h["Tau"]) == 0.0
        assert h["Count_cutoff"] == ["1048576", "counts"]
        assert h["Threshold_setting"] == [str(round(12398.42 / 1.3 / 2)), "eV"]
        assert h["N_excluded_pixels"] == ["0"]
        assert number(h["Detector_2theta"]) == 0.0
        when = datetime.datetime.strptime(h["timestamp"].split(".")[0], "%Y-%m-%dT%H:%M:%S")
        assert when == STAMP.replace(microsecond=0, tzinfo=None)
        assert h["timestamp"].endswith(".891")
        assert pixel_m * beam_x == pytest.approx(float(p.detector.beam_center_f) * 1e-3, rel=1e-14)

    @pytest.mark.parametrize("convention", ["-mosflm", "-xds", "-denzo", "-dials",
                                            "-detector_rotx 200"])
    def test_dxtbx_detector_origin_is_the_trees_pix0(self, tmp_path, convention):
        """dxtbx builds origin = -z D - x Bx p + y By p (fast +x, slow -y); mapped back to
        nanoBragg's frame by (x, y, z)_dxtbx = (z, y, -x) it must be the tree's pix0."""
        p = tree(f"{convention} -Xbeam 0.53 -Ybeam 1.91 -ORGX 3.3 -ORGY 11.7")
        _, image = read_back(tmp_path, cbf_bytes(np.zeros((16, 16)), p))
        h = header_records(image)
        d, px = number(h["Detector_distance"]), number(h["Pixel_size"])
        bx, by = number(h["Beam_xy"], 0), number(h["Beam_xy"], 1)
        origin = np.array([-bx * px, by * px, -d])
        frame = detector_frame(p.detector, p.beam.beam_vector)
        beam = np.array(p.beam.beam_vector, dtype=float)
        # the rotation taking the tree's fast, slow and beam onto dxtbx's +x, -y and -z
        turn = np.stack([frame.fdet.numpy(), -frame.sdet.numpy(), -beam])
        assert np.linalg.det(turn) == pytest.approx(1.0, abs=1e-12)
        # 15 significant digits of numbers below 0.2 m
        np.testing.assert_allclose(turn @ frame.pix0.numpy(), origin, rtol=0, atol=1e-15)

    def test_defaults(self, tmp_path):
        _, image = read_back(tmp_path, cbf_bytes(np.zeros((16, 16), dtype=np.int16), tree()))
        h = header_records(image)
        assert h["Count_cutoff"] == [str(COUNT_CUTOFF), "counts"]
        assert h["timestamp"] == "1970-01-01T00:00:00.000"
        assert number(h["Exposure_time"]) == 1.0
        assert number(h["Angle_increment"]) == 0.0

    def test_lines_parse_as_dxtbx_expects(self):
        data = cbf_bytes(spanning_counts(), tree())
        assert data.startswith(b"###CBF")
        head, _, binary = data.partition(b"--CIF-BINARY-FORMAT-SECTION--")
        text = head.decode("ascii")
        assert '_array_data.header_convention "GENERIC_MINI"' in text
        detector = [r for r in text.split("\r\n") if r.startswith("# Detector:")]
        assert len(detector) == 1
        vendors = ("PILATUS", "EIGER", "ADSC", "TIMEPIX")  # names dxtbx's other classes claim
        assert not any(name in detector[0].upper() for name in vendors)
        mime = binary.split(b"\r\n\r\n")[0].decode("ascii").split("\r\n")
        assert all(r.count(":") == 1 for r in mime if r.startswith("X"))
        assert any("x-CBF_BYTE_OFFSET" in r and "conversions" in r for r in mime)

    def test_equal_inputs_give_equal_bytes(self):
        assert cbf_bytes(spanning_counts(), tree()) == cbf_bytes(spanning_counts(), tree())


class TestPilatusConvention:
    @pytest.mark.parametrize("fast, slow, expected", [
        (2463, 2527, "PILATUS_1.2"), (1475, 1679, "PILATUS_1.2"), (487, 619, "PILATUS_1.2"),
        (487, 195, "PILATUS_1.2"), (16, 16, "GENERIC_MINI"), (488, 195, "GENERIC_MINI"),
        (487, 196, "GENERIC_MINI"), (2463, 16, "GENERIC_MINI"),
    ])
    def test_by_size(self, fast, slow, expected):
        assert header_convention(fast, slow) == expected

    def test_fabio_parses_the_pilatus_lines(self, tmp_path):
        p = tree("-Xbeam 10.3 -Ybeam 40.1", pixels="-detpixels_f 487 -detpixels_s 195")
        counts = (np.arange(487 * 195) % 1000).reshape(195, 487)
        _, image = read_back(tmp_path, cbf_bytes(counts, p, count_cutoff=1000000))
        assert image.header["_array_data.header_convention"] == "PILATUS_1.2"
        np.testing.assert_array_equal(image.data, counts)
        ph = image.pilatus_headers
        assert ph["Pixel_size"] == (0.000172, 0.000172)
        assert ph["Wavelength"] == 1.3
        assert ph["Count_cutoff"] == 1000000
        assert ph["Detector_distance"] == pytest.approx(0.1234, rel=1e-14)
        assert ph["Beam_xy"][0] == pytest.approx((40.1 + 0.086) / 0.172, rel=1e-14)
        assert ph["Beam_xy"][1] == pytest.approx((10.3 + 0.086) / 0.172, rel=1e-14)


class TestRefusals:
    @pytest.mark.parametrize("extra, text", [
        ("-detector_roty 5", "rotx, roty, rotz, twotheta = 0, 5, 0, 0"),
        ("-detector_rotx 5 -osc 1", "is not the fast axis"),
        ("-detector_rotz 0.01", "turned"),
        ("-twotheta 20", "twotheta = 0, 0, 0, 20"),
        ("-adxv", "against the beam"),
        ("-dials -osc 1", "spindle_axis = (0, 1, 0)"),
        ("-curved_det -nonoise", "curved"),
    ])
    def test_geometry_a_header_cannot_hold(self, extra, text):
        with pytest.raises(ValueError) as err:
            cbf_bytes(np.zeros((16, 16)), tree(extra))
        message = str(err.value)
        assert text in message and "\n" not in message and len(message) < 300

    @pytest.mark.parametrize("extra", ["-dials", "-detector_rotx 30"])
    def test_a_still_turned_about_the_beam_is_written(self, tmp_path, extra):
        """Without oscillation only the beam and the pixel plane matter: a spindle across the
        fast axis (DIALS convention) or a detector spun about the beam is expressible."""
        _, image = read_back(tmp_path, cbf_bytes(np.ones((16, 16)), tree(extra)))
        np.testing.assert_array_equal(image.data, np.ones((16, 16)))

    def test_an_ensemble_tree(self):
        with pytest.raises(ValueError, match="one file per tree"):
            cbf_bytes(np.zeros((16, 16)), stack([tree(), tree()]))

    @pytest.mark.parametrize("kwargs, text", [
        (dict(exposure_time_s=0.0), "exposure_time_s"),
        (dict(exposure_time_s=float("nan")), "exposure_time_s"),
        (dict(count_cutoff=0), "count_cutoff"),
        (dict(count_cutoff=2**31), "count_cutoff"),
        (dict(count_cutoff=1.5), "count_cutoff"),
    ])
    def test_bad_arguments(self, kwargs, text):
        with pytest.raises(ValueError, match=text):
            cbf_bytes(np.zeros((16, 16)), tree(), **kwargs)


def test_write_cbf_writes_cbf_bytes(tmp_path):
    path = tmp_path / "out.cbf"
    write_cbf(path, spanning_counts(), tree(), timestamp=STAMP)
    assert path.read_bytes() == cbf_bytes(spanning_counts(), tree(), timestamp=STAMP)


def test_a_rendered_image_is_written_as_rounded_photons(tmp_path):
    p = tree("-Xbeam 0.53 -Ybeam 1.91")
    photons = nbfunc.simulate(p)
    assert float(photons.max()) > 100  # counts that take more than one byte to step to
    _, image = read_back(tmp_path, cbf_bytes(photons, p))
    np.testing.assert_array_equal(image.data, np.floor(photons.numpy() + 0.5))
