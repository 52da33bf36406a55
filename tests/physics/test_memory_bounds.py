"""Memory follows the work: a small ROI of a huge detector, many mosaic domains, refusals.

Peak memory is measured in a child Python process (``resource.getrusage(...).ru_maxrss``, a
high-water mark in KiB on Linux): the child imports nbfunc and builds its inputs, resets the
high-water mark to the present size (``/proc/self/clear_refs``), runs the work and reports
how far the peak rose above that. Importing torch alone takes about 300 MB and building a
masked tree copies its mask; the reset leaves both out.
"""
import functools
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from nbfunc.crystal import check_mosaic_memory, mosaic_draw_arrays, mosaic_draws, mosaic_memory_bytes
from nbfunc.params import Crystal
from nbfunc.render import rendered_pixels

MiB = 1 << 20

RENDER_ROI = """
import json, resource, sys, torch
from nbfunc.params import Beam, Crystal, Detector, Params, Sampling
from nbfunc.render import initial_carry, render_pixels_for_cli, simulate_pixels

n, masked = int(sys.argv[1]), sys.argv[2] == "mask"
mask = torch.ones(n, n, dtype=torch.bool) if masked else None
p = Params(beam=Beam(wavelength=1.0),
           detector=Detector(distance=100, beam_center_f=0.8, beam_center_s=0.8, pixel_size=0.1,
                             fpixels=n, spixels=n),
           crystal=Crystal(cell_a=50, cell_b=50, cell_c=50, Na=5, Nb=5, Nc=5, default_F=100),
           sampling=Sampling(roi=(0, 15, 0, 15), mask=mask))
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
PEAK_RESET
values = simulate_pixels(p)
pixels_values, pixels, _ = render_pixels_for_cli(p, initial_carry(p), compile=False)
assert torch.equal(values, pixels_values) and pixels.shape == (256,)
print(json.dumps({"rise": peak() - before, "finite": bool(values.isfinite().all())}))
"""


PEAK_RESET = """
try:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the high-water mark becomes the present resident size
except OSError:
    print(json.dumps({"reset": False}))
    sys.exit(0)
before = peak()
"""


@functools.lru_cache(maxsize=None)
def _child(script: str, *args: str) -> dict:
    """Run ``script`` in a fresh Python (compilation off) and return its JSON last line;
    skip where the high-water mark cannot be reset (not Linux). A run is made once per
    script and arguments (the result is cached)."""
    env = dict(os.environ, NANOBRAGG_DISABLE_COMPILE="1", OMP_NUM_THREADS="1")
    code = textwrap.dedent(script).replace("PEAK_RESET", PEAK_RESET.strip())
    done = subprocess.run([sys.executable, "-c", code, *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    if out.get("reset") is False:
        pytest.skip("the peak resident size cannot be reset here (/proc/self/clear_refs)")
    return out


def test_small_roi_of_a_huge_detector_allocates_nothing_detector_sized():
    """An 8000x8000 detector has 64e6 pixels: one float64 image of it is 512 MB, one bool
    mask 64 MB. The 16x16 ROI's render (256 pixels, one chunk) needs well under 1 MB of
    arrays; 32 MB leaves room for torch's lazily loaded kernels and allocator slack while
    catching any detector-sized array, even a bool one."""
    out = _child(RENDER_ROI, "8000", "none")
    assert out["finite"]
    assert out["rise"] < 32 * MiB, f"peak rose by {out['rise'] / MiB:.0f} MiB"


def test_small_roi_of_a_huge_masked_detector_allocates_nothing_detector_sized():
    """With a mask, the mask itself (64 MB of bool, an input) is made before the measurement;
    the render may only look at the mask's ROI window."""
    out = _child(RENDER_ROI, "8000", "mask")
    assert out["rise"] < 32 * MiB, f"peak rose by {out['rise'] / MiB:.0f} MiB"


def test_peak_memory_does_not_follow_the_detector_size(tmp_path):
    """The command line with every output on, for a 16x16 ROI of a 16x16 and of an 8000x8000
    detector: the peaks agree within 16 MiB. The large run writes 576 MB of outputs (its int
    image staged in a regular file, the others streamed into /dev/null), and one float32
    image of the detector is 256 MB, one uint8 image (the PGM) 64 MB; encoding holds one
    block of at most 4 MiB. A first run loads what the command line loads lazily."""
    script = """
    import json, resource, sys
    from nbfunc.cli.main import run
    peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    def cli(pixels):
        assert run(["-cell", "100", "100", "100", "90", "90", "90", "-default_F", "100", "-N", "5",
                    "-lambda", "1", "-distance", "100", "-detpixels", pixels, "-roi", "0", "15",
                    "0", "15", "-seed", "1", "-noprogress", "-intfile", sys.argv[1] + "/int.img",
                    "-floatfile", "/dev/null", "-pgmfile", "/dev/null", "-noisefile",
                    "/dev/null"]) == 0
    PEAK_RESET
    def reset():
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return peak()
    cli("16")
    rises = {}
    for pixels in ("16", "8000"):
        before = reset()
        cli(pixels)
        rises[pixels] = peak() - before
    print(json.dumps(rises))
    """
    rises = _child(script, str(tmp_path))
    assert (tmp_path / "int.img").stat().st_size == 512 + 2 * 8000 * 8000
    (tmp_path / "int.img").unlink()  # 128 MB
    small, large = rises["16"], rises["8000"]
    assert large - small < 16 * MiB, (small / MiB, large / MiB)


def test_rendered_pixels_of_a_mask_and_roi_in_raster_order():
    """Flat indices of the pixels inside the ROI (clipped by the detector edge) and the mask."""
    from nbfunc.params import Beam, Detector, Params, Sampling

    rng = np.random.default_rng(3)
    mask = torch.as_tensor(rng.random((9, 7)) > 0.4)
    det = Detector(distance=100, beam_center_f=0.3, beam_center_s=0.4, pixel_size=0.1,
                   fpixels=7, spixels=9)
    for roi in ((2, 5, 1, 6), (4, 20, 3, 30), None):
        p = Params(beam=Beam(wavelength=1.0), detector=det,
                   crystal=Crystal(cell_a=50, cell_b=50, cell_c=50, default_F=1),
                   sampling=Sampling(roi=roi, mask=mask))
        keep = mask.clone()
        if roi is not None:
            inside = torch.zeros_like(mask)
            inside[roi[2]:roi[3] + 1, roi[0]:roi[1] + 1] = True
            keep &= inside
        assert torch.equal(rendered_pixels(p), torch.nonzero(keep.reshape(-1))[:, 0]), roi


def test_mosaic_draws_do_not_depend_on_the_block_size():
    """The C generator's sequence runs on across blocks: any block size gives the same draws,
    and the arrays of the parameter tree hold the same values."""
    axes, scales = mosaic_draw_arrays(1000, -12345678)
    for block in (1, 7, 999):
        a, s = mosaic_draw_arrays(1000, -12345678, block=block)
        assert np.array_equal(a, axes) and np.array_equal(s, scales), block
    in_tree = Crystal(cell_a=50, cell_b=50, cell_c=50, mosaic_spread=1, mosaic_domains=1000)
    assert np.array_equal(in_tree.mosaic_axes.numpy(), axes)
    assert np.array_equal(in_tree.mosaic_scales.numpy(), scales)
    assert np.allclose(np.linalg.norm(axes, axis=1), 1.0, rtol=1e-12)
    assert scales[0] == 0 and np.all((scales[1:] >= 0) & (scales[1:] <= 1))


MOSAIC_ARRAYS = """
import json, resource, sys
from nbfunc.crystal import mosaic_draw_arrays
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
PEAK_RESET
axes, scales = mosaic_draw_arrays(int(sys.argv[1]), -12345678)
print(json.dumps({"rise": peak() - before}))
"""


def test_many_mosaic_domains_are_drawn_into_arrays_not_lists():
    """2e6 domains: the arrays are 32 bytes per domain (64 MB); Python tuples of the same draws
    would take about 180 bytes per domain (360 MB). Allow the arrays plus 32 MB for one block
    of deviates and the allocator."""
    n = 2_000_000
    out = _child(MOSAIC_ARRAYS, str(n))
    assert out["rise"] < n * 32 + 32 * MiB, f"peak rose by {out['rise'] / MiB:.0f} MiB"


def test_mosaic_memory_grows_with_domains_and_phi_steps():
    one = mosaic_memory_bytes(1000, 1, 8)
    assert mosaic_memory_bytes(2000, 1, 8) == 2 * one
    assert mosaic_memory_bytes(1000, 3, 8) > mosaic_memory_bytes(1000, 1, 8)
    assert mosaic_memory_bytes(1000, 1, 4) < one


def test_a_mosaic_that_cannot_fit_is_refused_with_the_figure():
    limit = 16 << 30
    with pytest.raises(ValueError) as err:
        check_mosaic_memory(10**8, 1, 8, limit)
    message = str(err.value)
    need = mosaic_memory_bytes(10**8, 1, 8)
    assert "\n" not in message and len(message) < 300
    assert message.startswith("-mosaic_dom 100000000 needs ")
    assert f"{need / 1e9:.1f} GB" in message and f"{limit / 1e9:.1f} GB" in message
    fewer = int(message.rsplit("at most about ", 1)[1].rstrip(")"))
    check_mosaic_memory(fewer, 1, 8, limit)  # the suggestion fits
    check_mosaic_memory(1000, 10, 8, limit)


def test_mosaic_draws_refuse_before_drawing():
    """A trillion domains would need hundreds of TB: refused at once, nothing drawn."""
    with pytest.raises(ValueError, match=r"^-mosaic_dom 1000000000000 needs \d+\.\d GB"):
        mosaic_draws(10**12, -12345678)
    assert math.isfinite(mosaic_memory_bytes(10**12, 1, 8))


ORIENTED = ("-cell 40 40 40 90 90 90 -lambda 1 -distance 60 -detpixels 24 -pixel 0.4 -N 3 "
            "-mosaic 2 -mosaic_dom 5 -phi 0 -osc 1 -phisteps 3 -roi 10 11 9 10")


@pytest.mark.parametrize("extra", [
    "-default_F 100",
    "-default_F 100 -oversample 2 -oversample_thick -oversample_polar -detector_thick 100 "
    "-detector_abs 80 -thicksteps 2 -dmin 3 -polar 0.6",
    "-interpolate",
])
def test_path_blocks_do_not_change_the_image(extra, tmp_path):
    """Chunks smaller than a pixel's evaluations split its paths into blocks (each with all
    15 orientations); blocks of one pixel follow each other in raster order, so the ordered
    sums, the interpolation switch-off and the phi carry (phi = 0 at the first step) come out
    as with every path in one chunk."""
    from nbfunc.cli.derive import params_from_args
    from nbfunc.render import initial_carry, make_plan, simulate_with_carry

    flags = f"{ORIENTED} {extra}"
    if "-interpolate" in extra:
        lines = [f"{h} {k} {l} {1 + (h * 7 + k * 3 + l) % 11}" for h in range(-2, 3)
                 for k in range(-2, 3) for l in range(-2, 3)]
        (tmp_path / "g.hkl").write_text("\n".join(lines))
        flags += f" -hkl {tmp_path / 'g.hkl'}"
    p = params_from_args(flags.split())
    reference, carry = simulate_with_carry(p, initial_carry(p))
    for chunk in (1, 4):
        q = p.model_copy(update={"sampling": p.sampling.model_copy(update={"chunk": chunk})})
        plan = make_plan(q)[0]
        assert plan.block == 1 and plan.chunks(4) == 4 * plan.n_paths
        image, after = simulate_with_carry(q, initial_carry(q))
        assert torch.allclose(image, reference, rtol=1e-12, atol=0), chunk
        assert torch.equal(after.orientation, carry.orientation)


@pytest.mark.parametrize("n_paths, n_orient", [(1, 1), (4, 3), (1, 5000), (8, 700), (3, 10**8)])
@pytest.mark.parametrize("budget", [1, 7, 4096])
def test_chunks_hold_at_most_the_budget_of_evaluations(n_paths, n_orient, budget):
    """Whatever the path and orientation counts, a chunk (pixel tile x path block, every
    orientation) holds at most ``budget`` evaluations, or one path's orientations when they
    alone exceed it, and the chunks cover every evaluation."""
    from nbfunc.render import Plan

    plan = Plan(100, 100, 1, 1, n_paths, n_orient, "square", False, (0, 0, 0), False, False,
                False, False, False, False, False, False, 0.0, 0, 0).chunked(budget, 50)
    assert plan.tile * plan.block * n_orient <= max(budget, n_orient)
    assert plan.block == n_paths or plan.tile == 1
    assert plan.chunks(50) * plan.tile * plan.block >= 50 * n_paths

