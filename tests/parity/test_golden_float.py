"""Float images of every reference case made with the C program, through the Python API.

Each case's flags go through `derive` (file names resolved in the case folder) and then
`simulate`, or `simulate_with_carry` from `initial_carry` for the cases tagged
``phi_carryover`` (the C program's phi=0 reuse). The comparison uses the thresholds of
../shared/tools/golden_check.py on the float32 image the command line would write.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from nbfunc.cli.derive import derive
from nbfunc.render import initial_carry, simulate, simulate_with_carry

GOLDEN = Path(__file__).resolve().parents[2].parent / "shared" / "golden"
CASES = json.loads((GOLDEN / "index.json").read_text())["cases"] if GOLDEN.exists() else []

pytestmark = [pytest.mark.parity,
              pytest.mark.skipif(not CASES, reason=f"reference cases not found at {GOLDEN}")]


def compare(ref: np.ndarray, out: np.ndarray) -> dict:
    """golden_check's float criteria: correlation, sum ratio, max difference / max."""
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    corr = float(np.corrcoef(ref64, out64)[0, 1]) if ref64.std() > 0 and out64.std() > 0 else 1.0
    return {"corr": corr, "sum_ratio": float(out64.sum() / ref64.sum()),
            "max_diff_frac": float(np.abs(ref64 - out64).max() / np.abs(ref64).max())}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_float_image_matches_c(case):
    folder = GOLDEN / case["name"]
    args = json.loads((folder / "args.json").read_text())["args"]
    params, _ = derive(args, cwd=str(folder))
    if "phi_carryover" in case["features"]:
        image, _ = simulate_with_carry(params, initial_carry(params))
    else:
        image = simulate(params)
    out = image.detach().numpy().astype(np.float32).ravel()
    ref = np.fromfile(folder / "float.bin", dtype="<f4")
    assert out.shape == ref.shape
    m = compare(ref, out)
    assert m["corr"] >= 0.99999 and abs(m["sum_ratio"] - 1) <= 1e-5 and m["max_diff_frac"] <= 1e-3, m


def test_carryover_cases_need_the_carry():
    """The physically correct path must differ from C where the C program carries phi over."""
    case = next(c for c in CASES if "phi_carryover" in c["features"])
    folder = GOLDEN / case["name"]
    params, _ = derive(json.loads((folder / "args.json").read_text())["args"], cwd=str(folder))
    ref = np.fromfile(folder / "float.bin", dtype="<f4")
    m = compare(ref, simulate(params).numpy().astype(np.float32).ravel())
    assert m["max_diff_frac"] > 1e-2
