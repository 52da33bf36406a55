"""Helpers shared by the uncertainty tests: tiny trees, toy models, eager renders."""
from __future__ import annotations

import contextlib

import torch

import nbfunc
from nbfunc.cli.derive import params_from_args

TINY = ("-cell 50 60 70 85 95 100 -misset 10 -20 30 -default_F 100 -N 5 -lambda 1 "
        "-distance 50 -pixel 0.5 -detpixels 6 -oversample 1 -water 0.01")
"""A triclinic, misset crystal on 6 x 6 pixels with a water background (mu > 0 everywhere)."""

SPOTS = ("-cell 20 20 30 90 90 90 -misset 61 27 42 -default_F 300 -N 5 -gauss_xtal -lambda 1 "
         "-distance 100 -detpixels 64 -pixel 0.3 -oversample 1 -water 0.03")
"""The pull-test truth of benchmarks/pull_test.py: direct beam and a handful of Gaussian spots."""

SPOTS_FREE = ["crystal.cell_a", "crystal.cell_c", "detector.distance", "detector.beam_center_f",
              "detector.beam_center_s", "crystal.misset[0]", "crystal.Na"]


def tree(args: str = TINY) -> nbfunc.Params:
    """A float64 tree from nanoBragg flags."""
    return params_from_args(args.split())


@contextlib.contextmanager
def eager_mode():
    """Run torch.compile'd functions eagerly (reference renders outside torch.func)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def render(p: nbfunc.Params) -> torch.Tensor:
    """The expected image of ``p`` (slow, fast), eagerly and without gradients."""
    with torch.no_grad(), eager_mode():
        return nbfunc.simulate(p)


X = torch.linspace(0.0, 1.0, 40, dtype=torch.float64)
"""Abscissa of the toy models."""


def linear(v: dict) -> torch.Tensor:
    """Toy model ``mu = a x + b`` (photons) on `X`."""
    return v["a"] * X + v["b"]


def spot(v: dict) -> torch.Tensor:
    """Toy model: a Gaussian spot ``amp exp(-(x - x0)^2 / (2 w^2)) + bg`` on 60 points in [-3, 3]."""
    x = torch.linspace(-3.0, 3.0, 60, dtype=torch.float64)
    return v["amp"] * torch.exp(-0.5 * ((x - v["x0"]) / v["w"]) ** 2) + v["bg"]


SPOT_TRUTH = {"amp": torch.tensor(500.0, dtype=torch.float64), "x0": torch.tensor(0.3, dtype=torch.float64),
              "w": torch.tensor(0.7, dtype=torch.float64), "bg": torch.tensor(10.0, dtype=torch.float64)}
