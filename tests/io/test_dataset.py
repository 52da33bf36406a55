"""Datasets of randomised shots (`nbfunc.dataset`): reproducible per shot, sharded over ranks,
resumable after a kill, with one-line errors for bad specs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from nbfunc import dataset
from nbfunc.io.errors import NbfuncInputError
from nbfunc.rotation import xyz_rotation_matrix

h5py = pytest.importorskip("h5py")

FLAGS = ("-cell 40 40 60 90 90 90 -default_F 100 -N 5 -lambda 1 -distance 80 -detpixels 12 "
         "-pixel 0.5 -oversample 1")
VARY = {"crystal.misset": "random_orientation", "crystal.Na": {"uniform": [4, 8]},
        "crystal.cell_c": {"normal": [60, 0.5]}}


def make_spec(**changes) -> dataset.DatasetSpec:
    fields = {"flags": FLAGS, "shots": 5, "seed": 7, "shots_per_file": 2, "vary": VARY, **changes}
    return dataset.DatasetSpec.model_validate(fields)


def contents(folder: str) -> dict:
    """``{file: data}`` of a dataset folder: the images of each NXmx file, the sidecars and
    the manifest (timestamps in the NXmx files left out)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".h5"):
            with h5py.File(path, "r") as f:
                out[name] = f["entry/data/data"][()]
        else:
            with open(path) as f:
                out[name] = f.read()
    return out


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        if isinstance(a[name], np.ndarray):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            assert a[name] == b[name], name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run on one rank."""
    folder = str(tmp_path_factory.mktemp("reference") / "out")
    spec = make_spec()
    dataset.generate(spec, folder)
    dataset.write_manifest(folder, spec)
    return folder, contents(folder)


def test_blocks_hold_every_shot_once_with_its_drawn_values(reference):
    folder, files = reference
    manifest = json.loads(files["manifest.json"])
    assert manifest["complete"] and manifest["missing"] == []
    assert [(f["first"], f["last"]) for f in manifest["files"]] == [(0, 1), (2, 3), (4, 4)]
    indices = []
    for entry in manifest["files"]:
        record = json.loads(files[entry["values"]])
        images = files[entry["images"]]
        assert images.shape == (entry["last"] - entry["first"] + 1, 12, 12)
        assert images.dtype == np.float32 and (images >= 0).all()
        assert np.array_equal(images, np.round(images))            # Poisson counts
        for shot in record["shots"]:
            indices.append(shot["index"])
            assert shot["values"] == dataset.shot_values(make_spec(), dataset.base_tree(make_spec()),
                                                         shot["index"])
            assert 4 <= shot["values"]["crystal.Na"] <= 8
    assert indices == list(range(5))
    # shots differ from each other (their own draws)
    assert len({json.dumps(s) for e in manifest["files"]
                for s in json.loads(files[e["values"]])["shots"]}) == 5


def test_ranks_share_the_work_and_give_the_same_files(reference, tmp_path):
    """Two ranks (run one after the other here) write the blocks k mod 2 each; the folder
    equals the one-rank run's."""
    spec = make_spec()
    folder = str(tmp_path / "out")
    assert [os.path.basename(f) for f in dataset.generate(spec, folder, rank=1, world_size=2)] == \
        ["shots_0000002-0000003.h5"]
    assert len(dataset.generate(spec, folder, rank=0, world_size=2)) == 2
    dataset.write_manifest(folder, spec)
    assert_same(contents(folder), reference[1])


_KILLED = textwrap.dedent("""
    import os, signal, sys
    import nbfunc.dataset as ds
    real = ds.write_block
    calls = []

    def dying(folder, spec, base, first, last, device="cpu"):
        calls.append(first)
        if len(calls) == 2:   # the second block: its sidecar and a half-written image file, then SIGKILL
            images, trees, values = ds.render_block(spec, base, first, last, device)
            stem = os.path.join(folder, ds.block_name(first, last))
            ds.atomic_write_bytes(stem + ".json", b"{}")
            with open(os.path.join(folder, "." + ds.block_name(first, last) + ".h5.x1y2.nbfunc-tmp"), "wb") as f:
                f.write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(folder, spec, base, first, last, device)

    ds.write_block = dying
    sys.exit(ds.main([sys.argv[1], sys.argv[2]]))
""")


def test_a_killed_run_resumes_without_losing_or_repeating_shots(reference, tmp_path):
    """A run killed (SIGKILL) while writing its second block leaves the first block, a
    sidecar and a temporary file; running again removes the temporary file, keeps the first
    block as it is and writes the rest: the folder equals an uninterrupted run's."""
    (tmp_path / "spec.json").write_text(make_spec().model_dump_json())
    folder = str(tmp_path / "out")
    run = subprocess.run([sys.executable, "-c", _KILLED, str(tmp_path / "spec.json"), folder],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr
    left = sorted(os.listdir(folder))
    assert "shots_0000000-0000001.h5" in left and "shots_0000002-0000003.h5" not in left
    assert any(name.endswith(".nbfunc-tmp") for name in left) and "manifest.json" not in left
    first_block = os.stat(os.path.join(folder, "shots_0000000-0000001.h5")).st_mtime_ns
    assert dataset.main([str(tmp_path / "spec.json"), folder]) == 0
    assert os.stat(os.path.join(folder, "shots_0000000-0000001.h5")).st_mtime_ns == first_block
    assert_same(contents(folder), reference[1])


def test_random_orientations_are_rotations_spread_over_the_sphere():
    """`misset_angles` inverts nanoBragg's ``Rz Ry Rx``; the rotations move a vector uniformly
    over the sphere (mean direction near 0, each component's mean square near 1/3)."""
    rng = np.random.default_rng(0)
    turned = []
    for i in range(2000):
        r = dataset.random_rotation(rng)
        if i < 100:
            np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
            assert np.linalg.det(r) == pytest.approx(1.0)
            angles = torch.tensor(np.radians(dataset.misset_angles(r)))
            np.testing.assert_allclose(xyz_rotation_matrix(*angles.unbind()).numpy(), r, atol=1e-12)
        turned.append(r @ np.array([0.0, 0.0, 1.0]))
    turned = np.array(turned)
    assert np.abs(turned.mean(0)).max() < 4 / math.sqrt(2000)
    np.testing.assert_allclose((turned**2).mean(0), 1 / 3, atol=0.03)


@pytest.mark.parametrize("fields, message", [
    ({"vary": {"crystal.cell_q": {"uniform": [1, 2]}}}, "crystal.cell_q is not a leaf"),
    ({"vary": {"detector.distance": {"normal": [80, 1]}}}, "set shots_per_file to 1"),
    ({"vary": {"crystal.Na": {"normal": [-50, 0.1]}}}, "shot 0: the drawn values make an invalid tree"),
])
def test_bad_specs_stop_in_one_line(fields, message, tmp_path):
    with pytest.raises(NbfuncInputError, match=message) as err:
        dataset.generate(make_spec(**fields), str(tmp_path / "out"))
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_spec_files_are_validated_in_one_line(tmp_path, capsys):
    cases = {"both.json": {"flags": FLAGS, "tree": "t.json", "shots": 2},
             "orientation.json": {"flags": FLAGS, "shots": 2, "vary": {"crystal.Na": "random_orientation"}},
             "shots.json": {"flags": FLAGS, "shots": 0}}
    for name, fields in cases.items():
        (tmp_path / name).write_text(json.dumps(fields))
        assert dataset.main([str(tmp_path / name), str(tmp_path / "out")]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nbfunc.dataset: rank 0: ") and name in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_folder_that_cannot_be_made_is_refused_in_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    for folder in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(NbfuncInputError, match="cannot be the output folder") as err:
            dataset.generate(make_spec(), str(folder))
        assert "\n" not in str(err.value)


def test_a_folder_of_another_spec_is_refused(reference):
    with pytest.raises(NbfuncInputError, match="holds a dataset of another spec"):
        dataset.generate(make_spec(seed=8), reference[0])


def test_the_ensemble_command_line_generates_too(reference, tmp_path):
    """``python -m nbfunc.ensemble generate SPEC FOLDER`` is `nbfunc.dataset`'s command line."""
    from nbfunc.ensemble.__main__ import main

    (tmp_path / "spec.json").write_text(make_spec().model_dump_json())
    assert main(["generate", str(tmp_path / "spec.json"), str(tmp_path / "out")]) == 0
    assert_same(contents(str(tmp_path / "out")), reference[1])
