"""Tests for nbfunc.io.errors: one-line file errors and reading with a size limit."""
import os
import threading
import time

import pytest

from nbfunc.io.errors import (WORD_MAX, NbfuncInputError, clip_words, file_error, read_limited,
                              read_text, size_text)


def test_file_error_is_one_line_naming_the_file():
    err = file_error("x.hkl", "found\n3   numbers", line=2)
    assert str(err) == "x.hkl: line 2: found 3 numbers"


@pytest.mark.parametrize("word", ["x" * 400, "'" + "1" * 100000 + "',", "d/" * 2100 + "x"])
def test_file_error_clips_long_names_and_values(word):
    """A name past NAME_MAX or PATH_MAX, or a 100 kB token, still gives a short line that
    shows its start, its end and its length."""
    message = str(file_error(word, f"value {word} is bad", line=1))
    assert len(message) < 2 * (WORD_MAX + 40) + 40, len(message)
    assert f"…({len(word) + 1}" in message and f"…({len(word)} characters)…" in message
    assert message.count(word[:WORD_MAX * 2 // 3]) == 2 and message.endswith("is bad")


def test_clip_words_keeps_short_words():
    text = "-hkl P1.hkl: line 7: found 3 values"
    assert clip_words(text) == text and clip_words("a " * 3 + "\n b") == "a a a b"


@pytest.mark.parametrize("n, text", [(1 << 30, "1 GiB"), (64 << 20, "64 MiB"), (300, "300 bytes"),
                                     (1025, "1025 bytes")])
def test_size_text(n, text):
    assert size_text(n) == text


class TestReadLimited:
    def test_reads_a_file_up_to_the_limit(self, tmp_path):
        path = tmp_path / "a.txt"
        path.write_bytes(b"x" * 100)
        assert read_limited(path, "test file", "fix it", 100) == b"x" * 100

    def test_regular_file_over_the_limit(self, tmp_path):
        path = tmp_path / "a.txt"
        path.write_bytes(b"x" * 101)
        with pytest.raises(NbfuncInputError, match="a.txt: holds more than 100 bytes, more than "
                                                   "any real test file; fix it"):
            read_limited(path, "test file", "fix it", 100)

    def test_endless_device_stops_at_the_limit(self):
        with pytest.raises(NbfuncInputError, match="/dev/zero: holds more than 4 KiB"):
            read_limited("/dev/zero", "test file", "fix it", 4096, binary=True)

    def test_binary_data_in_a_text_file(self):
        with pytest.raises(NbfuncInputError, match=r"binary data \(a NUL byte at offset 0\)"):
            read_limited("/dev/zero", "test file", "fix it", 1 << 30)

    def test_folder(self, tmp_path):
        with pytest.raises(NbfuncInputError, match="is a folder, expected a file"):
            read_limited(tmp_path, "test file", "fix it", 100)

    def test_missing(self, tmp_path):
        with pytest.raises(NbfuncInputError, match=r"gone: cannot read test file \(No such file"):
            read_limited(tmp_path / "gone", "test file", "fix it", 100)

    def test_fifo_without_writer_reads_as_empty(self, tmp_path):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        assert read_limited(fifo, "test file", "fix it", 100) == b""

    def test_fifo_with_endless_writer_stops_at_the_limit(self, tmp_path):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)

        def write_forever():
            try:
                with open(fifo, "wb") as handle:
                    while True:
                        handle.write(b"1 2 3 4\n" * 512)
            except (BrokenPipeError, OSError):
                pass  # the reader closed the pipe

        writer = threading.Thread(target=write_forever, daemon=True)
        writer.start()
        time.sleep(0.3)  # the writer is waiting in open(): the read then waits for its data
        with pytest.raises(NbfuncInputError, match="holds more than 64 KiB"):
            read_limited(fifo, "test file", "fix it", 64 << 10)
        writer.join(timeout=10)
        assert not writer.is_alive()

    def test_read_text_universal_newlines(self, tmp_path):
        path = tmp_path / "a.txt"
        path.write_bytes(b"1\r\n2\r3\n")
        assert read_text(path, "test file", "fix it", 100) == "1\n2\n3\n"
