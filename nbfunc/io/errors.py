"""The one exception raised for unusable input or output files, and bounded file reading."""

from __future__ import annotations

import os
import stat

_CHUNK = 1 << 20  # bytes per read() call


class NbfuncInputError(ValueError):
    """A file could not be read or written as needed.

    The message is one line: the file, the line number where one applies, what was found,
    what was expected and how to fix it.
    """


WORD_MAX = 120
"""Longest word (file name, value) a message shows whole, in characters: longer ones (past
any real path, a 100 kB token of a damaged file) are clipped so that a message stays one line
under 300 characters whatever the user typed or the file holds."""


def clip_words(text: str, width: int = WORD_MAX) -> str:
    """``text`` on one line, each word longer than ``width`` shortened to its start and end.

    Example:
        >>> clip_words("got '" + "9" * 40 + "', expected a count", width=20)
        "got '999999999999…(43 characters)…99', expected a count"
    """
    def clip(word: str) -> str:
        if len(word) <= width:
            return word
        return f"{word[:width * 2 // 3]}…({len(word)} characters)…{word[-width // 5:]}"
    return " ".join(clip(word) for word in text.split())


def first_validation_error(err) -> tuple[str, str]:
    """``(dotted location, message)`` of the first error of a pydantic ValidationError
    (the location "" for an error of the whole model)."""
    first = err.errors()[0]
    return ".".join(str(x) for x in first["loc"]), str(first["msg"])


def file_error(path: str | os.PathLike, message: str, line: int | None = None) -> NbfuncInputError:
    """Build an :class:`NbfuncInputError` whose message starts with the file (and line), on
    one line, with over-long names and values clipped (`clip_words`).

    Example:
        >>> str(file_error("P1.hkl", "found 3 numbers, expected 4 (h k l F)", line=7))
        'P1.hkl: line 7: found 3 numbers, expected 4 (h k l F)'
    """
    where = f"{os.fspath(path)}: line {line}: " if line is not None else f"{os.fspath(path)}: "
    return NbfuncInputError(clip_words(where + message))


def size_text(n: int) -> str:
    """A byte count for messages: ``size_text(1 << 30) == '1 GiB'``, ``size_text(300) == '300 bytes'``."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def open_input(path: str | os.PathLike, what: str, hint: str) -> int:
    """A file descriptor of ``path`` opened for reading, or a one-line error naming it.

    The open does not wait for a writer (a FIFO nobody writes to reads as empty), reads then
    block as usual; a folder is refused here rather than at the first read.
    Args:
        what: the kind of file, e.g. "HKL file"; hint: how to fix an unusable path.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise file_error(path, f"cannot read {what} ({exc.strerror}); {hint}") from exc
    os.set_blocking(fd, True)
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise file_error(path, f"is a folder, expected a file ({what}); {hint}")
    return fd


def read_up_to(fd: int, path, what: str, hint: str, count: int) -> bytes:
    """Up to ``count`` bytes from ``fd`` (fewer only at end of file), in 1 MiB reads."""
    parts, total = [], 0
    while total < count:
        try:
            chunk = os.read(fd, min(_CHUNK, count - total))
        except OSError as exc:
            raise file_error(path, f"cannot read {what} ({exc.strerror}); {hint}") from exc
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)


def _too_large(path, what: str, hint: str, limit: int):
    return file_error(path, f"holds more than {size_text(limit)}, more than any real {what}; "
                      f"{hint}")


def read_limited(path: str | os.PathLike, what: str, hint: str, limit: int,
                 binary: bool = False) -> bytes:
    """The bytes of ``path``, refusing more than ``limit`` bytes (and NUL bytes in a text file).

    A regular file larger than ``limit`` is refused before any read; a device, FIFO or pipe is
    read until ``limit`` + 1 bytes at most, so ``/dev/zero`` or an endless writer cannot make
    the read last forever or fill the memory.
    Args:
        what: the kind of file, e.g. "HKL file"; hint: how to fix the path.
        limit: the largest accepted size in bytes.
        binary: False for a text file: a NUL byte (found in binary data and ``/dev/zero``,
            never in text) stops the read with an error.
    Raises:
        NbfuncInputError: unreadable path, a folder, too much data, or binary data.
    """
    fd = open_input(path, what, hint)
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_size > limit:
            raise _too_large(path, what, hint, limit)
        parts, total = [], 0
        while total <= limit:
            chunk = read_up_to(fd, path, what, hint, min(_CHUNK, limit + 1 - total))
            if not chunk:
                break
            nul = -1 if binary else chunk.find(b"\0")
            if nul >= 0:
                raise file_error(path, f"holds binary data (a NUL byte at offset {total + nul}), "
                                 f"expected text ({what}); {hint}")
            parts.append(chunk)
            total += len(chunk)
        if total > limit:
            raise _too_large(path, what, hint, limit)
        return b"".join(parts)
    finally:
        os.close(fd)


def read_text(path: str | os.PathLike, what: str, hint: str, limit: int) -> str:
    """The whole text of ``path`` (UTF-8, universal newlines), read as :func:`read_limited`.

    Args:
        what: the kind of file, e.g. "HKL file"; hint: how to fix an unreadable path;
        limit: the largest accepted size in bytes.
    """
    text = read_limited(path, what, hint, limit).decode("utf-8", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")
