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
