"""Refinement from a spec on one process and on two (gloo), and a failing shot on two."""
import json
import math

import numpy as np
import pytest
import torch

from _ensemble_support import DMIN, GROUP, launch, launch_forked, perturbed, truth, write_hkl
from nbfunc.ensemble.distributed import LOCAL, Comm, ShotError, agree, per_shot, shard
from nbfunc.ensemble.spec import run_refinement
from nbfunc.ensemble.synthetic import write_shots, write_spec

N_SHOTS = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three 10x10 shots written as a spec (trees with perturbed missets, amplitudes started
    from a perturbed HKL file), its truth, and its refinement on this process."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("ensemble")
    amap, f_true, shots = truth(n_shots=N_SHOTS)
    trees, f0 = perturbed(shots, f_true)
    write_hkl(folder / "start.hkl", amap, f0)
    spec = {"space_group": GROUP, "dmin": DMIN, "f_start": "start.hkl",
            "free": ["crystal.misset"], "restraints": {"F": 100.0}, "tol": 1e-2,
            "shots": write_shots(folder, shots, trees)}
    write_spec(folder / "one.json", {**spec, "out": "one_out.json"})
    write_spec(folder / "two.json", {**spec, "out": "two_out.json"})
    broken = [dict(e) for e in spec["shots"]]
    np.save(folder / "broken.npy", np.zeros((3, 3)))
    broken[2]["counts"] = "broken.npy"
    write_spec(folder / "broken.json", {**spec, "shots": broken, "out": "broken_out.json"})
    result = run_refinement(folder / "one.json", LOCAL)
    return folder, f_true, shots, result


def test_refinement_recovers_the_truth(dataset):
    folder, f_true, shots, result = dataset
    assert result["converged"] and json.loads((folder / "one_out.json").read_text()) == result
    f, sigma = np.array(result["F"]), np.array([s or math.inf for s in result["sigma_F"]])
    well = sigma < 20  # amplitudes the three shots measure (the others keep their restraint)
    assert well.sum() > 20
    z = (f - f_true.numpy())[well] / sigma[well]
    assert 0.3 < np.mean(z**2) < 3 and np.abs(z).max() < 5
    for entry, shot in zip(result["shots"], shots):
        values = np.array(list(entry["values"].values()))
        std = np.array(list(entry["std"].values()))
        assert np.abs((values - shot.params.crystal.misset.numpy()) / std).max() < 5


def test_two_processes_agree_with_one(dataset):
    folder, _, _, one = dataset
    ranks = launch_forked(2, ["refine", str(folder / "two.json")], folder)
    assert [r[0] for r in ranks] == [0, 0], ranks
    assert "3 shots" in ranks[0][1] and ranks[1][1] == ""
    two = json.loads((folder / "two_out.json").read_text())
    assert two["world_size"] == 2 and two["iterations"] == one["iterations"]
    # the sums over shots are added in another order: rounding, which the solves amplify by
    # at most the condition number of the system; compare in standard errors
    sigma = np.array([s or math.inf for s in one["sigma_F"]])
    assert np.abs(np.array(two["F"]) - np.array(one["F"])).max() < 1e-6 * sigma.min()
    for a, b in zip(one["shots"], two["shots"]):
        diff = np.array(list(a["values"].values())) - np.array(list(b["values"].values()))
        assert np.abs(diff).max() < 1e-6 * min(a["std"].values())
    assert two["objective"] == pytest.approx(one["objective"], rel=1e-12)


def test_failing_shot_is_named_and_no_rank_hangs(dataset):
    folder = dataset[0]
    ranks = launch(2, ["refine", str(folder / "broken.json")], timeout=60)
    assert [r[0] for r in ranks] == [1, 1], ranks
    message = ranks[0][2].strip()
    assert "\n" not in message and len(message) < 300
    assert "shot 2 (rank 1) failed" in message and "counts have shape (3, 3)" in message
    assert ranks[1][2] == ""


class TestCollectives:
    def test_shards_cover_every_shot_once(self):
        for world in (1, 2, 3, 4):
            parts = [list(shard(10, Comm(r, world))) for r in range(world)]
            assert sum(parts, []) == list(range(10))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1

    def test_agree_raises_the_failure(self):
        agree(LOCAL, None)
        with pytest.raises(ShotError, match="shot 3"):
            agree(LOCAL, "shot 3 failed")

    def test_per_shot_names_the_failing_shot(self):
        def fn(i):
            if i == 7:
                raise ValueError("bad\nimage")
            return i
        assert per_shot(LOCAL, [5, 6], fn, lambda i: i) == [5, 6]
        with pytest.raises(ShotError, match=r"^shot 7 \(rank 0\) failed: ValueError: bad image$"):
            per_shot(LOCAL, [6, 7, 8], fn, lambda i: i)


def test_two_ranks_generate_a_dataset(tmp_path):
    """``generate`` under torchrun's environment on two ranks: each writes its blocks, rank 0
    writes the manifest after the barrier, and the files equal one process's."""
    from nbfunc import dataset

    fields = {"flags": "-cell 40 40 60 90 90 90 -default_F 100 -N 5 -lambda 1 -distance 80 "
                       "-detpixels 8 -pixel 0.8 -oversample 1",
              "shots": 5, "seed": 2, "shots_per_file": 2,
              "vary": {"crystal.misset": "random_orientation", "crystal.Na": {"uniform": [4, 8]}}}
    (tmp_path / "spec.json").write_text(json.dumps(fields))
    ranks = launch_forked(2, ["generate", str(tmp_path / "spec.json"), str(tmp_path / "two")], tmp_path)
    assert [r[0] for r in ranks] == [0, 0], ranks
    assert json.loads(ranks[0][1])["complete"] and ranks[1][1] == ""
    spec = dataset.DatasetSpec.model_validate(fields)
    dataset.generate(spec, str(tmp_path / "one"))
    dataset.write_manifest(str(tmp_path / "one"), spec)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    for name in ("manifest.json", "shots_0000002-0000003.json"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()


def test_a_rank_whose_shot_fails_stops_generation_everywhere(tmp_path):
    """Shot 1 (on rank 1; seed 6 draws a negative Na for it and valid ones for shots 0, 2, 3)
    makes an invalid tree: rank 0, whose shots render, prints rank 1's failure on one line,
    both ranks exit 1 at the same collective, and no manifest is written."""
    fields = {"flags": "-cell 40 40 60 90 90 90 -default_F 100 -N 5 -lambda 1 -distance 80 "
                       "-detpixels 8 -pixel 0.8 -oversample 1",
              "shots": 4, "seed": 6, "shots_per_file": 1, "vary": {"crystal.Na": {"normal": [1, 3]}}}
    (tmp_path / "spec.json").write_text(json.dumps(fields))
    ranks = launch_forked(2, ["generate", str(tmp_path / "spec.json"), str(tmp_path / "out")], tmp_path)
    assert [r[0] for r in ranks] == [1, 1], ranks
    message = ranks[0][2].strip()
    assert "\n" not in message and message.startswith("nbfunc.dataset: rank 1: shot 1: the drawn values"), message
    assert ranks[1][2] == "" and not (tmp_path / "out" / "manifest.json").exists()
