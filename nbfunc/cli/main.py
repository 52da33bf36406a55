"""``python -m nbfunc`` / ``nbfunc``: nanoBragg's command line on the functional core.

The run: flags -> (`Params`, `RunInfo`) -> `simulate` -> outputs written as the C program
writes them (float image, SMV int and noise images, PGM, Fdump.bin), each atomically. Bad
input exits with status 2 and one line on stderr naming the flag or file; nothing is written.
"""
from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import torch

USAGE = """usage: nbfunc [nanoBragg flags] (e.g. -cell a b c al be ga -default_F F -N n -lambda A
       -distance mm -detpixels n -pixel mm -floatfile out.bin). Every flag of the C program
       nanoBragg is accepted with its meaning; see docs/cli.md. nbfunc extensions:
       -dtype float32|float64 (default float64), -chunk N (evaluations held at once),
       -device cpu|cuda."""


COMPILE_THRESHOLD = 200_000_000
"""Evaluations above which the command line compiles the kernel: below it an eager render
(about 7 M evaluations/s in float64 on one core pair) is faster than a cold compile (~20 s)."""


def _fail(message: str) -> int:
    print(f"nbfunc: error: {message}", file=sys.stderr)
    return 2


def image_statistics(image: np.ndarray, roi: tuple[int, int, int, int], mask: np.ndarray | None) -> dict:
    """max_I, mean, rms and rmsd over the rendered pixels, as the C program reports them.

    mean and rms use the ROI pixels that are not masked; rmsd uses every ROI pixel (the C
    program's second pass does not skip masked pixels). Pixel values are float32.
    """
    x0, x1, y0, y1 = roi
    sel = np.zeros(image.shape, dtype=bool)
    sel[y0:y1 + 1, x0:x1 + 1] = True
    rendered = sel & (mask if mask is not None else True)
    values = image[rendered].astype(np.float64)
    n = max(values.size, 1)
    mean = values.sum() / n
    rms = math.sqrt((values**2).sum() / (max(values.size, 2) - 1))
    roi_values = image[sel].astype(np.float64)
    rmsd = math.sqrt(((roi_values - mean) ** 2).sum() / (max(roi_values.size, 2) - 1))
    max_i = float(values.max()) if values.size and values.max() > 0 else 0.0
    where = np.argwhere(rendered & (image == max_i))[0] if max_i > 0 else (0, 0)
    return {"max_I": max_i, "max_pixel": (int(where[1]), int(where[0])), "mean": mean,
            "rms": rms, "rmsd": rmsd, "sum": float(values.sum()), "n": int(values.size)}


def run(argv: list[str]) -> int:
    """Run the nanoBragg command line ``argv`` (without the program name); return the exit status."""
    from nbfunc.cli.derive import derive
    from nbfunc.cli.flags import FlagError, HelpRequested
    from nbfunc.cli import outputs
    from nbfunc.io.errors import NbfuncInputError
    from nbfunc.render import evaluation_count, initial_carry, render_for_cli

    if not argv:
        print(USAGE)
        return 2
    try:
        params, info = derive(argv)
    except HelpRequested:
        print(USAGE)
        return 0
    except (FlagError, NbfuncInputError, ValueError) as err:
        return _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    f = info.flags
    for line in info.warnings:
        print(f"WARNING: {line}")
    device = getattr(f, "device", "cpu")
    try:
        outputs.check_writable(outputs.planned_outputs(f))
    except NbfuncInputError as err:
        return _fail(str(err))
    if device != "cpu":
        params = params.to(device=device)
    outputs.print_summary(params, info)
    start = time.perf_counter()
    image, _ = render_for_cli(params, initial_carry(params),
                              compile=evaluation_count(params) >= COMPILE_THRESHOLD)
    image = image.detach().to("cpu", torch.float64).numpy()
    elapsed = time.perf_counter() - start
    float_image = image.astype(np.float32)
    stats = image_statistics(float_image, info.roi, info.mask)
    try:
        outputs.write_all(float_image, stats, info)
    except NbfuncInputError as err:
        return _fail(str(err))
    outputs.print_statistics(stats, info, elapsed)
    return 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run(sys.argv[1:]))
