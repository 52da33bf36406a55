"""Atomic file writing: readers never see a partial or stale output file."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from nbfunc.io.errors import file_error


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory + os.replace.

    The temporary file is created with the default permissions (umask applies) and removed
    if anything fails, so ``path`` holds either its previous content or all of ``data``.

    Raises:
        NbfuncInputError: the directory is missing or not writable, or ``path`` is a directory.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise file_error(
            target,
            f"cannot write output ({exc.strerror}); choose an existing, writable directory",
        ) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise file_error(
            target, f"cannot write output ({exc.strerror}); choose a writable file path"
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
