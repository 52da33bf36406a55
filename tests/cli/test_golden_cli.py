"""Swapping test: for every reference case, our command line run in a copy of the case folder,
with the flags golden_check.py adds, passes golden_check.py's criteria for the float, int and
noise images (its comparison functions and thresholds are imported, not copied)."""
import numpy as np
import pytest

from _cli_support import CASES, GOLDEN, golden_spec, needs_golden


@needs_golden
@pytest.mark.parametrize("case", CASES, ids=[c[:4] for c in CASES])
def test_outputs_pass_golden_check(case, golden_run, golden_check):
    folder, _ = golden_run(case)
    outputs = golden_spec(case).get("outputs", {})
    ref = np.fromfile(GOLDEN / case / "float.bin", dtype="<f4")
    out = np.fromfile(folder / "out_float.bin", dtype="<f4")
    result = golden_check.compare_float(ref, out)
    assert result["ok"], result
    for kind, ours, same_min in (("intfile", "out_int.img", golden_check.INT_SAME_MIN),
                                 ("noisefile", "out_noise.img", golden_check.NOISE_SAME_MIN)):
        if outputs.get(kind):
            result = golden_check.compare_smv(GOLDEN / case / outputs[kind], folder / ours, same_min)
            assert result["ok"], (kind, result)
        else:
            assert not (folder / ours).exists()
