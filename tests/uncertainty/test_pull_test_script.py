"""benchmarks/pull_test.py runs end to end and writes its JSON summary."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "pull_test.py"


def test_pull_test_script_writes_json(tmp_path):
    out = tmp_path / "pulls.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--replicas", "6", "--batch", "3", "--seed", "4",
                          "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    summary = json.loads(out.read_text())
    assert summary == json.loads(run.stdout)
    assert summary["replicas"] == 6 and summary["converged"] == 6
    assert len(summary["parameters"]) == 7
    for stats in summary["parameters"].values():
        assert {"mean", "width", "mean_err", "width_err", "sigma_at_truth", "pass"} <= set(stats)
    assert summary["runtime_s"]["total"] > 0 and summary["machine"]["cpus"] >= 1


def test_pull_test_script_rejects_too_few_replicas():
    run = subprocess.run([sys.executable, str(SCRIPT), "--replicas", "1"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "--replicas must be >= 2" in run.stderr
