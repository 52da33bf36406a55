"""Reading a spec's images and starting amplitudes."""
import numpy as np
import pytest
import torch

from _ensemble_support import CELL, DMIN, GROUP, write_hkl
from nbfunc.ensemble.asu import asu_map
from nbfunc.ensemble.spec import RefineSpec, read_counts, start_amplitudes

SHOTS = [{"params": "a.json", "counts": "a.npy"}]


def test_float_images_as_floatfile_writes_them(tmp_path):
    image = np.arange(12, dtype="<f4").reshape(3, 4)
    image.tofile(tmp_path / "shot.bin")
    assert (read_counts(tmp_path / "shot.bin", (3, 4)) == image).all()
    with pytest.raises(ValueError, match="12 float32 values, the detector has 4 x 4"):
        read_counts(tmp_path / "shot.bin", (4, 4))


def test_start_from_an_hkl_file_listing_some_mates(tmp_path):
    amap = asu_map(GROUP, CELL, DMIN)
    f = torch.arange(1.0, amap.n_asu + 1, dtype=torch.float64)
    write_hkl(tmp_path / "all.hkl", amap, f)
    spec = RefineSpec(space_group=GROUP, dmin=DMIN, f_start="all.hkl", shots=SHOTS)
    torch.testing.assert_close(start_amplitudes(spec, tmp_path, amap), f)
    # the first reflection listed as its Friedel mate, the last one missing
    lines = (tmp_path / "all.hkl").read_text().splitlines()
    h, k, l, x = lines[0].split()
    lines[0] = f"{-int(h)} {-int(k)} {-int(l)} {x}"
    (tmp_path / "some.hkl").write_text("\n".join(lines[:-1]) + "\n")
    got = start_amplitudes(spec.model_copy(update={"f_start": "some.hkl"}), tmp_path, amap)
    torch.testing.assert_close(got[:-1], f[:-1])
    assert float(got[-1]) == pytest.approx(float(f[:-1].mean()))
