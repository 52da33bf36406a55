"""Tests for nbfunc.io.atomic and nbfunc.io.errors."""

import os
import signal
import stat
import threading

import pytest

from nbfunc.io.atomic import UnwritableError, atomic_write_bytes, signals_deferred, target_of
from nbfunc.io.errors import NbfuncInputError, file_error


def test_writes_and_replaces(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_blocks_and_a_callable_giving_blocks_are_written_in_order(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, (block for block in (b"ab", memoryview(b"cd"), b"", b"e")))
    assert target.read_bytes() == b"abcde"
    atomic_write_bytes(target, lambda: [b"x", b"yz"])
    assert target.read_bytes() == b"xyz"


def test_a_failing_block_keeps_the_previous_content(tmp_path):
    """An encoder that fails after some blocks were written: the file keeps its previous
    content and no temporary is left (the blocks went to the temporary file only)."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def blocks():
        yield b"new, first block"
        raise MemoryError("encoding the second block")

    with pytest.raises(MemoryError):
        atomic_write_bytes(target, blocks())
    assert os.listdir(tmp_path) == ["out.bin"] and target.read_bytes() == b"old"


def test_permissions_follow_umask(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_missing_directory_is_input_error(tmp_path):
    target = tmp_path / "no_such_dir" / "out.bin"
    with pytest.raises(NbfuncInputError, match="no_such_dir/out.bin"):
        atomic_write_bytes(target, b"x")


def test_target_is_directory_leaves_no_temp_file(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(NbfuncInputError, match="taken"):
        atomic_write_bytes(tmp_path / "taken", b"x")
    assert os.listdir(tmp_path) == ["taken"]


def test_failure_keeps_previous_content(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(NbfuncInputError, match="out.bin.*Permission denied"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only directories")
def test_read_only_directory_is_input_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(NbfuncInputError, match="locked"):
            atomic_write_bytes(locked / "out.bin", b"x")
    finally:
        locked.chmod(0o700)


def test_file_error_is_one_line_value_error():
    err = file_error("P1.hkl", "found 3 numbers,\n expected 4", line=7)
    assert isinstance(err, ValueError)
    assert str(err) == "P1.hkl: line 7: found 3 numbers, expected 4"


# --------------------------------------------------------------------------------------------
# what fopen(path, "wb") would open
# --------------------------------------------------------------------------------------------
def test_target_of_classifies_as_fopen_opens(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "file").chmod(0o604)
    (tmp_path / "link").symlink_to("file")
    (tmp_path / "dangling").symlink_to("later")
    os.mkfifo(tmp_path / "fifo")
    file = target_of(str(tmp_path / "link"))
    assert (file.kind, file.real, file.mode) == ("file", str(tmp_path / "file"), 0o604)
    assert target_of(str(tmp_path / "dangling"))[1:3] == (str(tmp_path / "later"), "new")
    assert target_of(str(tmp_path / "fifo")).kind == "stream"
    assert target_of("/dev/null").kind == "stream"
    assert target_of("/dev/stdout").kind == "stream"  # even when stdout is a file


@pytest.mark.parametrize("make, needle", [
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: (p.write_bytes(b"x"), p.chmod(0o444)), "is read-only; make it writable"),
    (lambda p: p.symlink_to(p.name), "symbolic link that cannot be followed"),
    (lambda p: p.symlink_to(p.parent / "gone" / "x"), r"does not exist \(the symbolic link"),
])
def test_target_of_refuses_with_the_reason(tmp_path, make, needle):
    path = tmp_path / "out"
    make(path)
    with pytest.raises(UnwritableError, match=needle) as info:
        target_of(str(path))
    assert str(info.value).startswith(f"{path}: cannot write output, ")


def test_writes_through_a_symlink_and_keeps_it(tmp_path):
    (tmp_path / "real.bin").write_bytes(b"old")
    (tmp_path / "real.bin").chmod(0o640)
    (tmp_path / "link.bin").symlink_to("real.bin")
    atomic_write_bytes(tmp_path / "link.bin", b"new")
    assert os.readlink(tmp_path / "link.bin") == "real.bin"
    assert (tmp_path / "real.bin").read_bytes() == b"new"
    assert (tmp_path / "real.bin").stat().st_mode & 0o777 == 0o640
    assert sorted(os.listdir(tmp_path)) == ["link.bin", "real.bin"]


def test_writes_into_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    atomic_write_bytes(fifo, iter([b"through ", b"the pipe"]))
    reader.join(10)
    assert received == [b"through the pipe"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_read_only_file_is_refused_and_kept(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    target.chmod(0o444)
    with pytest.raises(NbfuncInputError, match="read-only"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"


def test_interrupt_while_staging_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def interrupted_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new")
    assert os.listdir(tmp_path) == ["out.bin"] and target.read_bytes() == b"old"


def test_signals_are_held_inside_the_block_and_sent_after_it():
    events = []
    previous = signal.signal(signal.SIGTERM, lambda *_: events.append("handled"))
    try:
        with signals_deferred():
            signal.raise_signal(signal.SIGTERM)
            events.append("block ran to its end")
        assert events == ["block ran to its end", "handled"]
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("name", ["new/", "new/deeper/", "new/.", "new/.."])
def test_a_name_ending_like_a_folder_is_refused_not_created_as_a_file(tmp_path, name):
    """C's fopen("new/", "wb") fails; following realpath, which drops the '/' (or '/.'),
    created a file named ``new``."""
    with pytest.raises(UnwritableError, match="ends with '/', '.' or '..'"):
        target_of(f"{tmp_path}/{name}")
    assert os.listdir(tmp_path) == []


def test_a_path_through_a_missing_folder_is_refused(tmp_path):
    """``none/../x.bin``: the kernel (and C's fopen) needs ``none`` to exist; realpath did not."""
    with pytest.raises(UnwritableError, match="none/.. does not exist"):
        target_of(f"{tmp_path}/none/../x.bin")
    assert os.listdir(tmp_path) == []
