"""Tests for nbfunc.io.atomic and nbfunc.io.errors."""

import os

import pytest

from nbfunc.io.atomic import atomic_write_bytes
from nbfunc.io.errors import NbfuncInputError, file_error


def test_writes_and_replaces(tmp_path):
    target = tmp_path / "out.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["out.bin"]


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
