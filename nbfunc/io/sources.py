"""X-ray source files (``-sourcefile``) and the C program's generic column reader.

``read_text_file`` in the C program reads up to N numeric columns per line: tokens are
separated by any of ``" \\t,;:!"``; lines holding only delimiters are skipped; each token is
converted with ``atof`` (the longest numeric prefix); a column a line does not reach is NaN.
Two C behaviours are kept because they change values: a last line without a newline (or a
line ending in ``\\r\\n``) fills the columns it does not reach with 0 instead of NaN, and a
token such as ``1-2`` counts as one column (value 1). A token with no numeric prefix at all
(C would read 0) is rejected here.

A source file has the columns X Y Z (position of the source relative to the sample, any
length unit), weight and wavelength (m). As in the C program, the command line does not use
the weight column (its tree gets weights of one); spectra with weights are read by
`nbfunc.io.spectrum`, and `nbfunc.params.SourceList.weights` can be set directly.
"""

from __future__ import annotations

import math
import os

import numpy as np

from nbfunc.io.errors import file_error, read_limited
from nbfunc.io.matrix import c_atof

_DELIMITERS = " \t,;:!"
_NUMBERSTUFF = "0123456789-+.EGeg"

COLUMNS_MAX_BYTES = 64 << 20
"""Largest column file (-sourcefile, -stol) read (bytes). 64 MiB holds about 700,000 lines of
five numbers; every source multiplies the render time, so real source lists (the C program's
examples have at most a few thousand) and stol tables (a few hundred rows) are far smaller.
The limit stops ``-sourcefile /dev/zero`` or an endless pipe at once."""

COLUMNS_MAX_LINES = 1_000_000
"""Most lines of a column file read. Short lines fit many more rows than 700,000 in
`COLUMNS_MAX_BYTES` (33 million of ``1``): parsed and set up for rendering they needed 8.9 GB and
about three minutes before a single pixel. A million sources is far more than a real list, and
each one multiplies the render time; a longer file is refused before it is parsed."""


def _span(text: str, pos: int, chars: str) -> int:
    """``pos + strspn(text + pos, chars)``."""
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _cspan(text: str, pos: int, chars: str) -> int:
    """``pos + strcspn(text + pos, chars)``."""
    while pos < len(text) and text[pos] not in chars:
        pos += 1
    return pos


def _line_values(path, lineno: int, text: str, ncols: int) -> list | None:
    """The C loop over one line: ``ncols`` values (NaN where unread), None for a blank line."""
    pos = _span(text, 0, _DELIMITERS)
    if text[pos:] == "\n":
        return None
    values = [math.nan] * ncols
    i = 0
    while True:
        value, end = c_atof(text, pos)
        if end == pos and text[pos:].strip():
            token = text[pos:_cspan(text, pos, _DELIMITERS + "\n")]
            raise file_error(
                path, f"column {i + 1} is {token!r}, expected a number "
                f"(columns separated by spaces, tabs or any of ',;:!')", lineno,
            )
        values[i] = value
        pos = _span(text, pos, _NUMBERSTUFF)
        if text[pos:] == "\n":
            break
        pos = _span(text, _cspan(text, pos, _DELIMITERS), _DELIMITERS)
        if text[pos:] == "\n":
            break
        i += 1
        if i >= ncols:
            break
    return values


def read_columns(path: str | os.PathLike, ncols: int, what: str = "column file") -> np.ndarray:
    """Read a numeric column file exactly as the C program's ``read_text_file(path, ncols)``.

    Args:
        what: the kind of file, for messages (e.g. "source file").
    Returns:
        float64 (lines, ncols), NaN where a line has fewer columns; blank lines are skipped.

    Raises:
        NbfuncInputError: missing, binary or larger than `COLUMNS_MAX_BYTES` file, more lines
            than `COLUMNS_MAX_LINES`, a token
            that is not a number, or no data lines.
    """
    raw = read_limited(path, what, "check the file path", COLUMNS_MAX_BYTES)
    n_lines = raw.count(b"\n")
    if n_lines > COLUMNS_MAX_LINES:
        raise file_error(path, f"has {n_lines} lines, more than the {COLUMNS_MAX_LINES} a {what} "
                         "may have; give fewer lines")
    parts = raw.decode("utf-8", errors="replace").split("\n")
    lines = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
    rows = []
    for lineno, text in enumerate(lines, start=1):
        values = _line_values(path, lineno, text, ncols)
        if values is not None:
            rows.append(values)
    if not rows:
        raise file_error(path, f"no data lines found, expected lines of up to {ncols} numbers")
    return np.array(rows, dtype=np.float64)


SOURCE_VALUE_MAX = 1e100
"""Largest magnitude of a source-file value: positions are squared and wavelengths converted to
Angstrom (x 1e10) without overflow; real values are metres to micrometres."""


def read_source_file(path: str | os.PathLike) -> np.ndarray:
    """Read a ``-sourcefile``: columns X, Y, Z, weight, wavelength (m); NaN where missing.

    Returns:
        float64 (n_sources, 5).

    Raises:
        NbfuncInputError: as :func:`read_columns`, a value that is infinite or beyond
            `SOURCE_VALUE_MAX`, or a given wavelength that is not positive
            (C reads a missing column as 0 on a last line without newline, see module notes).
    """
    cols = read_columns(path, 5, "source file")
    huge = np.argwhere(~(np.abs(cols) <= SOURCE_VALUE_MAX) & ~np.isnan(cols))
    if huge.size:
        row, col = (int(i) for i in huge[0])
        raise file_error(
            path, f"source {row + 1} has {cols[row, col]:g} in column {col + 1}, expected a finite "
            f"value below {SOURCE_VALUE_MAX:g} (columns X Y Z, weight, wavelength in m)",
        )
    bad = np.flatnonzero(~np.isnan(cols[:, 4]) & ~(cols[:, 4] > 0))
    if bad.size:
        row = int(bad[0])
        raise file_error(
            path, f"source {row + 1} has wavelength {cols[row, 4]:g} m, expected a positive "
            "value in meters (end the last line with a newline and use Unix line endings: the "
            "C reader turns missing columns there into 0)",
        )
    return cols


def source_defaults(
    cols: np.ndarray, beam_vector: np.ndarray, lambda0_m: float, source_distance_m: float = 10.0
) -> np.ndarray:
    """Fill missing source columns as the C program does (before it unitizes the positions).

    Missing X, Y, Z become ``-source_distance_m * beam_vector`` components, a missing weight 1,
    a missing wavelength ``lambda0_m``.

    Args:
        cols: (n, 5) X, Y, Z, weight, wavelength with NaN where missing.
        beam_vector: (3,) unit vector of the beam direction (sample towards detector).
        lambda0_m: default wavelength in meters.
        source_distance_m: distance of default source positions (C default 10 m).

    Returns:
        float64 (n, 5) without NaN in the filled columns (the values C prints per source).
    """
    cols = np.array(cols, dtype=np.float64).reshape(-1, 5)
    beam = np.asarray(beam_vector, dtype=np.float64).reshape(3)
    fill = np.concatenate([-source_distance_m * beam, [1.0, float(lambda0_m)]])
    return np.where(np.isnan(cols), fill, cols)


def apply_source_defaults(
    cols: np.ndarray, beam_vector: np.ndarray, lambda0_m: float, source_distance_m: float = 10.0
) -> tuple:
    """Sources as the simulator uses them: unit directions, weights and wavelengths.

    Applies :func:`source_defaults`, then makes X, Y, Z a unit vector (C's ``unitize``: a
    zero vector stays zero). The direction points from the sample towards the source.

    Returns:
        (directions float64 (n, 3), weights float64 (n,), wavelengths_m float64 (n,)).
    """
    full = source_defaults(cols, beam_vector, lambda0_m, source_distance_m)
    xyz = full[:, :3]
    mag = np.sqrt(xyz[:, 0] * xyz[:, 0] + xyz[:, 1] * xyz[:, 1] + xyz[:, 2] * xyz[:, 2])
    safe = np.where(mag != 0.0, mag, 1.0)[:, None]
    directions = np.where(mag[:, None] != 0.0, xyz / safe, 0.0)
    return directions, full[:, 3].copy(), full[:, 4].copy()
