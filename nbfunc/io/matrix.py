"""MOSFLM orientation matrix files (``-mat``).

The C program reads the first nine numbers of the file with ``fscanf("%lg%lg%lg", ...)``
three times: the first line holds the x components of a*, b*, c*, the second the y
components, the third the z components. Numbers may run together (``-0.01-0.02``) as in
MOSFLM's fixed-width output; anything after the ninth number (MOSFLM's U matrix, cell, ...)
is ignored. The values are reciprocal vectors multiplied by the wavelength; the caller
divides by lambda in Angstrom to get 1/Angstrom.
"""

from __future__ import annotations

import os
import re

import numpy as np

from nbfunc.io.errors import file_error, read_text

# One number as C's strtod reads it (after leading white space): decimal, hex, inf or nan.
_C_NUMBER = re.compile(
    r"[ \t\n\v\f\r]*([+-]?(?:0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?\d+)?"
    r"|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[iI][nN][fF](?:[iI][nN][iI][tT][yY])?"
    r"|[nN][aA][nN](?:\([0-9A-Za-z_]*\))?))"
)

_DET_RANGE = (1e-60, 1e60)
"""|det A| accepted: lambda^3 / V is about 1e-14 to 1e2 for real cells (V 1e1 to 1e11 A^3) and
wavelengths (0.1 to 10 A); outside this range the derived cell overflows float64."""

MATRIX_MAX_BYTES = 1 << 20
"""Largest matrix file read (bytes). A MOSFLM matrix file (A matrix, U matrix, cell, misset)
is about 300 bytes; 1 MiB leaves room for any comment, and stops ``-mat /dev/zero`` at once."""


def c_atof(text: str, pos: int = 0) -> tuple:
    """C ``strtod`` at ``text[pos:]``: (value, end position), or (0.0, pos) if no number.

    Example:
        >>> c_atof("  -1.5e2xyz")
        (-150.0, 8)
    """
    match = _C_NUMBER.match(text, pos)
    if match is None:
        return 0.0, pos
    token = match.group(1)
    body = token.lstrip("+-")
    if body[:2] in ("0x", "0X"):
        value = float.fromhex(body)
        value = -value if token.startswith("-") else value
    else:
        value = float(token.split("(")[0])
    return value, match.end()


def scan_c_doubles(text: str, count: int) -> tuple:
    """Read up to ``count`` numbers as repeated ``fscanf("%lg")`` does.

    Returns:
        (values, stop): the numbers read and, if reading stopped early at text that is not a
        number, the 1-based line number and the offending text; ``stop`` is None otherwise.
    """
    values, pos = [], 0
    while len(values) < count:
        pos = len(text) - len(text[pos:].lstrip())
        if pos >= len(text):
            return values, None
        value, end = c_atof(text, pos)
        if end == pos:
            line = text.count("\n", 0, pos) + 1
            return values, (line, text[pos:].split(None, 1)[0][:30])
        values.append(value)
        pos = end
    return values, None


def read_mosflm_matrix(path: str | os.PathLike) -> np.ndarray:
    """Read a MOSFLM A matrix file.

    Args:
        path: text file; its first nine numbers are a*x b*x c*x / a*y b*y c*y / a*z b*z c*z.

    Returns:
        float64 (3, 3) array whose rows are a*, b*, c* (still scaled by the wavelength, in
        Angstrom units: divide by lambda/Angstrom for 1/Angstrom).

    Raises:
        NbfuncInputError: missing, binary or larger than `MATRIX_MAX_BYTES` file, fewer than
            nine numbers, text that is not a number,
            non-finite values, or a singular matrix.
    """
    text = read_text(path, "matrix file", "check the -mat path", MATRIX_MAX_BYTES)
    values, stop = scan_c_doubles(text, 9)
    if stop is not None:
        line, token = stop
        raise file_error(
            path, f"found {token!r} where number {len(values) + 1} of 9 was expected; "
            "a MOSFLM matrix starts with three lines of three numbers", line,
        )
    if len(values) < 9:
        raise file_error(
            path, f"found {len(values)} numbers, expected 9 (three lines of a*, b*, c* components)"
        )
    matrix = np.array(values, dtype=np.float64).reshape(3, 3).T
    if not np.isfinite(matrix).all():
        raise file_error(path, f"found non-finite values {values}, expected finite numbers")
    with np.errstate(all="ignore"):
        scale = np.prod(np.linalg.norm(matrix, axis=1))
        det = float(np.linalg.det(matrix))
    if np.isfinite(scale) and (scale == 0.0 or abs(det) <= 1e-9 * scale):
        raise file_error(
            path, f"the matrix is singular (determinant {det:g}): a*, b*, c* must be "
            "linearly independent; check the file is a MOSFLM A matrix",
        )
    if not _DET_RANGE[0] < abs(det) < _DET_RANGE[1]:
        raise file_error(
            path, f"the determinant {det:g} is outside {_DET_RANGE[0]:g} to {_DET_RANGE[1]:g}: a "
            "MOSFLM A matrix holds a*, b*, c* times the wavelength (entries about 0.001 to 1)",
        )
    return matrix
