"""The one exception raised for unusable input or output files."""

from __future__ import annotations

import os


class NbfuncInputError(ValueError):
    """A file could not be read or written as needed.

    The message is one line: the file, the line number where one applies, what was found,
    what was expected and how to fix it.
    """


def file_error(path: str | os.PathLike, message: str, line: int | None = None) -> NbfuncInputError:
    """Build an :class:`NbfuncInputError` whose message starts with the file (and line).

    Example:
        >>> str(file_error("P1.hkl", "found 3 numbers, expected 4 (h k l F)", line=7))
        'P1.hkl: line 7: found 3 numbers, expected 4 (h k l F)'
    """
    where = f"{os.fspath(path)}: line {line}: " if line is not None else f"{os.fspath(path)}: "
    return NbfuncInputError(where + " ".join(message.split()))


def read_text(path: str | os.PathLike, what: str, hint: str) -> str:
    """The whole text of ``path`` (universal newlines), or a one-line error naming it.

    Args:
        what: the kind of file, e.g. "HKL file"; hint: how to fix an unreadable path.
    """
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError as exc:
        raise file_error(path, f"cannot read {what} ({exc.strerror}); {hint}") from exc
