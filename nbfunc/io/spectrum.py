"""X-ray spectra: `.lam` spectrum files (the convention diffBragg reads) and Gaussian bandwidths.

A spectrum is a list of channels, each a wavelength (Angstrom) and a weight (dimensionless,
relative). It becomes a `nbfunc.params.SourceList` of sources that all lie along the beam
(`spectrum_sources`): one source per channel, the channel's weight multiplying its term
(docs/physics.md, "Spectra").

A `.lam` file, as cctbx's simtbx/diffBragg writes it, is text: a header line
``# wavelengths, weights``, then one channel per line, ``wavelength,weight`` (wavelength in
Angstrom, separated by a comma). Here lines starting with ``#`` and blank lines are skipped,
and spaces or tabs may separate the two numbers too. diffBragg skips the first line whatever
it holds; here a first line that is numbers is a channel (a file without a header keeps its
first channel).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from nbfunc.io.atomic import atomic_write_bytes
from nbfunc.io.errors import file_error, read_text
from nbfunc.io.sources import COLUMNS_MAX_BYTES, COLUMNS_MAX_LINES
from nbfunc.params import SourceList

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
"""Full width at half maximum of a Gaussian in units of its standard deviation (2.3548...)."""

HEADER = "# wavelengths, weights"
"""The header line `save_spectrum` writes (the one diffBragg's ``save_spectra_file`` writes)."""


def _channel(path, lineno: int, text: str) -> tuple[float, float]:
    """(wavelength Angstrom, weight) of one data line, or a one-line error."""
    tokens = text.replace(",", " ").split()
    if len(tokens) != 2:
        raise file_error(path, f"found {len(tokens)} values, expected 2: wavelength (Angstrom), "
                         "weight, separated by a comma", lineno)
    try:
        wavelength, weight = float(tokens[0]), float(tokens[1])
    except ValueError:
        raise file_error(path, f"{text.strip()!r} is not two numbers; write "
                         "'wavelength,weight' with the wavelength in Angstrom", lineno) from None
    if not (math.isfinite(wavelength) and wavelength > 0):
        raise file_error(path, f"wavelength {wavelength:g} Angstrom, expected a finite value > 0 "
                         "(first column, in Angstrom)", lineno)
    if not (math.isfinite(weight) and weight >= 0):
        raise file_error(path, f"weight {weight:g}, expected a finite value >= 0 (second "
                         "column)", lineno)
    return wavelength, weight


def read_spectrum(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a `.lam` spectrum file (module notes).

    Returns:
        (wavelengths (channel,) in Angstrom, weights (channel,) dimensionless), float64, in
        the file's order.

    Raises:
        NbfuncInputError: one line naming the file (and line): missing, binary or larger than
            `nbfunc.io.sources.COLUMNS_MAX_BYTES` file, more than
            `nbfunc.io.sources.COLUMNS_MAX_LINES` lines, a line that is not two numbers, a
            wavelength that is not > 0, a weight that is negative or not finite, no channel, or
            every weight zero.
    """
    lines = read_text(path, "spectrum file", "check the file path", COLUMNS_MAX_BYTES).splitlines()
    if len(lines) > COLUMNS_MAX_LINES:
        raise file_error(path, f"has {len(lines)} lines, more than the {COLUMNS_MAX_LINES} a "
                         "spectrum file may have; give fewer channels")
    rows = [_channel(path, lineno, text) for lineno, text in enumerate(lines, start=1)
            if text.strip() and not text.lstrip().startswith("#")]
    if not rows:
        raise file_error(path, "no channels found, expected lines 'wavelength,weight' "
                         "(Angstrom, dimensionless) after the '# wavelengths, weights' header")
    table = np.array(rows, dtype=np.float64)
    if not (table[:, 1] > 0).any():
        raise file_error(path, f"every one of the {len(rows)} weights is 0; give at least one "
                         "channel a positive weight")
    return table[:, 0], table[:, 1]


def save_spectrum(path: str | os.PathLike, wavelengths, weights) -> None:
    """Write a `.lam` spectrum file: `HEADER`, then ``wavelength,weight`` per line (Angstrom,
    dimensionless), each number to 17 significant digits so that `read_spectrum` gives the
    same float64 values back; all or nothing (`nbfunc.io.atomic.atomic_write_bytes`).

    Args:
        wavelengths, weights: (channel,) array-likes of equal length.
    """
    lam, w = (np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x,
                         dtype=np.float64).reshape(-1) for x in (wavelengths, weights))
    if lam.shape != w.shape:
        raise ValueError(f"save_spectrum: {lam.size} wavelengths but {w.size} weights; give one "
                         "weight per wavelength")
    body = "".join(f"{a:.17g},{b:.17g}\n" for a, b in zip(lam, w))
    atomic_write_bytes(path, (HEADER + "\n" + body).encode("ascii"))


def spectrum_sources(wavelengths, weights, beam_vector: Sequence[float] = (1.0, 0.0, 0.0),
                     normalize: bool = True, dtype: torch.dtype = torch.float64) -> SourceList:
    """A `SourceList` of one source per channel, every source along the beam.

    Args:
        wavelengths: (channel,) Angstrom; weights: (channel,) dimensionless, >= 0;
        beam_vector: (3,) beam direction (sample towards detector; the sources lie at
            ``-beam_vector``), that of the tree the sources go in (``beam.beam_vector``);
        normalize: divide the weights by their mean, so that they average 1 and
            ``beam.fluence`` stays the shot's total fluence (False: the weights as given).
    Returns:
        SourceList with directions (channel, 3), wavelengths (channel,) Angstrom and weights
        (channel,), of ``dtype``; differentiable in ``wavelengths`` and ``weights`` when
        they are tensors.
    Raises:
        pydantic.ValidationError: as `SourceList` (a wavelength <= 0, a negative weight, ...).
    """
    lam = torch.as_tensor(wavelengths, dtype=dtype).reshape(-1)
    w = torch.as_tensor(weights, dtype=dtype).reshape(-1)
    if normalize and w.shape == lam.shape and bool((w.sum() > 0) & torch.isfinite(w).all()):
        w = w / w.mean()
    towards = -torch.as_tensor(beam_vector, dtype=dtype)
    return SourceList(directions=towards.expand(lam.shape[0], 3).clone(), wavelengths=lam,
                      weights=w)


def read_spectrum_sources(path: str | os.PathLike, beam_vector: Sequence[float] = (1.0, 0.0, 0.0),
                          normalize: bool = True, dtype: torch.dtype = torch.float64) -> SourceList:
    """`read_spectrum` then `spectrum_sources`: a `.lam` file as sources along the beam."""
    wavelengths, weights = read_spectrum(path)
    return spectrum_sources(wavelengths, weights, beam_vector, normalize, dtype)


def gaussian_spectrum(wavelength, n_channels: int, fwhm=None, sigma=None, span: float = 3.0,
                      dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels of a Gaussian bandwidth: evenly spaced wavelengths over ``+-span`` standard
    deviations about ``wavelength``, weighted by the Gaussian and normalised to mean 1.

    Give exactly one of ``fwhm`` and ``sigma``, both relative to the central wavelength
    (e.g. ``fwhm=0.01`` for a 1 % bandwidth). Channel ``i`` of ``n`` lies at
    ``lambda0 (1 + sigma x_i)`` with ``x_i = span (2 i / (n - 1) - 1)``, weight
    ``exp(-x_i^2 / 2)`` scaled to mean 1; one channel is ``lambda0`` with weight 1.
    Differentiable in ``wavelength``, ``fwhm`` and ``sigma`` when they are tensors.

    Args:
        wavelength: central wavelength (Angstrom), > 0; n_channels: >= 1;
        fwhm, sigma: relative full width at half maximum or standard deviation, >= 0 and
            below ``1/span`` (every wavelength stays > 0); span: half-width of the channels
            in standard deviations, > 0.
    Returns:
        (wavelengths (channel,) Angstrom, weights (channel,) dimensionless).
    Raises:
        ValueError: one line naming the bad argument.
    """
    if (fwhm is None) == (sigma is None):
        raise ValueError("gaussian_spectrum: give exactly one of fwhm and sigma (relative to the "
                         "central wavelength, e.g. fwhm=0.01 for a 1 % bandwidth)")
    if not (isinstance(n_channels, int) and n_channels >= 1):
        raise ValueError(f"gaussian_spectrum: n_channels = {n_channels!r}, expected an integer >= 1")
    if not (math.isfinite(span) and span > 0):
        raise ValueError(f"gaussian_spectrum: span = {span!r} standard deviations, expected a "
                         "finite value > 0")
    lam0 = torch.as_tensor(wavelength, dtype=dtype)
    rel = (torch.as_tensor(fwhm, dtype=dtype) / FWHM_PER_SIGMA if sigma is None
           else torch.as_tensor(sigma, dtype=dtype))
    name = "fwhm" if sigma is None else "sigma"
    if not (lam0.dim() == 0 and bool(torch.isfinite(lam0)) and bool(lam0 > 0)):
        raise ValueError(f"gaussian_spectrum: wavelength = {wavelength!r}, expected one finite "
                         "value > 0 Angstrom")
    if not (rel.dim() == 0 and bool(torch.isfinite(rel)) and bool(rel >= 0)
            and bool(rel * span < 1)):
        raise ValueError(f"gaussian_spectrum: {name} = {fwhm if sigma is None else sigma!r}, "
                         f"expected one value >= 0 (relative) whose {span:g}-sigma span stays "
                         "below the central wavelength")
    if n_channels == 1:
        return lam0.reshape(1), torch.ones(1, dtype=dtype)
    x = torch.linspace(-span, span, n_channels, dtype=dtype)
    weights = torch.exp(-0.5 * x * x)
    return lam0 * (1.0 + rel * x), weights / weights.mean()
