"""Space groups: operations, equivalent reflections, absences, cell checks."""
import numpy as np
import pytest

from nbfunc.ensemble.symmetry import (GENERATORS, check_cell, equivalents, laue_rotations,
                                      parse_triplet, representatives, resolution, space_group,
                                      systematically_absent)

ORDERS = {"P 1": 1, "P 1 21 1": 2, "C 1 2 1": 4, "P 21 21 21": 4, "I 2 2 2": 8, "P 43 21 2": 8,
          "H 3": 9, "P 61 2 2": 12, "I 2 3": 24, "P 4 3 2": 24}
CELLS = {"P 43 21 2": (40, 40, 60, 90, 90, 90), "H 3": (40, 40, 60, 90, 90, 120),
         "P 61 2 2": (40, 40, 60, 90, 90, 120), "I 2 3": (50, 50, 50, 90, 90, 90),
         "P 1 21 1": (30, 40, 50, 90, 100, 90)}


class TestOperations:
    def test_parse_triplet(self):
        rot, tran = parse_triplet("-y,x-y,z+1/3")
        assert rot.tolist() == [[0, -1, 0], [1, -1, 0], [0, 0, 1]]
        assert tran.tolist() == [0, 0, 8]
        assert parse_triplet("x-1/2,y,z")[1].tolist() == [12, 0, 0]

    @pytest.mark.parametrize("bad", ["x,y", "x,y,w", "x,,z"])
    def test_parse_refuses(self, bad):
        with pytest.raises(ValueError, match="symmetry operation"):
            parse_triplet(bad)

    @pytest.mark.parametrize("name,order", sorted(ORDERS.items()))
    def test_group_orders(self, name, order):
        assert space_group(name).order == order

    def test_spellings(self):
        assert space_group("P212121").name == "P 21 21 21"
        assert space_group("C2").name == "C 1 2 1"
        assert space_group("R3").name == "H 3"

    def test_unknown_group_is_one_line(self):
        with pytest.raises(ValueError, match="unknown") as info:
            space_group("Q 7")
        assert "\n" not in str(info.value)

    def test_table_matches_gemmi(self):
        gemmi = pytest.importorskip("gemmi")
        for name in GENERATORS:
            ours = space_group(name)
            mine = {(r.tobytes(), t.tobytes()) for r, t in zip(ours.rotations, ours.translations)}
            theirs = {(r.tobytes(), t.tobytes()) for r, t in
                      (parse_triplet(op.triplet()) for op in gemmi.SpaceGroup(name).operations())}
            assert mine == theirs, name

    def test_group_outside_table_from_gemmi(self):
        pytest.importorskip("gemmi")
        assert space_group("P 42 21 2").order == 8


class TestReflections:
    @pytest.mark.parametrize("name", sorted(CELLS))
    def test_equivalents_share_resolution(self, name):
        group, cell = space_group(name), CELLS[name]
        hkl = np.random.default_rng(0).integers(-6, 7, size=(40, 3))
        eq = equivalents(hkl, group)
        d = resolution(eq.reshape(-1, 3), cell).reshape(eq.shape[:2])
        assert np.allclose(d, d[:, :1], rtol=1e-12)

    def test_friedel_mates_share_a_representative(self):
        group = space_group("P 1")
        hkl = np.array([[1, -2, 3], [0, 0, 5]])
        assert (representatives(hkl, group) == representatives(-hkl, group)).all()
        assert len(laue_rotations(group)) == 2

    def test_representative_is_in_the_orbit_and_unique(self):
        group = space_group("P 43 21 2")
        hkl = np.random.default_rng(1).integers(-5, 6, size=(60, 3))
        reps = representatives(hkl, group)
        eq = equivalents(hkl, group)
        assert ((eq == reps[:, None]).all(-1)).any(1).all()
        assert (representatives(eq.reshape(-1, 3), group).reshape(eq.shape)
                == reps[:, None]).all()

    def test_screw_axis_absences(self):
        group = space_group("P 21 21 21")
        hkl = np.array([[1, 0, 0], [0, 3, 0], [0, 0, 5], [2, 0, 0], [1, 1, 0], [0, 0, 4]])
        assert systematically_absent(hkl, group).tolist() == [True, True, True, False, False, False]

    def test_centring_absences(self):
        group = space_group("I 2 2 2")
        assert systematically_absent(np.array([[1, 1, 1], [1, 1, 0]]), group).tolist() == [True, False]

    def test_cell_without_the_symmetry_is_refused(self):
        check_cell(space_group("P 61 2 2"), (40, 40, 60, 90, 90, 120))
        with pytest.raises(ValueError, match="does not have the symmetry of P 61 2 2"):
            check_cell(space_group("P 61 2 2"), (40, 41, 60, 90, 90, 120))
