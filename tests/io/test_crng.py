"""Tests for nbfunc.crng: the C program's random numbers.

Known values marked "from the C functions" were printed by the C program's own ran1, poidev,
gaussdev, gammln, uniform3Ddev, mosaic_rotation_umat and umat2misset (copied unchanged from
nanoBragg.c into a small harness, gcc -O3, x86-64, glibc).
"""

from pathlib import Path

import numpy as np
import pytest

from nbfunc import crng

GOLDEN = Path(__file__).resolve().parents[3] / "shared" / "golden"
PU18 = GOLDEN / "pu18_water_noise_seed_flux_scale_adc"
needs_golden = pytest.mark.skipif(not PU18.exists(), reason=f"golden cases not found at {GOLDEN}")


class TestRan1:
    def test_known_values(self):
        # from the C functions: ran1 with idum = -12345678
        rng = crng.CRandom(-12345678)
        got = [crng.ran1(rng) for _ in range(6)]
        expected = [0.765989304, 0.023453664, 0.589726627, 0.535101593, 0.982231438, 0.693016112]
        np.testing.assert_allclose(got, expected, rtol=0, atol=5e-10)
        assert rng.idum == 1086690778

    def test_values_are_float32(self):
        rng = crng.CRandom(-7)
        for _ in range(100):
            v = crng.ran1(rng)
            assert float(np.float32(v)) == v
            assert 0.0 < v < 1.0

    def test_zero_seed_and_positive_seed_reusing_table(self):
        # from the C functions: idum = 0 is treated as 1; then idum = +5 keeps the loaded
        # shuffle table (C's static iy != 0) and only replaces the generator value
        rng = crng.CRandom(0)
        got = [crng.ran1(rng) for _ in range(3)]
        np.testing.assert_allclose(got, [0.415999353, 0.091964893, 0.75641048], atol=5e-10)
        assert rng.idum == 1551901393
        rng.idum = 5
        got = [crng.ran1(rng) for _ in range(3)]
        np.testing.assert_allclose(got, [0.52970022, 0.930436492, 0.383502066], atol=5e-10)
        assert rng.idum == 1670799424

    def test_positive_seed_on_fresh_state_starts_from_one(self):
        a, b = crng.CRandom(987), crng.CRandom(0)
        assert [crng.ran1(a) for _ in range(5)] == [crng.ran1(b) for _ in range(5)]

    def test_block_equals_scalar_calls(self):
        a, b = crng.CRandom(-99), crng.CRandom(-99)
        scalar = [crng.ran1(a) for _ in range(10000)]
        assert crng.ran1_block(b, 10000) == scalar
        assert (a.idum, a.iy, a.iv) == (b.idum, b.iy, b.iv)

    def test_determinism_and_copy(self):
        a = crng.CRandom(-42)
        crng.ran1(a)
        b = a.copy()
        assert [crng.ran1(a) for _ in range(20)] == [crng.ran1(b) for _ in range(20)]


def test_seed_from_flag_matches_c_atoi():
    assert crng.seed_from_flag(2468) == -2468
    assert crng.seed_from_flag("2468") == -2468
    assert crng.seed_from_flag(" -17x") == 17
    assert crng.seed_from_flag("1.9") == -1
    assert crng.seed_from_flag("abc") == 0


class TestDeviates:
    def test_poidev_known_values_all_branches(self):
        # from the C functions: poidev in sequence from idum = -2468
        rng = crng.CRandom(-2468)
        means = [0.0, 0.5, 3.7, 11.9, 12.0, 50.5, 1000.0, 123456.7, 2e6, 5e7, 7.25, 12.0]
        got = [crng.poidev(m, rng) for m in means]
        expected = [0, 1, 4, 14, 12, 47, 1034, 123587, 1999241.88, 50005008, 4, 6]
        np.testing.assert_array_equal(np.float32(got), np.float32(expected))
        assert rng.idum == 1531489469

    def test_gaussdev_known_values(self):
        # from the C functions: gaussdev from idum = -1 (pairs share one Box-Muller draw)
        rng = crng.CRandom(-1)
        got = [crng.gaussdev(rng) for _ in range(4)]
        expected = [-0.836853981, -0.172279969, 0.187117606, 1.61543977]
        np.testing.assert_allclose(got, expected, rtol=0, atol=5e-9)

    def test_gammln_known_values(self):
        # from the C functions
        got = [crng.gammln(x) for x in (1.0, 13.0, 51.5, 1e5)]
        np.testing.assert_allclose(got, [0.0, 19.987215, 150.441223, 1051287.75], rtol=1e-8)

    def test_uniform3ddev_known_values_and_unit_length(self):
        # from the C functions, idum = -5
        rng = crng.CRandom(-5)
        first = crng.uniform3Ddev(rng)
        expected = [-0.73643285, 0.0264429878, 0.675993621, 0.472760648]
        np.testing.assert_allclose(first, expected, atol=5e-9)
        for _ in range(50):
            dx, dy, dz, dr = crng.uniform3Ddev(rng)
            assert abs(dx * dx + dy * dy + dz * dz - 1.0) < 1e-6
            assert 1e-2 <= dr <= 1.0

    def test_poidev_mean_is_close_to_requested_mean(self):
        rng = crng.CRandom(-3)
        for mean in (0.7, 5.0, 40.0):
            draws = [crng.poidev(mean, rng) for _ in range(4000)]
            assert abs(np.mean(draws) - mean) < 5 * np.sqrt(mean / 4000)

    def test_poidev_nan_mean_gives_nan(self):
        assert np.isnan(crng.poidev(float("nan"), crng.CRandom(-1)))


class TestRotations:
    def test_mosaic_rotation_umat_known_values(self):
        # from the C functions: mosaic_rotation_umat((float) 0.5 deg, ..., idum = -12345678)
        rng = crng.CRandom(-12345678)
        u0 = crng.mosaic_rotation_umat(0.5 / 57.29577951308232, rng)
        expected = [
            0.99996612375044724, 0.0082266013279829672, -0.00027273081166300314,
            -0.0082272825073718553, 0.99996277932151434, -0.002598421470118665,
            0.00025134448292042335, 0.0026005772787805153, 0.99999658690605941,
        ]
        assert u0.ravel().tolist() == expected
        u2 = crng.mosaic_rotation_umat(0.5 / 57.29577951308232, rng)
        u2 = crng.mosaic_rotation_umat(0.5 / 57.29577951308232, rng)
        assert u2[2, 2] == 0.99997974839192127

    @pytest.mark.parametrize("spread", [1e-4, 0.01, 0.5, 90.0])
    def test_orthonormal_with_unit_determinant(self, spread):
        rng = crng.CRandom(-11)
        for _ in range(20):
            u = crng.mosaic_rotation_umat(spread, rng)
            np.testing.assert_allclose(u @ u.T, np.eye(3), atol=1e-12)
            assert np.linalg.det(u) == pytest.approx(1.0, abs=1e-12)

    def test_mosaic_umats_first_domain_identity_and_determinism(self):
        a = crng.mosaic_umats(np.deg2rad(0.5), 5, seed=-12345678)
        b = crng.mosaic_umats(np.deg2rad(0.5), 5, seed=-12345678)
        assert a.shape == (5, 3, 3) and a.dtype == np.float64
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a[0], np.eye(3))
        # domain 1 is the second draw of the generator: domain 0's draws are consumed
        rng = crng.CRandom(-12345678)
        crng.mosaic_rotation_umat(np.deg2rad(0.5), rng)
        np.testing.assert_array_equal(a[1], crng.mosaic_rotation_umat(np.deg2rad(0.5), rng))
        assert not np.array_equal(a, crng.mosaic_umats(np.deg2rad(0.5), 5, seed=-1))

    def test_mosaic_umats_rejects_zero_domains(self):
        with pytest.raises(ValueError, match="domains"):
            crng.mosaic_umats(0.01, 0, seed=-1)

    def test_random_misset_known_values(self):
        # from the C functions: mosaic_rotation_umat(90.0, umat, idum = -777) then umat2misset
        got = crng.random_misset(-777)
        assert got == (0.051421023130003796, 0.029504999879754152, 0.088319121605049608)

    def test_umat2misset_inverts_xyz_rotation(self):
        rx, ry, rz = 0.3, -0.2, 1.1
        (cx, cy, cz), (sx, sy, sz) = np.cos([rx, ry, rz]), np.sin([rx, ry, rz])
        Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        np.testing.assert_allclose(crng.umat2misset(Rz @ Ry @ Rx), (rx, ry, rz), atol=1e-12)


class TestPoissonNoise:
    @needs_golden
    def test_reproduces_c_noise_image(self):
        """The golden case pu18 (-seed 2468 -adc 30) noise.img, pixel for pixel."""
        image = np.fromfile(PU18 / "float.bin", "<f4").reshape(64, 64)
        ref = np.frombuffer((PU18 / "noise.img").read_bytes()[512:], "<u2").reshape(64, 64)
        noise, photons, overloads = crng.poisson_noise(
            image, crng.seed_from_flag(2468), (0, 64, 0, 64), 30.0
        )
        assert noise.dtype == np.uint16 and noise.shape == (64, 64)
        np.testing.assert_array_equal(noise, ref)
        assert round(photons) == 120119 and overloads == 0  # as the C program printed

    def test_roi_pixels_only_and_sequence_skips_outside(self):
        image = np.full((6, 8), 3.0, np.float32)
        full, _, _ = crng.poisson_noise(image, -5, (0, 7, 0, 5), 10.0)
        roi, _, _ = crng.poisson_noise(image, -5, (2, 4, 1, 3), 10.0)
        assert (roi[:, :2] == 0).all() and (roi[:, 5:] == 0).all()
        assert (roi[0] == 0).all() and (roi[4:] == 0).all()
        assert (roi[1:4, 2:5] >= 10).all()
        # the ROI's first pixel takes the generator's first draws, not the image's (1, 2) draws
        first = crng.poidev(3.0, crng.CRandom(-5))
        assert roi[1, 2] == int(first + 10.0)
        assert full[0, 0] == int(first + 10.0)

    def test_overloads_clamp(self):
        image = np.array([[1e7, 0.0]], np.float32)
        noise, photons, overloads = crng.poisson_noise(image, -9, (0, 1, 0, 0), 40.0)
        assert noise[0, 0] == 65535 and overloads == 1
        assert noise[0, 1] == 40
        assert photons > 9e6

    def test_deterministic_per_seed(self):
        image = np.random.default_rng(0).exponential(4.0, (16, 16)).astype(np.float32)
        a = crng.poisson_noise(image, -1, (0, 15, 0, 15), 40.0)[0]
        b = crng.poisson_noise(image, -1, (0, 15, 0, 15), 40.0)[0]
        c = crng.poisson_noise(image, -2, (0, 15, 0, 15), 40.0)[0]
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)

    def test_matches_scalar_poidev_sequence(self):
        image = np.array([[0.0, 0.3, 13.5], [900.0, 2.5e6, 4.0]], np.float32)
        noise, photons, _ = crng.poisson_noise(image, -77, (0, 2, 0, 1), 0.0)
        rng = crng.CRandom(-77)
        draws = [crng.poidev(v, rng) for v in image.ravel().tolist()]
        expected = np.minimum(np.trunc(draws), 65535).astype(np.uint16)
        np.testing.assert_array_equal(noise.ravel(), expected)
        assert photons == sum(draws)

    @pytest.mark.parametrize("block", [1, 3, 7])
    def test_blocks_carry_the_generator(self, monkeypatch, block):
        """Drawn NOISE_BLOCK pixels at a time, the uniform stream, the Gaussian spare (means
        above 1e6) and the photon sum run on across blocks: any block size gives the counts
        and sum of one scalar poidev sequence."""
        means = np.array([[0.0, 2.5, 13.5, 2.5e6, 3e6], [7.0, 2.5e6, 900.0, 0.3, 4e6]], np.float32)
        rng = crng.CRandom(-31)
        draws = [crng.poidev(v, rng) for v in means.ravel().tolist()]
        monkeypatch.setattr(crng, "NOISE_BLOCK", block)
        counts, photons, overloads = crng.poisson_pixels(means, -31, 5.0)
        expected = np.minimum(np.trunc(np.add(draws, 5.0)), 65535).astype(np.uint16)
        np.testing.assert_array_equal(counts.ravel(), expected)
        assert counts.shape == means.shape and photons == sum(draws) and overloads == 4

    def test_rejects_non_2d(self):
        with pytest.raises(ValueError, match="shape"):
            crng.poisson_noise(np.zeros(5), -1, (0, 4, 0, 0), 40.0)


def test_random_misset_matches_c_program_output():
    # nanoBragg ... -misset random -misset_seed 4242 printed
    # "random orientation misset angles: -163.713095 -27.840487 -175.580921 deg"
    rtd = 180.0 * 0.31830988618379067154
    got = ["%f" % (a * rtd) for a in crng.random_misset(crng.seed_from_flag(4242))]
    assert got == ["-163.713095", "-27.840487", "-175.580921"]


@needs_golden
def test_poisson_noise_roi_matches_c_program():
    """pu19's float image through the C program with -seed 777 (its ROI 5 40 12 58)."""
    import hashlib

    case = GOLDEN / "pu19_roi_dmin_fluence_intfile_autoscale"
    image = np.fromfile(case / "float.bin", "<f4").reshape(64, 64)
    noise, photons, overloads = crng.poisson_noise(image, -777, (5, 40, 12, 58), 40.0)
    # sha256 of the noise.img pixel bytes the C program wrote; it printed
    # "27289 photons on noise image (0 overloads)"
    digest = hashlib.sha256(noise.astype("<u2").tobytes()).hexdigest()
    assert digest == "a09d95aa25120fb00f747769c934cbbf7c34fa97e7e6785260438b116316d329"
    assert (photons, overloads) == (27289.0, 0)
    assert (noise[:12] == 0).all() and (noise[:, 41:] == 0).all()
