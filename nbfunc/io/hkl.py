"""Structure-factor files: the ``h k l F`` text list and the C program's ``Fdump.bin`` cache.

The C program reads an HKL file twice: once for the index ranges, then into a grid
``F[h - h_min, k - k_min, l - l_min]`` prefilled with ``default_F``; listed entries overwrite.
It then writes ``Fdump.bin``: the text header ``"h_min h_max k_min k_max l_min l_max\\n\\f"``
followed by (h_range+1) * (k_range+1) * (l_range+1) native doubles, h slowest and l fastest,
where the extra last slot of each axis is 0 (``default_F`` only fills ``[0, range)``).
"""

from __future__ import annotations

import io
import math
import os
import re
from array import array
from dataclasses import dataclass

import numpy as np

from nbfunc.io.atomic import atomic_write_bytes
from nbfunc.io.errors import file_error, open_input, read_text, read_up_to


@dataclass(frozen=True)
class HKLGrid:
    """Structure-factor amplitudes on a dense Miller-index grid.

    Attributes:
        F: float64 (h_range, k_range, l_range); ``F[h - h_min, k - k_min, l - l_min]``.
        h_min, k_min, l_min: smallest indices present.
        count: number of entries read (for a Fdump file, the number of grid points).
        warnings: one message per non-integer index met while reading.
    """

    F: np.ndarray
    h_min: int
    k_min: int
    l_min: int
    count: int
    warnings: tuple = ()

    @property
    def maxima(self) -> tuple:
        """(h_max, k_max, l_max), the largest indices of the grid."""
        hr, kr, lr = self.F.shape
        return self.h_min + hr - 1, self.k_min + kr - 1, self.l_min + lr - 1


_MAX_GRID_POINTS = 1 << 27  # 1 GiB of doubles

HKL_MAX_BYTES = 1 << 30
"""Largest HKL text file read (bytes). A P1 list of every reflection of a 300 A cubic cell to
1.5 A resolution has about 34 million lines, about 0.7 GB; real nanoBragg inputs are far smaller.
The limit stops ``-hkl /dev/zero`` or an endless pipe at once instead of reading forever."""

HKL_MEMORY_PER_BYTE = 16
"""Bytes of memory reading an HKL file takes per byte of the file, at its peak (the text, the
parsed entries, the grid's index arithmetic): 12-15 measured on a 100 MB file of short lines.
A file that would need more than the machine has is refused before it is parsed."""

_C_INT_MAX = 2**31 - 1  # C reads indices into int


def _c_int(x: float) -> int:
    """C's double -> int conversion (truncation toward zero)."""
    return int(x)


def _parse_hkl_line(path, lineno: int, text: str) -> tuple | None:
    """(h, k, l, F) floats of one line, None for a blank line; errors for anything else."""
    tokens = text.split()
    if not tokens:
        return None
    if len(tokens) != 4:
        raise file_error(
            path,
            f"found {len(tokens)} values {text.strip()[:60]!r}, expected 4 numbers 'h k l F'",
            lineno,
        )
    values = []
    for name, token in zip("hklF", tokens):
        try:
            value = float(token) if "_" not in token else math.nan
        except ValueError:
            value = None
        if value is None or not math.isfinite(value):
            raise file_error(
                path,
                f"{name} is {token!r}, expected a finite number (line format 'h k l F')",
                lineno,
            )
        if name != "F" and abs(value) > _C_INT_MAX:
            raise file_error(
                path, f"{name} is {token[:30]!r}, expected a Miller index within "
                f"+-{_C_INT_MAX} (line format 'h k l F')", lineno,
            )
        values.append(value)
    return tuple(values)


def _check_memory(path, n_bytes: int, memory: int | None = None) -> None:
    """Refuse a file of ``n_bytes`` whose reading would need more than ``memory`` bytes
    (default: this machine's), with the figure (`HKL_MEMORY_PER_BYTE`)."""
    from nbfunc.crystal import gigabytes, physical_memory

    memory = physical_memory() if memory is None else memory
    need = n_bytes * HKL_MEMORY_PER_BYTE
    if need > memory:
        raise file_error(path, f"{n_bytes / 1e6:.0f} MB of text need about {gigabytes(need)} to "
                         f"read, more than the {gigabytes(memory)} of memory here; give a smaller "
                         "file (only the reflections the image needs)")


def _read_entries(path) -> tuple[np.ndarray, np.ndarray]:
    """The entries of an HKL text file: (line numbers int64 (n,), h k l F float64 (n, 4)).

    Parsed one line at a time into flat arrays (40 bytes an entry), not into Python objects
    (some 400 bytes a line), so a file near `HKL_MAX_BYTES` fits in memory.
    """
    text = read_text(path, "HKL file", "check the -hkl path", HKL_MAX_BYTES)
    _check_memory(path, len(text))
    numbers, values = array("q"), array("d")
    for lineno, line in enumerate(io.StringIO(text), start=1):
        parsed = _parse_hkl_line(path, lineno, line)
        if parsed is not None:
            numbers.append(lineno)
            values.extend(parsed)
    if not numbers:
        raise file_error(path, "no 'h k l F' lines found, expected at least one; the file is empty")
    return (np.frombuffer(numbers, dtype=np.int64),
            np.frombuffer(values, dtype=np.float64).reshape(-1, 4))


def _index_warnings(path, numbers: np.ndarray, hkl: np.ndarray) -> tuple:
    """C's non-integer index warnings (its test: ``h != ceil(h - 0.4)``), in file order;
    ``numbers`` are the entries' line numbers, ``hkl`` their (n, 3) indices."""
    out = []
    for row, axis in np.argwhere(hkl != np.ceil(hkl - 0.4)):
        v = float(hkl[row, axis])
        out.append(
            f"WARNING: {os.fspath(path)}: line {int(numbers[row])}: non-integer value for "
            f"{'hkl'[axis]} ({v:g}), stored at index {_c_int(v)}"
        )
    return tuple(out)


def read_hkl(path: str | os.PathLike, default_F: float) -> HKLGrid:
    """Read an ``h k l F`` text file into a dense grid, as the C program's two-pass reader.

    Index ranges come from the minima and maxima of the listed indices (truncated to int as
    C does); every grid point starts at ``default_F`` and listed entries overwrite it (a later
    duplicate wins). Non-integer indices give a warning and are truncated toward zero.

    Args:
        path: text file, one ``h k l F`` per line; blank lines are ignored.
        default_F: amplitude for grid points the file does not list.

    Returns:
        HKLGrid with F of shape (h_range, k_range, l_range).

    Raises:
        NbfuncInputError: missing, empty, binary or larger than `HKL_MAX_BYTES` file, a line
            that is not four finite numbers, an index beyond a C int, or an index range too
            large for memory.
    """
    numbers, entries = _read_entries(path)
    idx = entries[:, :3].astype(np.int64)  # truncation toward zero, as C's (int) and _c_int
    lo = idx.min(axis=0)
    shape = tuple(int(v) for v in idx.max(axis=0) - lo + 1)
    if math.prod(shape) > _MAX_GRID_POINTS:
        raise file_error(
            path, f"indices span a {shape[0]}x{shape[1]}x{shape[2]} grid, expected at most "
            f"{_MAX_GRID_POINTS} points; check the file for stray large h, k or l values",
        )
    F = np.full(shape, float(default_F), dtype=np.float64)
    flat = np.ravel_multi_index(tuple((idx - lo).T), shape)
    values = entries[:, 3]
    _, last = np.unique(flat[::-1], return_index=True)  # a later duplicate wins, as in C
    keep = len(flat) - 1 - last
    F.reshape(-1)[flat[keep]] = values[keep]
    warnings = _index_warnings(path, numbers, entries[:, :3])
    return HKLGrid(F, int(lo[0]), int(lo[1]), int(lo[2]), len(entries), warnings)


def fdump_bytes(grid: HKLGrid) -> bytes:
    """The bytes of a C ``Fdump.bin`` for ``grid`` (header, then the zero-padded double grid)."""
    h_max, k_max, l_max = grid.maxima
    header = f"{grid.h_min} {h_max} {grid.k_min} {k_max} {grid.l_min} {l_max}\n\f"
    hr, kr, lr = grid.F.shape
    padded = np.zeros((hr + 1, kr + 1, lr + 1), dtype="<f8")
    padded[:hr, :kr, :lr] = grid.F
    return header.encode("ascii") + padded.tobytes()


def write_fdump(path: str | os.PathLike, grid: HKLGrid) -> None:
    """Write ``grid`` as a C ``Fdump.bin`` file (atomically)."""
    atomic_write_bytes(path, fdump_bytes(grid))


_FDUMP_HEADER = re.compile(rb"\s*" + rb"\s+".join([rb"([+-]?\d+)"] * 6) + rb"\n\f")


def _fdump_header(path, head: bytes) -> tuple:
    """(h_min, h_max, k_min, k_max, l_min, l_max, header length) of an Fdump.bin start."""
    match = _FDUMP_HEADER.match(head)
    if match is None:
        raise file_error(
            path,
            f"header {head[:16]!r} is not 'h_min h_max k_min k_max l_min l_max' + newline + form "
            "feed; the file is not an Fdump.bin (delete it to re-read the HKL file)",
        )
    return tuple(int(v) for v in match.groups()) + (match.end(),)


def _check_fdump_values(path, padded: np.ndarray, origin: tuple) -> None:
    """Every amplitude of an Fdump.bin must be finite (an HKL file cannot give NaN or inf)."""
    bad = np.argwhere(~np.isfinite(padded))
    if bad.size:
        h, k, l = (int(i) + o for i, o in zip(bad[0], origin))
        raise file_error(
            path, f"holds {len(bad)} non-finite amplitude{'s' if len(bad) > 1 else ''} (the first, "
            f"{float(padded[tuple(bad[0])]):g}, "
            f"at h k l = {h} {k} {l}), expected finite F values; the file is damaged (delete it "
            "and give -hkl FILE to rebuild it)",
        )


def read_fdump(path: str | os.PathLike) -> HKLGrid:
    """Read a C ``Fdump.bin`` cache; returns the grid without the padding slots.

    The header is read first; then exactly the data it announces (at most `_MAX_GRID_POINTS`
    grid points, as an HKL file may give) plus one byte to detect a longer file, so a device
    or an endless pipe is never read without bound.
    Raises:
        NbfuncInputError: missing file or a folder, header not six integers followed by newline
            and form feed, empty or too large ranges, a data size other than
            (h_range+1)(k_range+1)(l_range+1) doubles, or a value that is not finite.
    """
    what, hint = "Fdump file", "check the path"
    fd = open_input(path, what, hint)
    try:
        head = read_up_to(fd, path, what, hint, 200)
        h_min, h_max, k_min, k_max, l_min, l_max, start = _fdump_header(path, head)
        hr, kr, lr = h_max - h_min + 1, k_max - k_min + 1, l_max - l_min + 1
        if min(hr, kr, lr) < 1:
            raise file_error(path, f"header ranges h {h_min}..{h_max} k {k_min}..{k_max} "
                             f"l {l_min}..{l_max} are empty, expected max >= min on every axis")
        if hr * kr * lr > _MAX_GRID_POINTS:
            raise file_error(path, f"header ranges give a {hr}x{kr}x{lr} grid, expected at most "
                             f"{_MAX_GRID_POINTS} points; the file is damaged (delete it)")
        expected = (hr + 1) * (kr + 1) * (lr + 1) * 8
        data = head[start:]
        data += read_up_to(fd, path, what, hint, max(0, expected + 1 - len(data)))
    finally:
        os.close(fd)
    if len(data) != expected:
        found = f"{len(data)}" if len(data) <= expected else f"more than {expected}"
        raise file_error(
            path,
            f"found {found} bytes of data, expected {expected} "
            f"({hr + 1}x{kr + 1}x{lr + 1} doubles); the file is truncated or not an Fdump.bin",
        )
    padded = np.frombuffer(data, dtype="<f8").reshape(hr + 1, kr + 1, lr + 1)
    _check_fdump_values(path, padded, (h_min, k_min, l_min))
    return HKLGrid(padded[:hr, :kr, :lr].astype(np.float64), h_min, k_min, l_min, hr * kr * lr)
