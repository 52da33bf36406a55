"""Helpers of the command-line tests: running `nbfunc.cli.main.run` in-process, and the
reference cases made with the C program (../shared/golden) with golden_check.py's flags."""
import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from nbfunc.cli import main

WORK = Path(__file__).resolve().parents[3]
GOLDEN = WORK / "shared" / "golden"
GOLDEN_CHECK = WORK / "shared" / "tools" / "golden_check.py"
CASES = sorted(p.name for p in GOLDEN.glob("pu*") if (p / "args.json").exists())
needs_golden = pytest.mark.skipif(not CASES, reason=f"golden cases not found at {GOLDEN}")


@contextlib.contextmanager
def inside(folder: Path):
    """Run the body with ``folder`` as the working directory."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def run_cli(argv: list[str], folder: Path) -> tuple[int, str, str]:
    """``main.run(argv)`` inside ``folder``; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with inside(folder), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main.run(list(argv))
    return status, out.getvalue(), err.getvalue()


def golden_spec(case: str) -> dict:
    return json.loads((GOLDEN / case / "args.json").read_text())


def golden_argv(case: str) -> list[str]:
    """The case's flags plus the output flags golden_check.py adds."""
    spec = golden_spec(case)
    outputs = spec.get("outputs", {})
    argv = list(spec["args"]) + ["-floatfile", "out_float.bin"]
    if outputs.get("intfile"):
        argv += ["-intfile", "out_int.img"]
    argv += ["-noisefile", "out_noise.img"] if outputs.get("noisefile") else ["-nonoise"]
    return argv + ["-nopgm"]


def refuse(argv, workdir, capsys, *needles):
    """Run the command line in-process on ``argv``: status 2, one line on stderr starting
    ``nbfunc: error:`` and holding every needle, no traceback, nothing written in ``workdir``."""
    before = set(os.listdir(workdir))
    status = main.run(list(argv))
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert status == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("nbfunc: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in captured.err and "validation error" not in lines[0]
    assert set(os.listdir(workdir)) == before
