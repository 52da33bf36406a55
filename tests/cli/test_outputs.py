"""Tests for nbfunc.cli.outputs: the C program's statistics, all-or-nothing writing, Fdump.bin."""
import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest

from nbfunc.cli import main, outputs
from nbfunc.io.hkl import read_hkl
from nbfunc.io.smv import roi_mask

SMALL = ["-cell", "20", "20", "20", "90", "90", "90", "-N", "2", "-detpixels", "12",
         "-pixel", "0.5", "-distance", "50", "-oversample", "1", "-seed", "7", "-noprogress"]
DEFAULT_NAMES = ("floatimage.bin", "intimage.img", "image.pgm", "noiseimage.img")


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
class TestImageStatistics:
    def test_known_values(self):
        image = np.array([[1, 2], [3, 4]], dtype=np.float32)
        s = outputs.image_statistics(outputs.crop(image, (0, 1, 0, 1)), None, 1e-4, 1)
        assert s["mean"] == 2.5 and s["n"] == 4 and s["sum"] == 10.0
        assert s["rms"] == pytest.approx(math.sqrt(30 / 3))
        assert s["rmsd"] == pytest.approx(math.sqrt(5 / 3))
        assert s["max_I"] == 4.0 and s["max_pixel"] == (1, 1)

    def test_mask_leaves_rmsd_over_the_whole_roi(self):
        """mean and rms skip masked pixels; the C program's rmsd pass does not."""
        image = np.array([[1, 2], [3, 100]], dtype=np.float32)
        mask = np.array([[True, True], [True, False]])
        s = outputs.image_statistics(outputs.crop(image, (0, 1, 0, 1)), mask, 1e-4, 1)
        assert s["mean"] == 2.0 and s["n"] == 3
        assert s["rms"] == pytest.approx(math.sqrt(14 / 2))
        assert s["rmsd"] == pytest.approx(math.sqrt((1 + 0 + 1 + 98**2) / 3))
        assert s["max_I"] == 3.0

    def test_roi_limits_every_figure(self):
        image = np.arange(16, dtype=np.float32).reshape(4, 4)
        s = outputs.image_statistics(outputs.crop(image, (1, 2, 1, 1)), None, 1e-4, 1)
        assert s["n"] == 2 and s["mean"] == 5.5 and s["max_pixel"] == (2, 1)

    def test_max_is_the_first_in_raster_order_at_its_last_sub_pixel(self):
        image = np.zeros((3, 4), dtype=np.float32)
        image[1, 2] = image[2, 0] = 5.0
        s = outputs.image_statistics(outputs.crop(image, (0, 4, 0, 3)), None, 3e-4, 3)
        assert s["max_pixel"] == (2, 1)
        sub = 3e-4 / 3
        assert s["max_at"] == pytest.approx((sub * (2 * 3 + 2) + sub / 2, sub * (1 * 3 + 2) + sub / 2))

    def test_no_positive_pixel_reports_zero_at_the_origin(self):
        image = np.full((2, 2), -1.0, np.float32)
        s = outputs.image_statistics(outputs.crop(image, (0, 1, 0, 1)), None, 1e-4, 2)
        assert s["max_I"] == 0.0 and s["max_at"] == (0.0, 0.0)
        assert outputs.statistics_lines(s)[0] == "max_I = 0  at 0 0"

    def test_squares_are_float32_products_summed_in_double(self):
        x = np.float32(1.0000001)
        image = np.array([[x, x]], np.float32)
        s = outputs.image_statistics(outputs.crop(image, (0, 1, 0, 0)), None, 1e-4, 1)
        assert s["rms"] == math.sqrt(2 * float(np.float32(x * x)))

    def test_a_masked_rectangle_gives_the_whole_image_figures(self):
        """Statistics of the ROI rectangle with the detector's mask equal those of the whole
        image, whose pixels outside the ROI (0 photons) enter no sum."""
        rng = np.random.default_rng(5)
        image = rng.exponential(3.0, (9, 11)).astype(np.float32)
        mask = rng.random((9, 11)) > 0.3
        roi = (2, 7, 3, 6)
        whole = image * roi_mask(image.shape, roi) * mask
        rectangle = outputs.crop(whole, roi)
        s = outputs.image_statistics(rectangle, mask, 1e-4, 2)
        inside = whole[3:7, 2:8]
        assert s["n"] == int(mask[3:7, 2:8].sum())
        assert s["sum"] == pytest.approx(float(inside.sum(dtype=np.float64)))
        slow, fast = np.unravel_index(int(np.argmax(inside)), inside.shape)
        assert s["max_pixel"] == (fast + 2, slow + 3)

    def test_lines_use_c_formats(self):
        s = {"max_I": 1225.3272705078125, "max_at": (0.01195, 0.01195), "mean": 29.26196688,
             "rms": 92.95517, "rmsd": 88.228213}
        assert outputs.statistics_lines(s) == ["max_I = 1225.33  at 0.01195 0.01195",
                                               "mean= 29.262 rms= 92.9552 rmsd= 88.2282"]


# --------------------------------------------------------------------------------------------
# the ROI rectangle and its encoding in blocks
# --------------------------------------------------------------------------------------------
def test_roi_image_places_the_rendered_pixels_and_clips_the_roi():
    """Rendered values land at their flat indices; a ROI past the edge is clipped, one
    outside the detector gives an empty rectangle."""
    shape = (5, 7)
    flat = np.array([1 * 7 + 4, 2 * 7 + 6, 4 * 7 + 4])
    image = outputs.roi_image(np.array([1.5, 2.5, 3.5]), flat, (4, 10, 1, 9), shape)
    assert image.origin == (1, 4) and image.shape == shape and image.pixels.dtype == np.float32
    expected = np.zeros(shape, np.float32)
    expected.reshape(-1)[flat] = [1.5, 2.5, 3.5]
    np.testing.assert_array_equal(image.pixels, expected[1:, 4:])
    assert outputs.roi_image(np.zeros(0), np.zeros(0), (7, 9, 0, 4), shape).pixels.shape == (5, 0)


@pytest.mark.parametrize("roi", [(0, 10, 0, 6), (3, 5, 2, 4), (0, 10, 5, 6), (10, 10, 0, 0),
                                 (4, 30, 6, 30), (11, 20, 0, 6)])
@pytest.mark.parametrize("block_bytes", [1, 5, 24, 1 << 20])
def test_raster_blocks_are_the_whole_image_bytes(roi, block_bytes):
    """Blocks joined give the whole image with 0 outside the ROI, for ROIs inside, at the
    edges, full-width, clipped and outside; no block exceeds the block size (or one ROI row)."""
    image = np.random.default_rng(1).exponential(50.0, (7, 11)).astype(np.float32)
    rectangle = outputs.crop(image, roi)
    encode = lambda rows: np.minimum(rows * 3, 65535)
    blocks = list(outputs.raster_blocks(rectangle, "<u2", encode, block_bytes))
    whole = np.where(roi_mask(image.shape, roi), encode(image), 0).astype("<u2")
    assert b"".join(blocks) == whole.tobytes()
    largest = max(block_bytes, 2 * rectangle.pixels.shape[1])
    assert all(0 < len(bytes(b)) <= largest for b in blocks)


def test_outputs_of_a_large_detector_are_encoded_block_by_block():
    """A 4000x4000 detector with a 3x3 ROI: the float output streams in blocks of at most
    BLOCK_BYTES (64 MB in all), and the ROI's bytes are where the whole image has them."""
    shape, roi = (4000, 4000), (1000, 1002, 2000, 2002)
    pixels = np.arange(1, 10, dtype=np.float32).reshape(3, 3)
    flat = (np.arange(2000, 2003)[:, None] * 4000 + np.arange(1000, 1003)).ravel()
    rectangle = outputs.roi_image(pixels.ravel(), flat, roi, shape)
    assert rectangle.origin == (2000, 1000)
    total, found = 0, {}
    for block in outputs.raster_blocks(rectangle, "<f4"):
        assert len(block) <= outputs.BLOCK_BYTES
        values = np.frombuffer(block, "<f4")
        for i in np.flatnonzero(values):
            found[total // 4 + int(i)] = float(values[i])
        total += len(block)
    assert total == 4 * 4000 * 4000
    assert found == {(2000 + r) * 4000 + 1000 + c: float(pixels[r, c])
                     for r in range(3) for c in range(3)}


PU19 = Path(__file__).resolve().parents[3] / "shared" / "golden" / "pu19_roi_dmin_fluence_intfile_autoscale"


@pytest.mark.skipif(not PU19.exists(), reason="golden cases not found")
def test_block_encoding_of_a_roi_gives_the_c_program_bytes():
    """pu19's ROI (5 40 12 58 of 64x64) encoded from its rectangle in 100-byte blocks: the
    int image, the PGM (-pgmscale 0.7) and the noise image (-seed 777 -adc 40) are the bytes
    the C program wrote (sha256 of its image.pgm and noise pixels; its int.img)."""
    from nbfunc.crng import poisson_pixels
    from nbfunc.io.pgm import pgm_header, pgm_pixels
    from nbfunc.io.smv import auto_int_scale, int_pixels

    image = np.fromfile(PU19 / "float.bin", "<f4").reshape(64, 64)
    rectangle = outputs.crop(image, (5, 40, 12, 58))
    blocks = lambda image, dtype, encode=lambda rows: rows: b"".join(
        outputs.raster_blocks(image, dtype, encode, block_bytes=100))
    scale = auto_int_scale(float(rectangle.pixels.max()))  # 61.4552, as the C program printed
    ints = blocks(rectangle, "<u2", lambda rows: int_pixels(rows, scale, 40.0))
    assert ints == (PU19 / "int.img").read_bytes()[512:]
    pgm = pgm_header(image.shape, 0.7) + blocks(rectangle, "u1", lambda r: pgm_pixels(r, 0.7))
    assert hashlib.sha256(pgm).hexdigest() == (
        "84dcdd51abdde3b24fcfbf4137e5ee0ff8203a2e540e5d999b49af5be2fbe877")
    counts, photons, overloads = poisson_pixels(rectangle.pixels, -777, 40.0)
    noise = blocks(rectangle._replace(pixels=counts), "<u2")
    assert hashlib.sha256(noise).hexdigest() == (
        "a09d95aa25120fb00f747769c934cbbf7c34fa97e7e6785260438b116316d329")
    assert (photons, overloads) == (27289.0, 0)


# --------------------------------------------------------------------------------------------
# all-or-nothing writing
# --------------------------------------------------------------------------------------------
def _earlier_run(folder) -> dict[str, bytes]:
    """Outputs of an earlier run, under the default names."""
    old = {}
    for name in DEFAULT_NAMES:
        old[name] = f"output of an earlier run: {name}".encode()
        (folder / name).write_bytes(old[name])
    return old


def _assert_untouched(folder, old):
    assert sorted(os.listdir(folder)) == sorted(old)
    for name, data in old.items():
        assert (folder / name).read_bytes() == data


def test_all_outputs_written_under_c_default_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main.run(SMALL + ["-default_F", "10"]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(DEFAULT_NAMES)
    assert (tmp_path / "floatimage.bin").stat().st_size == 4 * 144
    assert (tmp_path / "intimage.img").stat().st_size == 512 + 2 * 144


def test_failed_rename_restores_earlier_outputs(tmp_path, monkeypatch, capsys):
    """A rename failing after the first one leaves the earlier outputs, and no temporary file."""
    monkeypatch.chdir(tmp_path)
    old = _earlier_run(tmp_path)
    real, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device", dst)
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", failing_replace)
    assert main.run(SMALL + ["-default_F", "10"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["nbfunc: error: cannot write image.pgm: No space left on device; no output was "
                   "written"]
    _assert_untouched(tmp_path, old)


def test_failure_while_staging_leaves_nothing_new(tmp_path, monkeypatch):
    """An exception in the middle of writing: no new file, no temporary, earlier files intact."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "floatimage.bin").write_bytes(b"earlier")
    real, count = outputs.atomic.stage, []

    def stage_then_fail(target, data, temps):
        count.append(target)
        if len(count) == 3:
            raise RuntimeError("simulated crash while writing")
        return real(target, data, temps)

    monkeypatch.setattr(outputs.atomic, "stage", stage_then_fail)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main.run(SMALL + ["-default_F", "10"])
    assert os.listdir(tmp_path) == ["floatimage.bin"]
    assert (tmp_path / "floatimage.bin").read_bytes() == b"earlier"


def test_partial_write_is_removed(tmp_path, monkeypatch, capsys):
    """A write that stops half way (disk full) leaves no partial file behind."""
    monkeypatch.chdir(tmp_path)
    old = _earlier_run(tmp_path)
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    assert main.run(SMALL + ["-default_F", "10"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    _assert_untouched(tmp_path, old)


def test_same_name_for_two_outputs_keeps_the_last_written(tmp_path, monkeypatch):
    """As in C, a name given to two outputs holds the one written last (noise after int)."""
    monkeypatch.chdir(tmp_path)
    assert main.run(SMALL + ["-default_F", "10", "-intfile", "x.img", "-noisefile", "x.img",
                             "-nopgm"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["floatimage.bin", "x.img"]
    assert main.run(SMALL + ["-default_F", "10", "-intfile", "a.img", "-noisefile", "b.img",
                             "-nopgm"]) == 0
    assert (tmp_path / "x.img").read_bytes() == (tmp_path / "b.img").read_bytes()


# --------------------------------------------------------------------------------------------
# Fdump.bin
# --------------------------------------------------------------------------------------------
HKL = "".join(f"{h} {k} {l} {1 + abs(h) + 2 * abs(k) + 3 * abs(l)}\n"
              for h in range(-3, 4) for k in range(-2, 3) for l in range(-1, 3))


def _parse_c_fdump(raw: bytes):
    """Fdump.bin as the C program writes it: "%d %d %d %d %d %d\\n\\f", then doubles with one
    padding slot per axis, h slowest."""
    head, body = raw.split(b"\n\f", 1)
    h0, h1, k0, k1, l0, l1 = (int(x) for x in head.split())
    shape = (h1 - h0 + 2, k1 - k0 + 2, l1 - l0 + 2)
    grid = np.frombuffer(body, dtype=np.float64).reshape(shape)
    return (h0, h1, k0, k1, l0, l1), grid


def test_hkl_run_writes_fdump_and_a_default_F_run_reuses_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "P1.hkl").write_text(HKL)
    first = SMALL + ["-hkl", "P1.hkl", "-default_F", "0.5", "-floatfile", "first.bin"]
    assert main.run(first) == 0
    assert "writing dump file for next time: Fdump.bin" in capsys.readouterr().out

    ranges, grid = _parse_c_fdump((tmp_path / "Fdump.bin").read_bytes())
    assert ranges == (-3, 3, -2, 2, -1, 2)
    assert grid[3 + 1, 2 - 1, 1 + 2] == 1 + 1 + 2 + 6          # F(1, -1, 2)
    assert np.all(grid[-1] == 0) and np.all(grid[:, -1] == 0) and np.all(grid[:, :, -1] == 0)
    expected = read_hkl(tmp_path / "P1.hkl", 0.5).F
    assert np.array_equal(grid[:-1, :-1, :-1], expected)

    assert main.run(SMALL + ["-default_F", "0.5", "-floatfile", "second.bin"]) == 0
    assert "reading Fs from Fdump.bin" in capsys.readouterr().out
    assert (tmp_path / "first.bin").read_bytes() == (tmp_path / "second.bin").read_bytes()

    (tmp_path / "Fdump.bin").unlink()
    assert main.run(SMALL + ["-default_F", "0.5", "-floatfile", "third.bin"]) == 0
    assert (tmp_path / "third.bin").read_bytes() != (tmp_path / "first.bin").read_bytes()


def test_outputs_get_the_permissions_fopen_would_give(tmp_path, monkeypatch):
    import os
    from nbfunc.cli import main

    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        assert main.run("-cell 50 50 50 90 90 90 -default_F 10 -N 2 -detpixels 8 -nonoise -nopgm".split()) == 0
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "floatimage.bin").st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(tmp_path / "intimage.img").st_mode & 0o777) == oct(0o644)


def test_failed_fifo_write_rolls_back_the_files_and_says_what_went_out(tmp_path, monkeypatch,
                                                                      capsys):
    """FIFOs are written after the files are in place; if one fails, the files go back."""
    monkeypatch.chdir(tmp_path)
    old = _earlier_run(tmp_path)
    os.mkfifo(tmp_path / "pipe.img")

    def reader_went_away(target, data, opened):
        opened.append(target.path)
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(outputs.atomic, "write_in_place", reader_went_away)
    assert main.run(SMALL + ["-default_F", "10", "-noisefile", "pipe.img"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "nbfunc: error: cannot write pipe.img: Broken pipe; no file output was changed, but "
        "pipe.img got part of its data"]
    assert sorted(os.listdir(tmp_path)) == sorted([*old, "pipe.img"])
    for name, data in old.items():
        assert (tmp_path / name).read_bytes() == data
