"""Helpers shared by the transform tests: tiny configurations, finite differences, eager mode.

Every tree is float64 with a detector of a few pixels, so a render takes milliseconds and a
full Jacobian well under a second. ``CONFIGS`` names configurations in which the listed
leaves change the image; together they cover every leaf of both source kinds (checked by
``test_jacobians.test_every_leaf_is_covered``). Fixtures built from them live in
``conftest.py``.
"""
from __future__ import annotations

import contextlib

import torch
import torch.utils._pytree as pytree

import nbfunc
from nbfunc.cli.derive import params_from_args
from nbfunc.tree import get_leaf, replace_leaves

BASE = ("-cell 50 60 70 85 95 100 -misset 10 -20 30 -default_F 100 -N 5 -lambda 1 "
        "-distance 50 -pixel 0.5 -detpixels 6 -oversample 1")
"""A triclinic, misset crystal on 6 x 6 pixels reaching |h| ~ 3: every cell, detector and
beam leaf changes the image."""

CONFIGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "triclinic": ("", (
        "beam.wavelength", "beam.kahn_factor", "beam.fluence", "detector.distance",
        "detector.beam_center_f", "detector.beam_center_s", "detector.pixel_size",
        "crystal.cell_a", "crystal.cell_b", "crystal.cell_c", "crystal.cell_alpha",
        "crystal.cell_beta", "crystal.cell_gamma", "crystal.misset", "crystal.Na", "crystal.Nb",
        "crystal.Nc", "crystal.phi_start", "crystal.default_F", "crystal.G")),
    "rotated_detector": ("-twotheta 5 -detector_rotx 1 -detector_roty 2 -detector_rotz 3", (
        "detector.rotx", "detector.roty", "detector.rotz", "detector.twotheta",
        "detector.distance", "detector.beam_center_f")),
    "sample_pivot": ("-pivot sample -twotheta 3 -detector_roty 2", (
        "detector.distance", "detector.beam_center_f", "detector.beam_center_s",
        "detector.roty", "detector.twotheta")),
    "divergence_dispersion": ("-dispersion 10 -dispsteps 2 -hdivrange 1 -hdivsteps 2 "
                              "-vdivrange 1 -vdivsteps 2", (
        "beam.sources.dispersion", "beam.sources.hdivrange", "beam.sources.vdivrange",
        "beam.wavelength")),
    "absorption": ("-detector_thick 100 -detector_abs 50 -thicksteps 2", (
        "detector.thickness", "detector.mu", "detector.distance")),
    "mosaic_phi": ("-mosaic 0.5 -mosaic_dom 4 -phi 10 -osc 6 -phisteps 3", (
        "crystal.mosaic_spread", "crystal.phi_start", "crystal.phi_step")),
    "mosaic_quadrature": ("-mosaic_quadrature -mosaic 0.2 -eta_tensor 0.5 0.3 0.4 0.1 -0.05 0.08 "
                          "-mosaic_dom 8", ("crystal.eta", "crystal.mosaic_spread")),
    "diffuse": ("-diffuse -diffuse_gamma 3 4 2.5 -diffuse_sigma 0.3 0.4 0.5 -laue_group P4/mmm "
                "-bfactor 20", ("crystal.diffuse_gamma", "crystal.diffuse_sigma", "crystal.B",
                                "crystal.cell_a", "crystal.misset")),
    "hkl": ("-hkl {hkl}", ("crystal.fhkl", "crystal.default_F")),
    "water": ("-water 10", ("crystal.water_size", "beam.fluence")),
    "round": ("-round_xtal -fudge 2", ("crystal.fudge", "crystal.Na")),
    "gauss": ("-gauss_xtal -fudge 2", ("crystal.fudge", "crystal.cell_a", "crystal.Ncells_def",
                                       "crystal.G")),
    "tophat": ("-tophat_spots -fudge 2", ("crystal.Na", "beam.fluence")),
    "polarized": ("-polar 0.5", ("beam.kahn_factor",)),
    "sourcefile": ("-sourcefile {sources}", ("beam.sources.directions",
                                             "beam.sources.wavelengths",
                                             "beam.sources.weights")),
}

HKL_TEXT = "".join(f"{h} {k} {l} {50 + 7 * h + 3 * k - 5 * l + 0.25 * h * l}\n"
                   for h in (-1, 0, 1) for k in (-1, 0, 1) for l in (-1, 0, 1))
"""A 3 x 3 x 3 grid of distinct structure factors, one ``h k l F`` per line."""

SOURCES_TEXT = "-10 0 0 1 1e-10\n-10 0.01 0 1 1.02e-10\n-10 0 -0.015 1 0.97e-10\n"
"""Three sources (X Y Z weight wavelength/m) upstream of the sample along the MOSFLM beam."""


def make_params(extra: str = "", files: dict[str, str] | None = None, base: str = BASE) -> nbfunc.Params:
    """A float64 tree from ``base`` plus ``extra`` nanoBragg flags (``{hkl}``/``{sources}`` filled)."""
    return params_from_args((base + " " + extra.format(**(files or {}))).split())


@contextlib.contextmanager
def eager_mode():
    """Run torch.compile'd functions eagerly (public torch API; no effect when compile is off).

    For reference renders outside torch.func transforms, where compiling a kernel for every
    configuration (5-20 s each on CPU) would dominate the run time. Compiled and eager renders
    are compared in ``test_compile.py``.
    """
    with torch.compiler.set_stance("force_eager"):
        yield


def leaf_step(value: torch.Tensor) -> torch.Tensor:
    """Finite-difference step per element: 1e-6 relative, 1e-6 in the leaf's unit near 0."""
    return 1e-6 * torch.clamp(value.abs(), min=1.0)


def central_difference(fn, tree, path: str) -> torch.Tensor:
    """d fn(tree) / d leaf by central differences, shape ``fn(tree).shape + leaf.shape``."""
    leaf = get_leaf(tree, path)
    flat = leaf.reshape(-1)
    steps = leaf_step(flat)
    columns = []
    for i in range(flat.numel()):
        delta = torch.zeros_like(flat)
        delta[i] = steps[i]
        plus = fn(replace_leaves(tree, {path: (flat + delta).reshape(leaf.shape)}))
        minus = fn(replace_leaves(tree, {path: (flat - delta).reshape(leaf.shape)}))
        columns.append((plus - minus) / (2 * steps[i]))
    out = torch.stack(columns, -1)
    return out.reshape(out.shape[:-1] + leaf.shape)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "",
                        atol: float = 0.0):
    """``max|actual - expected| <= rtol * max|expected| + atol`` (tolerance scaled to the block)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    bound = rtol * float(expected.abs().max()) + atol
    err = float((actual - expected).abs().max())
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e} (max |expected| {float(expected.abs().max()):.3e})"


def magnitude(t: torch.Tensor) -> float:
    """Largest absolute element of ``t`` (0 for an empty tensor)."""
    return float(t.abs().max()) if t.numel() else 0.0


def leaves_dict(tree) -> dict[str, torch.Tensor]:
    """``{dotted path: leaf}`` of a tree, in flattening order."""
    return dict(zip(nbfunc.leaf_paths(tree), pytree.tree_leaves(tree)))


def poisson_nll(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Poisson negative log-likelihood (without the constant) of ``target`` counts given ``image``."""
    return (image - target * torch.log(image)).sum()


def all_finite(tree) -> bool:
    """True when every tensor leaf of ``tree`` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in pytree.tree_leaves(tree))
