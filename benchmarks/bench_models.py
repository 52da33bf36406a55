"""Cost of the diffBragg-style crystal and beam models against the plain render they extend.

    python benchmarks/bench_models.py --json benchmarks/results/models.json

On one 128 x 128 case (cubic 50 A cell, N 10, misset, float64, eager kernel: renders of this
size stay below `nbfunc.compile.COMPILE_AFTER`), each model is timed interleaved with its plain
counterpart, forward and `torch.func.grad` of the image sum over the whole tree:

* ``size_tensor``: Gaussian spots with off-diagonal domain-size terms (`crystal.Ncells_def`)
  against Gaussian spots without them (the tree's zeros still go through the same code);
* ``scale``: the per-shot scale `crystal.G` = 1.7 against G = 1 (square spots);
* ``spectrum_N``: a Gaussian bandwidth of N channels (`nbfunc.io.spectrum`, 1 % FWHM) against
  one source: the cost grows with the channels, as N sources do;
* ``mosaic_quadrature``: 10 deterministic anisotropic mosaic domains (``mosaic_model=
  "quadrature"``, ``eta`` = (0.3, 0.2, 0.25) deg) against the C program's 10 random domains
  (``-mosaic 0.3 -mosaic_dom 10``): the same number of orientations, so the same kernel work;
* ``diffuse_P-1``, ``diffuse_P4/mmm``: diffBragg's diffuse scattering (`crystal.diffuse`,
  anisotropic gamma and sigma) without symmetrisation (1 operator) and over the 8 operators of
  P4/mmm, against the same tree with diffuse off (square spots); the gradient of the plain
  tree takes the pixel partial sums, the model's is derived from the kernel;
* ``bfactor``: the per-shot B factor (`crystal.bfactor`, B = 20 A^2) against B off (same
  remark on the gradient).
"""
from __future__ import annotations

import argparse
import os

import common

BASE = ("-cell 50 50 50 90 90 90 -misset 10 20 30 -default_F 100 -N 10 -lambda 1 -distance 100 "
        "-detpixels 128 -pixel 0.2 -oversample 1")


def cases() -> dict:
    """{name: (model tree, plain tree)}."""
    import torch

    import nbfunc
    from nbfunc.io.spectrum import gaussian_spectrum, spectrum_sources

    gauss = nbfunc.params_from_args((BASE + " -gauss_xtal").split())
    square = nbfunc.params_from_args(BASE.split())
    f64 = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    out = {"size_tensor": (nbfunc.replace_leaves(gauss, {"crystal.Ncells_def": f64([1.0, -0.5, 0.8])}), gauss),
           "scale": (nbfunc.replace_leaves(square, {"crystal.G": f64(1.7)}), square)}
    for n in (1, 10):
        lam, w = gaussian_spectrum(1.0, n, fwhm=0.01)
        beam = square.beam.model_copy(update={"sources": spectrum_sources(lam, w, square.beam.beam_vector)})
        out[f"spectrum_{n}"] = (square.model_copy(update={"beam": beam}), square)
    random_mosaic = nbfunc.params_from_args((BASE + " -mosaic 0.3 -mosaic_dom 10").split())
    fields = {k: getattr(random_mosaic.crystal, k) for k in type(random_mosaic.crystal).model_fields
              if k not in ("mosaic_axes", "mosaic_scales")}
    fields.update(mosaic_model="quadrature", mosaic_spread=0.0, eta=[0.3, 0.2, 0.25])
    quadrature = random_mosaic.model_copy(update={"crystal": nbfunc.Crystal(**fields)})
    out["mosaic_quadrature"] = (quadrature, random_mosaic)

    def crystal(**fields):
        values = {**dict(square.crystal), **fields}
        return square.model_copy(update={"crystal": nbfunc.params.Crystal(**values)})
    for group in ("P-1", "P4/mmm"):
        out[f"diffuse_{group}"] = (crystal(diffuse=True, diffuse_laue_group=group, diffuse_gamma=f64([3.0, 4.0, 5.0]),
                                           diffuse_sigma=f64([0.3, 0.4, 0.5])), square)
    out["bfactor"] = (crystal(bfactor=True, B=f64(20.0)), square)
    return out


def run(args) -> dict:
    import torch

    import nbfunc

    out = {}
    for name, (model, plain) in cases().items():
        grad = lambda p: torch.func.grad(lambda q: nbfunc.simulate(q).sum())(p)  # noqa: E731
        with torch.no_grad():
            forward = common.measure_interleaved({"model": lambda: nbfunc.simulate(model),
                                                  "plain": lambda: nbfunc.simulate(plain)},
                                                 args.repeats, args.budget)
        gradient = common.measure_interleaved({"model": lambda: grad(model), "plain": lambda: grad(plain)},
                                              args.repeats, args.budget)
        for stats in (forward, gradient):
            for s in stats.values():
                s.pop("result")
        out[name] = {"forward": {**forward, "ratio": common.ratio(forward["model"], forward["plain"])},
                     "grad": {**gradient, "ratio": common.ratio(gradient["model"], gradient["plain"])}}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    out = {"benchmark": "models", "machine": common.machine(), **common.code_version(),
           "flags": BASE, "loadavg_1min_start": os.getloadavg()[0], "models": run(args),
           "loadavg_1min_end": os.getloadavg()[0]}
    common.report(out, args.json)


if __name__ == "__main__":
    main()
