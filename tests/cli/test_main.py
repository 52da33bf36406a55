"""Tests for nbfunc.cli.main: help, and what a run prints compared with the C program's stdout."""
import contextlib
import io
import re
from pathlib import Path

import pytest

from _cli_support import CASES, GOLDEN, golden_spec, needs_golden
from nbfunc.cli import main, outputs
from nbfunc.cli.derive import derive
from nbfunc.cli.flags import known_flags

STAT_LINES = ("max_I = ", "mean= ", "intfile_scale = ", "pgm_scale = ", " photons on noise image")


@pytest.mark.parametrize("flag", ["-h", "-help", "--help"])
def test_help_lists_the_main_flags_and_exits_0(flag, capsys):
    assert main.run([flag]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    listed = set(re.findall(r"^  (-\w+)", captured.out, re.MULTILINE))
    for name in ("-hkl", "-mat", "-cell", "-pixel", "-detpixels", "-distance", "-lambda", "-energy",
                 "-floatfile", "-intfile", "-noisefile", "-pgmfile", "-scale", "-adc", "-mosflm",
                 "-xds", "-adxv", "-denzo", "-dials", "-roi", "-noprogress", "-dtype", "-device"):
        assert name in listed, name


def test_help_wins_over_other_flags(capsys):
    assert main.run(["-distance", "abc", "--help"]) == 0
    assert "usage: nbfunc" in capsys.readouterr().out


@needs_golden
@pytest.mark.parametrize("case", CASES, ids=[c[:4] for c in CASES])
def test_statistics_lines_equal_the_c_programs(case, golden_run):
    """max_I (with its position in m), mean/rms/rmsd, intfile_scale and the noise photon count."""
    _, stdout = golden_run(case)
    pick = lambda text: [l for l in text.splitlines() if any(k in l for k in STAT_LINES)]
    c_lines = pick((GOLDEN / case / "stdout.txt").read_text())
    assert c_lines[:2] and c_lines[0].startswith("max_I = ")
    assert pick(stdout) == c_lines


def _c_facts(text: str) -> dict:
    det = re.search(r"distance=(\S+) detsize=\S+\s+pixel=(\S+) meters \((\d+)x(\d+) pixels\)", text)
    return {"convention": re.search(r"^(\w+) convention selected", text, re.M).group(1),
            "pivot": "sample" if "pivoting detector around sample" in text else "beam",
            "beam_centre_m": [float(x) for x in re.search(r"Fbeam=(\S+) Sbeam=(\S+)", text).groups()],
            "distance_m": float(det.group(1)), "pixel_m": float(det.group(2)),
            "pixels": (int(det.group(3)), int(det.group(4))),
            "sources": int(re.search(r"^\s+(\d+) sources", text, re.M).group(1)),
            "domains": int(re.search(r"(\d+) mosaic domains over", text).group(1)),
            "phisteps": int(re.search(r"(\d+) phi steps from", text).group(1)),
            "oversample": int(re.search(r"(\d+)x\d+ pixel oversample", text).group(1)),
            "layers": int(re.search(r"in (\d+) layers", text).group(1))}


SUMMARY = re.compile(
    r"(\w+) convention, pivot (\w+); beam centre Fbeam=(\S+) Sbeam=(\S+) mm, distance=(\S+) mm.*\n"
    r"\s+(\d+)x(\d+) pixels of (\S+) mm; (\d+) sources, (\d+) mosaic domains, (\d+) phi steps, "
    r"(\d+)x\d+ sub-pixels, (\d+) sensor layers")


@needs_golden
@pytest.mark.parametrize("case", CASES, ids=[c[:4] for c in CASES])
def test_geometry_summary_agrees_with_the_c_program(case):
    params, info = derive(golden_spec(case)["args"], cwd=str(GOLDEN / case))
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        outputs.print_summary(params, info)
    g = SUMMARY.search(text.getvalue()).groups()
    c = _c_facts((GOLDEN / case / "stdout.txt").read_text())
    assert (g[0], g[1]) == (c["convention"], c["pivot"])
    approx = lambda mm, m: pytest.approx(m, rel=1e-5, abs=1e-12) == float(mm) / 1e3
    assert approx(g[2], c["beam_centre_m"][0]) and approx(g[3], c["beam_centre_m"][1])
    assert approx(g[4], c["distance_m"]) and approx(g[7], c["pixel_m"])
    assert (int(g[5]), int(g[6])) == c["pixels"]
    assert [int(x) for x in g[8:]] == [c["sources"], c["domains"], c["phisteps"], c["oversample"],
                                       c["layers"]]


@needs_golden
def test_run_prints_in_the_c_programs_order(golden_run):
    case = next(c for c in CASES if c.startswith("pu18"))
    _, stdout = golden_run(case)
    order = [l.split()[0] for l in stdout.splitlines()
             if l.startswith(("writing", "max_I", "mean=", "intfile_scale")) or "photons on" in l]
    assert order == ["writing", "max_I", "mean=", "intfile_scale", "writing", "120119", "writing"]
    assert "writing out_noise.img as 2-byte integers" in stdout


def test_docs_list_every_flag():
    """docs/cli.md has a table row (or alias cell) for every spelling the parser knows."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    missing = [name for name in known_flags() if f"`{name}`" not in doc]
    assert not missing, missing
