"""benchmarks/pull_test.py runs end to end and writes its JSON summary.

The script runs as ``__main__`` in this process (`runpy`), with its own ``sys.argv``: what a
``python benchmarks/pull_test.py ...`` runs, without a second interpreter's start and imports.
"""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pull_test.py"


def run_script(monkeypatch, capsys, *args: str):
    """``python benchmarks/pull_test.py *args``: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    captured = capsys.readouterr()
    return stop.value.code, captured.out, captured.err


def test_pull_test_script_writes_json(tmp_path, monkeypatch, capsys):
    out = tmp_path / "pulls.json"
    status, stdout, stderr = run_script(monkeypatch, capsys, "--replicas", "6", "--batch", "3",
                                        "--seed", "4", "--json", str(out))
    assert status == 0, stderr
    summary = json.loads(out.read_text())
    assert summary == json.loads(stdout)
    assert summary["replicas"] == 6 and summary["converged"] == 6
    assert len(summary["parameters"]) == 7
    for stats in summary["parameters"].values():
        assert {"mean", "width", "mean_err", "width_err", "sigma_at_truth", "pass"} <= set(stats)
    assert summary["runtime_s"]["total"] > 0 and summary["machine"]["cpus"] >= 1


def test_pull_test_script_rejects_too_few_replicas(monkeypatch, capsys):
    status, _, stderr = run_script(monkeypatch, capsys, "--replicas", "1")
    assert status == 2 and "--replicas must be >= 2" in stderr


def test_pull_test_script_square_spots(monkeypatch, capsys):
    """``--square`` fits the square-spot truth (the timing workload of the partial sums)."""
    status, stdout, stderr = run_script(monkeypatch, capsys, "--replicas", "4", "--batch", "4",
                                        "--seed", "1", "--square")
    assert status == 0, stderr
    summary = json.loads(stdout)
    assert "-gauss_xtal" not in summary["truth_args"] and summary["replicas"] == 4
