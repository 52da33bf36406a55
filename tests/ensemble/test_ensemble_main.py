"""``python -m nbfunc.ensemble``: bad input is one line with status 2."""
import json

import pytest

from nbfunc.ensemble.__main__ import main


def run(argv, capsys):
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def write(path, spec):
    path.write_text(json.dumps(spec))
    return str(path)


GOOD = {"space_group": "P 21 21 21", "dmin": 5.0, "f_start": 100.0,
        "shots": [{"params": "missing.json", "counts": "missing.npy"}]}


@pytest.mark.parametrize("change,expected", [
    ({"dmin": -1}, "dmin: Input should be greater than 0"),
    ({"shots": []}, "shots: List should have at least 1 item"),
    ({"colour": "red"}, "colour: Extra inputs are not permitted"),
    ({"space_group": "Q 9"}, "space group 'Q 9'"),
    ({}, "missing.json"),
])
def test_bad_spec_is_one_line(tmp_path, capsys, change, expected):
    status, out, err = run(["refine", write(tmp_path / "s.json", {**GOOD, **change})], capsys)
    assert status == 2 and out == ""
    assert err.startswith("python -m nbfunc.ensemble: error: ") and err.count("\n") == 1
    assert expected in err and len(err) < 300


def test_missing_spec(tmp_path, capsys):
    status, _, err = run(["refine", str(tmp_path / "none.json")], capsys)
    assert status == 2 and "none.json" in err and err.count("\n") == 1


def test_bad_world_size(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    status, _, err = run(["refine", write(tmp_path / "s.json", GOOD)], capsys)
    assert status == 2 and "WORLD_SIZE='two'" in err
