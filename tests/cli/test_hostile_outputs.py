"""Outputs that are not plain new files, and signals, through the command line.

Each case runs the command line (in a subprocess where a signal is sent) and checks that the
outputs land where C's fopen(name, "wb") would put them, that nothing but the outputs
changes, and that no temporary file is left behind.
"""
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from nbfunc.cli import main, outputs

SMALL = ["-cell", "20", "20", "20", "90", "90", "90", "-N", "2", "-default_F", "10",
         "-detpixels", "12", "-pixel", "0.5", "-distance", "50", "-oversample", "1",
         "-seed", "7", "-noprogress"]
SLOW = ["-cell", "20", "20", "20", "90", "90", "90", "-N", "2", "-default_F", "10",
        "-detpixels", "400", "-pixel", "0.1", "-distance", "50", "-oversample", "3",
        "-seed", "7", "-noprogress"]
"""A render of 1.4 M sub-pixel evaluations: several seconds on two cores, long enough to be
interrupted once its summary line is printed."""
DEFAULT_NAMES = ("floatimage.bin", "intimage.img", "image.pgm", "noiseimage.img")


def _env():
    env = dict(os.environ, NANOBRAGG_DISABLE_COMPILE="1", PYTHONUNBUFFERED="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def start(argv, cwd):
    """Start ``python -m nbfunc argv`` in ``cwd``, stdout and stderr piped."""
    def default_sigint():  # a shell ignores SIGINT in jobs it starts with &
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen([sys.executable, "-m", "nbfunc", *argv], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)


def earlier_run(folder) -> dict[str, bytes]:
    """Outputs of an earlier run, under the default names."""
    old = {}
    for name in DEFAULT_NAMES:
        old[name] = f"output of an earlier run: {name}".encode()
        (folder / name).write_bytes(old[name])
    return old


def assert_untouched(folder, old, extra=()):
    """Only ``old`` (and ``extra``) in ``folder``, with their earlier content: no debris."""
    assert sorted(os.listdir(folder)) == sorted([*old, *extra])
    for name, data in old.items():
        assert (folder / name).read_bytes() == data, name


def reference_float(tmp_path, monkeypatch) -> bytes:
    """The float image of ``SMALL``, written to a plain new file."""
    ref = tmp_path / "ref"
    ref.mkdir()
    monkeypatch.chdir(ref)
    assert main.run(SMALL + ["-nonoise", "-nopgm"]) == 0
    monkeypatch.chdir(tmp_path)
    return (ref / "floatimage.bin").read_bytes()


def one_error_line(capsys) -> str:
    """The only stderr line of the run."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


# --------------------------------------------------------------------------------------------
# symbolic links, FIFOs, devices, read-only files
# --------------------------------------------------------------------------------------------
def test_symlink_is_written_through_and_kept(tmp_path, monkeypatch):
    expected = reference_float(tmp_path, monkeypatch)
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "image.bin"
    target.write_bytes(b"old")
    target.chmod(0o640)
    (tmp_path / "link.bin").symlink_to(target)
    assert main.run(SMALL + ["-nonoise", "-nopgm", "-floatfile", "link.bin"]) == 0
    assert os.readlink(tmp_path / "link.bin") == str(target)
    assert target.read_bytes() == expected
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.listdir(tmp_path / "data") == ["image.bin"]


def test_dangling_symlink_creates_its_target_as_fopen_does(tmp_path, monkeypatch):
    expected = reference_float(tmp_path, monkeypatch)
    (tmp_path / "link.bin").symlink_to("made.bin")
    assert main.run(SMALL + ["-nonoise", "-nopgm", "-floatfile", "link.bin"]) == 0
    assert (tmp_path / "link.bin").is_symlink()
    assert (tmp_path / "made.bin").read_bytes() == expected


def test_symlink_into_a_missing_folder_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.bin").symlink_to(tmp_path / "gone" / "x.bin")
    assert main.run(SMALL + ["-floatfile", "link.bin"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("nbfunc: error: -floatfile link.bin:")
    assert "does not exist" in line and "symbolic link points to" in line
    assert os.listdir(tmp_path) == ["link.bin"]


def test_symlink_loop_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "loop.bin").symlink_to("loop.bin")
    assert main.run(SMALL + ["-intfile", "loop.bin"]) == 2
    assert "-intfile loop.bin" in one_error_line(capsys)
    assert os.listdir(tmp_path) == ["loop.bin"]


def test_fifo_is_written_in_place(tmp_path, monkeypatch):
    expected = reference_float(tmp_path, monkeypatch)
    fifo = tmp_path / "pipe.bin"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert main.run(SMALL + ["-nonoise", "-nopgm", "-floatfile", "pipe.bin"]) == 0
    reader.join(10)
    assert received == [expected]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["intimage.img", "pipe.bin", "ref"]


def _null_device(tmp_path):
    """A character device that discards what is written: a fresh one in ``tmp_path`` when run
    as root (so that a regression cannot replace the system's /dev/null), else /dev/null."""
    if os.geteuid() != 0:
        return "/dev/null"
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        node.write_bytes(b"probe")
    except OSError:
        pytest.skip("cannot make or write a device node here (no CAP_MKNOD or nodev mount)")
    return str(node)


def test_device_is_written_in_place(tmp_path, monkeypatch):
    device = _null_device(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = os.stat(device)
    assert main.run(SMALL + ["-nonoise", "-nopgm", "-floatfile", device]) == 0
    after = os.stat(device)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert after.st_ino == before.st_ino


def test_read_only_file_is_refused_before_rendering(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    old = earlier_run(tmp_path)
    (tmp_path / "intimage.img").chmod(0o444)
    assert main.run(SMALL) == 2
    line = one_error_line(capsys)
    assert line.startswith("nbfunc: error: -intfile intimage.img:") and "read-only" in line
    assert "chmod u+w intimage.img" in line and len(line) < 300
    assert "sensor layers" not in capsys.readouterr().out
    assert_untouched(tmp_path, old)


def test_replaced_file_keeps_its_permission_bits(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = earlier_run(tmp_path)
    (tmp_path / "floatimage.bin").chmod(0o600)
    (tmp_path / "intimage.img").chmod(0o664)
    assert main.run(SMALL) == 0
    assert stat.S_IMODE((tmp_path / "floatimage.bin").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "intimage.img").stat().st_mode) == 0o664
    assert sorted(os.listdir(tmp_path)) == sorted(old)


# --------------------------------------------------------------------------------------------
# Fdump.bin is optional
# --------------------------------------------------------------------------------------------
HKL = "".join(f"{h} {k} {l} {1 + abs(h) + abs(k) + abs(l)}\n"
              for h in range(-2, 3) for k in range(-2, 3) for l in range(-2, 3))


@pytest.mark.parametrize("blocker", ["folder", "read-only"])
def test_unwritable_fdump_warns_and_the_images_are_written(tmp_path, monkeypatch, capsys,
                                                            blocker):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "P1.hkl").write_text(HKL)
    if blocker == "folder":
        (tmp_path / "Fdump.bin").mkdir()
    else:
        (tmp_path / "Fdump.bin").write_bytes(b"kept")
        (tmp_path / "Fdump.bin").chmod(0o444)
    assert main.run(SMALL + ["-hkl", "P1.hkl"]) == 0
    assert "WARNING: unable to open dump file: Fdump.bin" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == sorted([*DEFAULT_NAMES, "Fdump.bin", "P1.hkl"])
    assert (tmp_path / "floatimage.bin").stat().st_size == 4 * 144
    if blocker == "folder":
        assert os.listdir(tmp_path / "Fdump.bin") == []
    else:
        assert (tmp_path / "Fdump.bin").read_bytes() == b"kept"


# --------------------------------------------------------------------------------------------
# signals
# --------------------------------------------------------------------------------------------
def _wait_for_summary(proc):
    """Read stdout until the geometry summary (printed just before rendering) has come."""
    for line in proc.stdout:
        if "sensor layers" in line:
            return
    pytest.fail("the run ended before rendering: " + proc.stderr.read())


@pytest.mark.parametrize("signum, status, word", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated")])
def test_signal_during_render_exits_cleanly(tmp_path, signum, status, word):
    old = earlier_run(tmp_path)
    proc = start(SLOW, tmp_path)
    try:
        _wait_for_summary(proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == status
    assert err == f"nbfunc: {word}; no output was written\n"
    assert_untouched(tmp_path, old)


def test_sigterm_while_waiting_on_a_fifo_rolls_back_the_files(tmp_path):
    """The regular files are renamed into place first, then the FIFO output is opened, which
    waits for a reader: SIGTERM there puts the earlier files back."""
    old = earlier_run(tmp_path)
    os.mkfifo(tmp_path / "pipe.img")
    proc = start(SMALL + ["-noisefile", "pipe.img"], tmp_path)
    try:
        deadline = time.monotonic() + 30
        while (tmp_path / "intimage.img").read_bytes() == old["intimage.img"]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143
    assert err == "nbfunc: terminated; no output was written\n"
    assert_untouched(tmp_path, old, extra=["pipe.img"])
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe.img").st_mode)


def test_run_restores_the_signal_handlers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    assert main.run(SMALL + ["-nonoise", "-nopgm"]) == 0
    assert {s: signal.getsignal(s) for s in before} == before


def test_an_ignored_signal_stays_ignored_during_the_run(tmp_path, monkeypatch):
    """A job started with ``&`` by a shell script ignores SIGINT; so does the run, as C does."""
    monkeypatch.chdir(tmp_path)
    seen = []
    summary = outputs.print_summary
    monkeypatch.setattr(outputs, "print_summary",
                        lambda *a: (seen.append(signal.getsignal(signal.SIGINT)), summary(*a)))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main.run(SMALL + ["-nonoise", "-nopgm"]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == [signal.SIG_IGN]


# --------------------------------------------------------------------------------------------
# a reader that goes away (nbfunc ... | head -1)
# --------------------------------------------------------------------------------------------
def _closed_pipe(buffering: int):
    """A text stream into a pipe whose reader has gone: writing it fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return os.fdopen(write_end, "w", buffering=buffering)


def test_closed_stdout_exits_141_quietly_with_every_output_written(tmp_path, monkeypatch,
                                                                   capsys):
    """Block-buffered stdout (any pipe) meets the gone reader when the run's lines are
    flushed, after the outputs were written: status 141 as a shell reports for the C program
    killed by SIGPIPE, no traceback, the outputs those of a normal run, and the unsent lines
    dropped (the interpreter's last flush cannot fail again)."""
    old = earlier_run(tmp_path)
    (tmp_path / "ref").mkdir()
    monkeypatch.chdir(tmp_path / "ref")
    assert main.run(SMALL) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    stdout = _closed_pipe(buffering=-1)
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        assert main.run(SMALL) == main.BROKEN_PIPE_EXIT == 141
        print("more text", file=stdout)
        stdout.flush()  # now into /dev/null
    finally:
        stdout.close()
    assert capsys.readouterr().err == ""
    assert sorted(os.listdir(tmp_path)) == sorted([*old, "ref"])
    for name in old:
        assert (tmp_path / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_stdout_closed_before_rendering_stops_the_run_with_nothing_written(tmp_path,
                                                                           monkeypatch, capsys):
    """A line-buffered stdout meets the gone reader at the summary, before the render: the
    run stops there (as SIGPIPE stops the C program at that write) and no output changes."""
    old = earlier_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    stdout = _closed_pipe(buffering=1)
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        assert main.run(SMALL) == 141
    finally:
        stdout.close()
    assert capsys.readouterr().err == ""
    assert_untouched(tmp_path, old)
