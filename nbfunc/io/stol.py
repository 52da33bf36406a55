"""Amorphous-scattering tables (``-stol``, ``-4stol``, ``-Q``): read but unused by the physics.

Two columns, sin(theta)/lambda (or 4 sin(theta)/lambda, or Q) and F, read with the C
program's column reader; the C program then pads two sentinel rows at each end.
"""

from __future__ import annotations

import math
import os

import numpy as np

from nbfunc.io.sources import read_columns

STOL_MULTIPLIER = 1e10
FOURSTOL_MULTIPLIER = 1e10 / 4
Q_MULTIPLIER = 1e10 / math.pi / 4


def read_stol(path: str | os.PathLike, multiplier: float = STOL_MULTIPLIER) -> tuple:
    """Read a stol table with the C program's padding.

    Rows keep their order; stol is multiplied by ``multiplier`` (1/Angstrom to 1/m for
    ``-stol``); a missing F becomes 0. Two rows are added in front (stol -1e99, -1e98; F of the
    first row with a value) and two at the end (stol 1e98, 1e99; F of the last row with a
    value, NaN if none).

    Returns:
        (stol float64 (n + 4,) in 1/m, F float64 (n + 4,)).

    Raises:
        NbfuncInputError: missing, binary or too large file, non-numeric token, or no data
            lines.
    """
    cols = read_columns(path, 2, "stol table")
    given = cols[~np.isnan(cols[:, 1]), 1]
    low = given[0] if given.size else math.nan
    high = given[-1] if given.size else math.nan
    stol = np.concatenate([[-1e99, -1e98], cols[:, 0] * multiplier, [1e98, 1e99]])
    F = np.concatenate([[low, low], np.where(np.isnan(cols[:, 1]), 0.0, cols[:, 1]), [high, high]])
    return stol, F
