"""Progress of a command-line render, on stderr.

nanoBragg prints ``N% done`` lines from its pixel loop. nbfunc draws a text bar on stderr
instead (stdout keeps the C program's messages): redrawn in place on a terminal, one line per
10 % otherwise, and only for renders long enough to need it. ``-noprogress`` turns it off.

The renderer calls ``progress(done, total)`` after every chunk (`nbfunc.render.render_pixels_for_cli`).
"""
from __future__ import annotations

import time
from typing import Callable, TextIO


MANY_CHUNKS = 64
"""Chunks above which a render shows progress even when stderr is not a terminal."""

def is_terminal(stream: TextIO) -> bool:
    """True when ``stream`` is an interactive terminal."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def wanted(enabled: bool, stream: TextIO, chunks: int) -> bool:
    """Show progress: the -progress flag (default on) and a terminal or a long render."""
    return enabled and chunks > 1 and (is_terminal(stream) or chunks >= MANY_CHUNKS)


def meter(stream: TextIO, terminal: bool, width: int = 30) -> Callable[[int, int], None]:
    """A ``report(done, total)`` that draws the progress of a render on ``stream``.

    On a terminal the bar is redrawn in place (``\\r``) and ends with a newline at 100 %;
    elsewhere one ``nbfunc: rendering  NN% done`` line is written per 10 %.
    """
    start = time.perf_counter()
    shown = [-1]

    def report(done: int, total: int) -> None:
        percent = 100 * done // max(total, 1)
        if terminal:
            filled = width * done // max(total, 1)
            elapsed = time.perf_counter() - start
            stream.write(f"\rrendering [{'#' * filled}{'.' * (width - filled)}] {percent:3d}% "
                         f"{elapsed:6.1f} s")
            if done >= total:
                stream.write("\n")
        elif percent // 10 > shown[0]:
            shown[0] = percent // 10
            stream.write(f"nbfunc: rendering {10 * shown[0]:3d}% done\n")
        stream.flush()

    return report
