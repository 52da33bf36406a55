"""Writing output files as C's ``fopen(path, "wb")`` would, but all or nothing.

The C program opens every output with ``fopen(path, "wb")``: a symbolic link is followed and
its target written (a dangling link creates its target), a FIFO or a device is written in
place, and an existing file keeps its inode, owner and permission bits. nbfunc does the same
with one difference: a regular file is written to a hidden temporary file next to it
(``.NAME.XXXX.nbfunc-tmp``) and renamed onto it only when complete, so a reader never sees a
partial file and a failed run can put the previous content back. FIFOs and devices cannot be
replaced, so they are opened and written in place, without a temporary file.

These are the leaves; `nbfunc.cli.outputs.commit` orchestrates several files at once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import tempfile
import threading
from typing import Callable, Iterable, Iterator, NamedTuple, Union

from nbfunc.io.errors import NbfuncInputError, file_error

DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""Signals held back while files are renamed into place or rolled back."""

Payload = Union[bytes, Iterable[bytes], Callable[[], Iterable[bytes]]]
"""The content of an output: bytes, an iterable of byte blocks (bytes or memoryviews) written
in turn (a generator that encodes the next block only when asked, so a large file never sits
in memory whole), or a callable returning such an iterable."""


def byte_blocks(data: Payload) -> Iterable[bytes]:
    """The blocks of a `Payload`, in file order (bytes give one block).

    Example:
        >>> b"".join(byte_blocks(lambda: (b"ab", b"c")))
        b'abc'
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        return (data,)
    return data() if callable(data) else data


class UnwritableError(NbfuncInputError):
    """An output path that cannot be written; ``reason`` says why and how to fix it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: cannot write output, {reason}")
        self.path, self.reason = path, reason


class Target(NamedTuple):
    """Where the bytes for an output path go.

    Attributes:
        path: the path as given.
        real: the path with every symbolic link followed (the file that is written).
        kind: "new" (nothing there yet), "file" (an existing regular file) or "stream"
            (a FIFO, a character or block device, or anything under /dev or /proc: written
            in place).
        mode: permission bits of an existing file (e.g. 0o640), None for a new one.
        owner: (uid, gid) of an existing file, None for a new one.
    """

    path: str
    real: str
    kind: str
    mode: int | None
    owner: tuple[int, int] | None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _folder_problem(folder: str, link_note: str) -> str | None:
    """Why no file can be created in ``folder``, or None when one can."""
    if not os.path.isdir(folder):
        return f"folder {folder} does not exist{link_note}; give a path in an existing folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return (f"folder {folder} is not writable{link_note}; give a path in a writable folder "
                "(nbfunc replaces a file through a temporary file next to it)")
    return None


def _kernel_path(path: str) -> bool:
    """True for paths under /dev and /proc (``/dev/stdout``, ``/proc/self/fd/1``): their links
    name open descriptors, not files that could be replaced, so they are written in place."""
    return os.path.abspath(path).startswith(("/dev/", "/proc/"))


def target_of(path: str) -> Target:
    """Classify ``path`` as C's fopen(path, "wb") would open it, or refuse it.

    Raises:
        UnwritableError: the path is a folder (or ends with '/', '.' or '..'), a socket, a
            symbolic-link loop, a read-only file (no write permission bit, even when run as
            root), or lies in a missing (``none/../x`` included) or read-only folder.
    """
    try:
        info = os.stat(path)  # follows symbolic links, as fopen does
    except FileNotFoundError:
        info = None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnwritableError(path, "it is a symbolic link that cannot be followed (a loop); "
                                        "remove it or choose another name") from exc
        raise UnwritableError(path, f"it cannot be opened ({exc.strerror}); choose another "
                                    "name") from exc
    real = os.path.realpath(path)
    link_note = f" (the symbolic link points to {real})" if os.path.islink(path) else ""
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise UnwritableError(path, "it is a folder, expected a file name")
    head, tail = os.path.split(path)
    if info is None and tail in ("", ".", ".."):  # "new/", "new/.": realpath would drop the end
        raise UnwritableError(path, "it ends with '/', '.' or '..' as a folder name does, "
                                    "expected a file name")
    if info is None and head and not os.path.isdir(head):  # "none/../x": C's fopen fails too
        raise UnwritableError(path, f"folder {head} does not exist; give a path in an existing "
                                    "folder")
    if info is not None and stat.S_ISSOCK(info.st_mode):
        raise UnwritableError(path, "it is a socket, expected a file, FIFO or device")
    if info is not None and (not os.access(path, os.W_OK) or not info.st_mode & 0o222):
        raise UnwritableError(path, f"it is read-only; make it writable (chmod u+w {path}) or "
                                    "choose another name")
    if info is not None and (not stat.S_ISREG(info.st_mode) or _kernel_path(path)):
        return Target(path, real, "stream", None, None)
    problem = _folder_problem(os.path.dirname(real), link_note)
    if problem is not None:
        raise UnwritableError(path, problem)
    if info is None:
        return Target(path, real, "new", None, None)
    return Target(path, real, "file", stat.S_IMODE(info.st_mode) & 0o777,
                  (info.st_uid, info.st_gid))


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM that arrive inside the block; send them again when it ends.

    Used around renames and rollbacks, which are short and must not stop half way. Outside
    the main thread (where Python handlers never run) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {}
    try:
        for signum in DEFERRED_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, lambda number, _f: held.append(number))
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


def _new_temp(real: str, suffix: str, temps: list[str]) -> tuple[int, str]:
    """A new hidden file next to ``real``, recorded in ``temps`` before anything can stop us."""
    folder, base = os.path.split(real)
    with signals_deferred():
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=suffix, dir=folder)
        temps.append(tmp)
    return fd, tmp


def stage(target: Target, data: Payload, temps: list[str]) -> str:
    """Write ``data`` (a `Payload`, block by block) to a new hidden temporary file next to
    ``target.real``; return its path.

    The temporary file gets the existing file's permission bits and (where allowed) owner,
    or for a new file the bits fopen would give (0666 less the umask). Its path is appended
    to ``temps`` as soon as it exists, so the caller can remove it whatever happens.
    """
    fd, tmp = _new_temp(target.real, ".nbfunc-tmp", temps)
    try:
        os.fchmod(fd, target.mode if target.mode is not None else 0o666 & ~_umask())
        if target.owner is not None and target.owner != (os.geteuid(), os.getegid()):
            with contextlib.suppress(PermissionError):
                os.fchown(fd, *target.owner)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "wb") as handle:
        for block in byte_blocks(data):
            handle.write(block)
    return tmp


def keep_copy(target: Target, temps: list[str]) -> str | None:
    """A hidden hard link (or copy) of an existing ``target.real``, to restore it on failure."""
    if target.kind != "file":
        return None
    fd, backup = _new_temp(target.real, ".nbfunc-old", temps)
    os.close(fd)
    try:
        os.unlink(backup)
        os.link(target.real, backup)
    except OSError:
        shutil.copy2(target.real, backup)
    return backup


def write_in_place(target: Target, data: Payload, opened: list[str]) -> None:
    """Open a FIFO or device and write ``data`` (a `Payload`, block by block) into it, as
    fopen(path, "wb") + fwrite do.

    Opening a FIFO waits for a reader, as in C. ``target.path`` is appended to ``opened``
    once it is open, from when on bytes may have gone out and cannot be taken back.
    """
    with open(target.path, "wb") as handle:
        opened.append(target.path)
        for block in byte_blocks(data):
            handle.write(block)


def remove(path: str) -> None:
    """Remove ``path`` if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def atomic_write_bytes(path: str | os.PathLike, data: Payload) -> None:
    """Write ``data`` (bytes or byte blocks, a `Payload`) to ``path`` as fopen(path, "wb")
    would, all or nothing for a file.

    A symbolic link is followed (the link stays, its target gets ``data``); a FIFO or device
    is written in place; a regular file is replaced through a temporary file in its folder,
    keeping its permission bits, so ``path`` holds either its previous content or all of
    ``data``. No temporary file is left behind, whatever happens.

    Raises:
        NbfuncInputError: the folder is missing or not writable, ``path`` is a folder or a
            read-only file, or writing failed.
    """
    name = os.fspath(path)
    target = target_of(name)
    if target.kind == "stream":
        try:
            write_in_place(target, data, [])
        except OSError as exc:
            raise file_error(name, f"cannot write output ({exc.strerror})") from exc
        return
    temps: list[str] = []
    try:
        tmp = stage(target, data, temps)
        with signals_deferred():
            os.replace(tmp, target.real)
            temps.remove(tmp)
    except OSError as exc:
        raise file_error(
            name, f"cannot write output ({exc.strerror}); choose a writable file path"
        ) from exc
    finally:
        with signals_deferred():
            for tmp in temps:
                remove(tmp)
