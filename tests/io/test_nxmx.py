"""Tests for nbfunc.io.nxmx: the NXmx file read back with h5py (and with the nxmx reader) holds
the geometry of the tree that made it."""

import datetime
import functools
import io
import math
import sys

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py")

import nbfunc
from nbfunc.beam import sources
from nbfunc.cli.derive import params_from_args
from nbfunc.crystal import phi_rotations
from nbfunc.detector import detector_frame
from nbfunc.io.nxmx import (MOSFLM_TO_MCSTAS, USER_MASKED, check_dependencies, lab_to_mcstas,
                             nxmx_bytes, write_nxmx)

BASE = ("-cell 100 100 100 90 90 90 -default_F 100 -N 5 -lambda 1 -distance 100 -detpixels 16 "
        "-pixel 0.1")
GEOMETRIES = {
    "default": "",
    "rotated_twotheta": "-detector_rotx 5 -detector_roty -3 -detector_rotz 10 -twotheta 20",
    "xds_sample_pivot": "-xds -ORGX 4.5 -ORGY 11 -twotheta 15",
    "dials": "-dials -detector_rotz 7",
    "beam_vector_tilted": "-beam_vector 1 0.2 0.1 -Xbeam 0.7 -Ybeam 1.1",
}
PIXELS = [(0, 0), (15, 0), (0, 15), (7, 11), (15, 15)]
"""(fast i, slow j) pixel corners checked."""


@functools.lru_cache(maxsize=None)
def tree(extra: str = ""):
    """The tree of BASE plus ``extra`` flags (trees are immutable: built once per test run)."""
    return params_from_args(f"{BASE} {extra}".split())


@functools.lru_cache(maxsize=None)
def blank_file(extra: str = "") -> bytes:
    """An NXmx file of one zero frame with the geometry of ``tree(extra)``."""
    return nxmx_bytes(np.zeros((16, 16)), tree(extra))


def read(data: bytes):
    return h5py.File(io.BytesIO(data), "r")


def axis_matrix(node, value: float) -> np.ndarray:
    """4x4 matrix of one NXtransformations axis at ``value`` (its units: mm or deg)."""
    vector = np.asarray(node.attrs["vector"], dtype=float)
    out = np.eye(4)
    if node.attrs["transformation_type"] == "rotation":
        a = math.radians(value)
        k = np.cross(np.eye(3), vector)  # k @ v = vector x v
        out[:3, :3] = np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k
    else:
        out[:3, 3] = value * vector
    out[:3, 3] += node.attrs.get("offset", np.zeros(3))  # optional in NeXus
    return out


def chain(f, path: str) -> np.ndarray:
    """Cumulative 4x4 matrix of the depends_on chain starting at ``path`` (each axis at its
    first stored value)."""
    out = np.eye(4)
    while path != ".":
        node = f[path]
        out = axis_matrix(node, float(np.atleast_1d(node[()])[0])) @ out
        path = node.attrs["depends_on"]
    return out


def corner_in_file(f, i: float, j: float) -> np.ndarray:
    """McStas position (mm) of detector coordinate (fast i, slow j) pixels, from the file: the
    module offset's chain applied to i fast pixels plus j slow pixels."""
    module = f["entry/instrument/detector/module"]
    fast, slow = module["fast_pixel_direction"], module["slow_pixel_direction"]
    local = (i * fast[()] * fast.attrs["vector"] + j * slow[()] * slow.attrs["vector"])
    assert fast.attrs["depends_on"] == slow.attrs["depends_on"]
    return (chain(f, fast.attrs["depends_on"]) @ np.append(local, 1.0))[:3]


def corner_in_tree(p, i: float, j: float) -> np.ndarray:
    """nanoBragg's ``pix0 + i*pixel*fdet + j*pixel*sdet`` (m) mapped to McStas (mm)."""
    fr = detector_frame(p.detector, p.beam.beam_vector)
    lab = (fr.pix0 + i * fr.pixel_size * fr.fdet + j * fr.pixel_size * fr.sdet).numpy()
    return lab_to_mcstas(p.beam.beam_vector) @ lab * 1e3


def beam_distance_mm(p) -> float:
    """Sample to where the beam line meets the detector plane (mm)."""
    fr = detector_frame(p.detector, p.beam.beam_vector)
    return float(fr.pix0 @ fr.odet / (fr.beam @ fr.odet)) * 1e3


class TestLabToMcstas:
    def test_mosflm_known_values(self):
        rot = lab_to_mcstas((1, 0, 0))
        assert np.array_equal(rot, MOSFLM_TO_MCSTAS)
        assert np.allclose(rot @ [1, 0, 0], [0, 0, 1])   # beam -> +z
        assert np.allclose(rot @ [0, 1, 0], [0, 1, 0])   # up stays up
        assert np.allclose(rot @ [0, 0, 1], [-1, 0, 0])  # MOSFLM spindle -> the usual -x

    def test_beam_along_z_is_identity(self):
        assert np.allclose(lab_to_mcstas((0, 0, 1)), np.eye(3), atol=1e-15)

    @pytest.mark.parametrize("beam", [(1, 0.2, 0.1), (-1, 0, 0), (0, -1, 0), (0.3, -0.5, -2)])
    def test_proper_rotation_taking_beam_to_z(self, beam):
        rot = lab_to_mcstas(beam)
        assert np.allclose(rot @ rot.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(rot) == pytest.approx(1.0)
        assert np.allclose(rot @ (np.array(beam) / np.linalg.norm(beam)), [0, 0, 1], atol=1e-12)


class TestGeometry:
    @pytest.mark.parametrize("name", GEOMETRIES)
    def test_pixel_corners_follow_the_depends_on_chain(self, name):
        p = tree(GEOMETRIES[name])
        with read(blank_file(GEOMETRIES[name])) as f:
            for i, j in PIXELS:
                expected = corner_in_tree(p, i, j)
                assert np.allclose(corner_in_file(f, i, j), expected, atol=1e-9), (i, j)

    @pytest.mark.parametrize("extra", ["-phi 30", "-phi -70 -spindle_axis 0.2 -0.3 1"])
    def test_phi_axis_turns_the_crystal_as_nanobragg(self, extra):
        p = tree(extra)
        with read(blank_file(extra)) as f:
            turn = chain(f, f["entry/sample/depends_on"][()].decode())[:3, :3]
        rot = lab_to_mcstas(p.beam.beam_vector)
        assert np.allclose(turn, rot @ phi_rotations(p.crystal)[0].numpy() @ rot.T, atol=1e-12)

    def test_default_detector_axes_are_the_usual_nxmx_ones(self):
        with read(blank_file()) as f:
            module = f["entry/instrument/detector/module"]
            assert np.allclose(module["fast_pixel_direction"].attrs["vector"], [-1, 0, 0])
            assert np.allclose(module["slow_pixel_direction"].attrs["vector"], [0, -1, 0])
            assert np.allclose(f["entry/sample/transformations/phi"].attrs["vector"], [-1, 0, 0])

    def test_mosflm_corner_is_pix0_in_mcstas(self):
        p = tree()
        pix0 = detector_frame(p.detector, p.beam.beam_vector).pix0.numpy() * 1e3
        with read(blank_file()) as f:
            assert np.allclose(corner_in_file(f, 0, 0), [-pix0[2], pix0[1], pix0[0]], atol=1e-9)

    @pytest.mark.parametrize("name", GEOMETRIES)
    def test_beam_centre_is_where_the_beam_meets_the_detector(self, name):
        with read(blank_file(GEOMETRIES[name])) as f:
            det = f["entry/instrument/detector"]
            assert det["beam_center_x"].attrs["units"] == "pixel"
            spot = corner_in_file(f, det["beam_center_x"][()], det["beam_center_y"][()])
            assert np.allclose(spot, [0, 0, det["distance"][()]], atol=1e-9)

    @pytest.mark.parametrize("name", GEOMETRIES)
    def test_distance_pixel_size_wavelength(self, name):
        p = tree(GEOMETRIES[name])
        with read(blank_file(GEOMETRIES[name])) as f:
            det, entry = f["entry/instrument/detector"], f["entry"]
            assert det["distance"][()] == pytest.approx(beam_distance_mm(p))
            assert det["distance"].attrs["units"] == "mm"
            for key in ("x_pixel_size", "y_pixel_size"):
                assert det[key][()] == pytest.approx(1e-4) and det[key].attrs["units"] == "m"
            assert det["module/fast_pixel_direction"][()] == pytest.approx(0.1)
            assert list(det["module/data_size"][()]) == [16, 16]
            beam = entry["instrument/beam/incident_wavelength"]
            assert beam[()] == pytest.approx(1.0) and beam.attrs["units"] == "angstrom"
            assert entry["definition"][()] == b"NXmx"
            assert entry["start_time"][()].decode().endswith("Z")

    def test_beam_centre_of_a_beam_pivot_tree(self):
        p = tree("-Xbeam 0.7 -Ybeam 1.1 -detector_rotz 4 -twotheta 10")
        with read(nxmx_bytes(np.zeros((16, 16)), p)) as f:
            det = f["entry/instrument/detector"]
            assert det["beam_center_x"][()] == pytest.approx(float(p.detector.beam_center_f) / 0.1)
            assert det["beam_center_y"][()] == pytest.approx(float(p.detector.beam_center_s) / 0.1)

    def test_pixel_directions_are_the_placed_axes(self):
        # readers that take the vectors as written (dxtbx's FormatNexus) get the swung detector
        p = tree(GEOMETRIES["rotated_twotheta"])
        fr = detector_frame(p.detector, p.beam.beam_vector)
        with read(blank_file(GEOMETRIES["rotated_twotheta"])) as f:
            module, det = f["entry/instrument/detector/module"], f["entry/instrument/detector"]
            fast, slow = (module[f"{k}_pixel_direction"].attrs["vector"] for k in ("fast", "slow"))
            assert np.allclose(fast, MOSFLM_TO_MCSTAS @ fr.fdet.numpy())
            assert np.allclose(slow, MOSFLM_TO_MCSTAS @ fr.sdet.numpy())
            assert module["module_offset"].attrs["depends_on"] == "."
            assert det["depends_on"][()].decode() == module["module_offset"].name

    def test_sensor_thickness(self):
        with read(nxmx_bytes(np.zeros((16, 16)), tree("-detector_thick 450"))) as f:
            det = f["entry/instrument/detector"]
            assert det["sensor_thickness"][()] == pytest.approx(0.45)
            assert det["sensor_material"][()] == b"Si"

    def test_spectrum_of_a_dispersed_beam(self):
        p = tree("-dispersion 10 -dispsteps 3")
        with read(nxmx_bytes(np.zeros((16, 16)), p)) as f:
            beam = f["entry/instrument/beam"]
            assert beam["incident_wavelength"].attrs["variant"] == "incident_wavelength_1"
            wavelengths = np.sort(sources(p.beam)[1].numpy() * 1e10)
            assert np.allclose(beam["incident_wavelength_1"][()], wavelengths)
            assert np.allclose(beam["incident_wavelength_1_weight"][()], 1 / 3)


class TestFrames:
    def test_one_image_round_trips_in_photons(self):
        p = tree()
        image = nbfunc.simulate(p)
        with read(nxmx_bytes(image, p)) as f:
            data = f["entry/data/data"]
            assert data.dtype == np.float32 and data.shape == (1, 16, 16)
            assert np.array_equal(data[0], image.numpy().astype(np.float32))
            assert f["entry/instrument/detector/data"].id == data.id

    def test_phi_series_from_a_stack_of_three_trees(self):
        p = tree("-phi 0 -osc 0.5")
        trees = [nbfunc.replace_leaves(p, {"crystal.phi_start": torch.tensor(float(k))})
                 for k in range(3)]
        frames = np.random.default_rng(0).random((3, 16, 16), dtype=np.float32)
        with read(nxmx_bytes(frames, nbfunc.stack(trees))) as f:
            axes = f["entry/sample/transformations"]
            assert np.allclose(axes["phi"][()], [0, 1, 2])
            assert np.allclose(axes["phi_end"][()], [0.5, 1.5, 2.5])
            assert np.allclose(axes["phi_increment_set"][()], 0.5)
            assert f["entry/sample/depends_on"][()].decode() == axes["phi"].name
            assert np.array_equal(f["entry/data/data"][()], frames)
            assert f["entry/data/data"].chunks == (1, 16, 16)

    def test_one_tree_gives_every_frame_its_angle(self):
        with read(nxmx_bytes(np.zeros((2, 16, 16)), tree("-phi 3 -osc 0.25"))) as f:
            assert np.allclose(f["entry/sample/transformations/phi"][()], [3, 3])
            assert np.allclose(f["entry/sample/transformations/phi_end"][()], [3.25, 3.25])

    def test_stack_with_two_geometries_is_refused(self):
        trees = [tree(), tree("-distance 120")]
        with pytest.raises(ValueError, match="detector.distance differs") as err:
            nxmx_bytes(np.zeros((2, 16, 16)), nbfunc.stack(trees))
        assert "\n" not in str(err.value) and len(str(err.value)) < 300

    def test_stack_size_must_match_frames(self):
        with pytest.raises(ValueError, match="stack of shape \\(2,\\)"):
            nxmx_bytes(np.zeros((3, 16, 16)), nbfunc.stack([tree(), tree()]))

    def test_image_shape_must_match_detector(self):
        with pytest.raises(ValueError, match="expected \\(slow, fast\\) = \\(16, 16\\)"):
            nxmx_bytes(np.zeros((16, 15)), tree())


class TestMask:
    def test_roi_outside_pixels_are_masked(self):
        with read(nxmx_bytes(np.zeros((16, 16)), tree("-roi 2 5 3 9"))) as f:
            mask = f["entry/instrument/detector/pixel_mask"][()]
            assert f["entry/instrument/detector/pixel_mask_applied"][()]
        expected = np.full((16, 16), USER_MASKED, dtype=np.uint32)
        expected[3:10, 2:6] = 0
        assert mask.dtype == np.uint32 and np.array_equal(mask, expected)

    def test_given_mask(self):
        valid = np.ones((16, 16), dtype=bool)
        valid[0, 1] = valid[5, 7] = False
        with read(nxmx_bytes(np.zeros((16, 16)), tree(), torch.from_numpy(valid))) as f:
            mask = f["entry/instrument/detector/pixel_mask"][()]
        assert np.array_equal(mask != 0, ~valid)

    def test_mask_shape_is_checked(self):
        with pytest.raises(ValueError, match="mask has shape \\(4, 4\\)"):
            nxmx_bytes(np.zeros((16, 16)), tree(), np.ones((4, 4)))


class TestFiles:
    @pytest.mark.parametrize("compression", ["gzip", "bslz4"])
    def test_compressed_data_read_back_identically(self, compression):
        if compression == "bslz4":
            pytest.importorskip("hdf5plugin")
        frames = np.random.default_rng(1).random((2, 16, 16), dtype=np.float32)
        with read(nxmx_bytes(frames, tree(), compression=compression)) as f:
            data = f["entry/data/data"]
            assert np.array_equal(data[()], frames)
            plist = data.id.get_create_plist()
            filters = {plist.get_filter(k)[0] for k in range(plist.get_nfilters())}
            assert filters == ({h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE}
                               if compression == "gzip" else {32008})  # bitshuffle's id

    @pytest.mark.parametrize("module, match", [("h5py", "pip install h5py"),
                                               ("hdf5plugin", "pip install hdf5plugin")])
    def test_missing_library_names_the_install(self, monkeypatch, module, match):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
        with pytest.raises(ModuleNotFoundError, match=match) as err:
            check_dependencies("bslz4")
        assert "\n" not in str(err.value)
        with pytest.raises(ModuleNotFoundError, match=match):
            nxmx_bytes(np.zeros((16, 16)), tree(), compression="bslz4")

    def test_unknown_compression(self):
        with pytest.raises(ValueError, match="compression='lzf' is not known"):
            nxmx_bytes(np.zeros((16, 16)), tree(), compression="lzf")

    def test_write_nxmx(self, tmp_path):
        path = tmp_path / "out.h5"
        frames = np.arange(256, dtype=np.float32).reshape(16, 16)
        one_hour_east = datetime.timezone(datetime.timedelta(hours=1))
        when = datetime.datetime(2026, 1, 2, 4, 4, 5, tzinfo=one_hour_east)
        write_nxmx(path, frames, tree(), saturation_value=1000, timestamp=when)
        with h5py.File(path, "r") as f:
            assert np.array_equal(f["entry/data/data"][0], frames)
            assert f["entry/instrument/detector/saturation_value"][()] == 1000
            assert f["entry/start_time"][()] == b"2026-01-02T03:04:05.000000Z"  # in UTC
            assert f["entry/end_time"][()] == f["entry/start_time"][()]


class TestNxmxReader:
    """The file read with DIALS's NXmx reader (the `nxmx` package), where it is installed."""

    def test_reader_reports_the_tree_geometry(self):
        nxmx = pytest.importorskip("nxmx")
        p = tree(GEOMETRIES["rotated_twotheta"] + " -phi 10 -osc 0.5")
        fr = detector_frame(p.detector, p.beam.beam_vector)
        rot = lab_to_mcstas(p.beam.beam_vector)
        with read(nxmx_bytes(np.zeros((16, 16)), p)) as f:
            (entry,) = nxmx.NXmx(f).entries
            assert entry.definition == "NXmx"
            (instrument,) = entry.instruments
            (detector,) = instrument.detectors
            (module,) = detector.modules
            origin = nxmx.get_cumulative_transformation(
                nxmx.get_dependency_chain(module.fast_pixel_direction.depends_on))[0, :3, 3]
            assert np.allclose(origin, rot @ fr.pix0.numpy() * 1e3, atol=1e-9)
            assert detector.depends_on.path == module.module_offset.path
            assert np.allclose(module.fast_pixel_direction.vector, rot @ fr.fdet.numpy())
            assert np.allclose(module.slow_pixel_direction.vector, rot @ fr.sdet.numpy())
            assert module.fast_pixel_direction[()].to("mm").magnitude == pytest.approx([0.1])
            assert detector.distance.to("mm").magnitude == pytest.approx(beam_distance_mm(p))
            assert detector.sensor_material == "Si"
            (beam,) = instrument.beams
            assert beam.incident_wavelength.to("angstrom").magnitude == pytest.approx(1.0)
            (sample,) = entry.samples
            axes = nxmx.get_rotation_axes(nxmx.get_dependency_chain(sample.depends_on))
            assert np.allclose(axes.axes, [rot @ np.array(p.crystal.spindle_axis)])
            assert np.allclose(axes.angles, [10.0])
            assert sample.depends_on.end[0].to("deg").magnitude == pytest.approx(10.5)
