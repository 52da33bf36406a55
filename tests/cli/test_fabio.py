"""fabio (the crystallographic image library) reads our SMV images as it reads the C program's:
same header values and the same pixels, for the reference cases that write int/noise images."""
import pytest

from _cli_support import CASES, GOLDEN, golden_spec, needs_golden

fabio = pytest.importorskip("fabio")

IMAGES = [(case, kind) for case in CASES if case.startswith(("pu18", "pu19"))
          for kind in ("intfile", "noisefile") if golden_spec(case)["outputs"].get(kind)]


@needs_golden
@pytest.mark.parametrize("case, kind", IMAGES, ids=[f"{c[:4]}-{k}" for c, k in IMAGES])
def test_fabio_reads_our_image_like_the_c_image(case, kind, golden_run):
    folder, _ = golden_run(case)
    ours = fabio.open(str(folder / {"intfile": "out_int.img", "noisefile": "out_noise.img"}[kind]))
    ref = fabio.open(str(GOLDEN / case / golden_spec(case)["outputs"][kind]))
    for key in ("SIZE1", "SIZE2", "PIXEL_SIZE", "DISTANCE", "WAVELENGTH", "BEAM_CENTER_X",
                "BEAM_CENTER_Y", "XDS_ORGX", "XDS_ORGY", "CLOSE_DISTANCE"):
        assert key in ours.header
    assert dict(ours.header) == dict(ref.header)
    assert ours.data.dtype == ref.data.dtype and ours.data.shape == ref.data.shape
    assert (ours.data == ref.data).all()


def test_both_cases_are_covered():
    if CASES:
        assert sorted(k for _, k in IMAGES) == ["intfile", "intfile", "noisefile"]
