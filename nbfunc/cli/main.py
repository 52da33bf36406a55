"""``python -m nbfunc`` / ``nbfunc``: nanoBragg's command line on the functional core.

The run: flags -> (`Params`, `RunInfo`) -> render -> statistics -> outputs written as the C
program writes them (float image, SMV int and noise images, PGM, Fdump.bin), all or nothing,
with the C program's statistics lines on stdout. Bad input exits with status 2 and one line
``nbfunc: error: ...`` on stderr naming the flag or file; nothing is written.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import torch

HELP_HEADER = """usage: nbfunc [nanoBragg flags]   e.g.
  nbfunc -cell 50 50 50 90 90 90 -default_F 100 -N 5 -lambda 1 -distance 100 \\
         -detpixels 256 -pixel 0.1 -floatfile out.bin -intfile out.img -seed 1
Every flag of the C program nanoBragg is accepted with its meaning and units (docs/cli.md).
Structure factors come from -hkl FILE, a Fdump.bin left by an earlier -hkl run, or -default_F;
the cell from -cell or -mat FILE. Outputs: -floatfile -intfile -noisefile -pgmfile (written by
default under C's names; -nonoise, -nopgm to skip), -scale, -adc. Conventions: -mosflm -xds
-adxv -denzo -dials, or custom vectors. nbfunc extensions: -dtype, -chunk, -device,
-cbffile, -nxsfile, -params_out FILE (save the run's parameter tree) and -params FILE (render
a saved tree again, with output flags only).
"""

COMPILE_THRESHOLD = 50_000_000
"""Evaluations above which the command line compiles the kernel. Below it an eager render
(about 6-10 M evaluations/s in float64 on two cores) finishes before a compile would: about
5 s with torch's on-disk compile cache warm, 10-20 s cold. The compiled kernel then runs
3-5x faster than eager."""


def help_text() -> str:
    """The -h/--help text: an example, then every flag with its values and meaning."""
    from nbfunc.cli.flags import usage

    return HELP_HEADER + "\n" + usage().split("\n", 1)[1]


def version_text() -> str:
    """The --version line: nbfunc's version and the torch it runs on."""
    from nbfunc import __version__

    return f"nbfunc {__version__} (torch {torch.__version__})"


def _fail(message: str) -> int:
    """One line on stderr, exit status 2."""
    from nbfunc.io.errors import clip_words

    line = clip_words(message) if message else "bad input"
    print(f"nbfunc: error: {line}", file=sys.stderr)
    return 2


def _derive(argv: list[str]):
    """`derive`, with every bad-input exception turned into (None, message)."""
    from nbfunc.cli.derive import derive
    from nbfunc.io.errors import NbfuncInputError

    try:
        return derive(argv), None
    except (NbfuncInputError, ValueError) as err:
        return None, str(err).splitlines()[0] if str(err) else type(err).__name__
    except ArithmeticError as err:
        return None, (f"these flags give an undefined geometry ({type(err).__name__}: {err}); "
                      "check for lengths, cells or vectors of zero")


def _to_device(params, device: str):
    try:
        return params.to(device=device), None
    except (RuntimeError, AssertionError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        reason = reason.removeprefix("Params.to: ").split("; give ")[0]
        return None, f"-device {device}: {reason}; use -device cpu"


def _out_of_memory(err: BaseException) -> bool:
    """MemoryError, or torch's allocation failure (RuntimeError on CPU, OutOfMemoryError on GPU)."""
    text = str(err)
    return (isinstance(err, MemoryError) or "can't allocate memory" in text
            or "out of memory" in text)


def _render(params, info):
    """Render with the phi carry (C parity), with a progress meter when one is wanted.

    Returns:
        the ROI rectangle of the float32 image (`nbfunc.cli.outputs.RoiImage`): memory of the
        ROI's size, whatever the detector's.
    """
    from nbfunc.cli import progress
    from nbfunc.cli.outputs import roi_image
    from nbfunc.render import initial_carry, make_plan, render_pixels_for_cli

    from nbfunc.compile import COMPILE_DISABLED

    plan, pixels = make_plan(params)
    compile = plan.evaluations(len(pixels)) >= COMPILE_THRESHOLD
    plan, pixels = make_plan(params, large_chunks=compile and not COMPILE_DISABLED)
    chunks = plan.chunks(len(pixels))
    report = None
    if progress.wanted(info.flags.progress_meter, sys.stderr, chunks):
        report = progress.meter(sys.stderr, progress.is_terminal(sys.stderr))
    values, flat, _ = render_pixels_for_cli(params, initial_carry(params), compile, report)
    return roi_image(values.detach().to("cpu", torch.float64).numpy(), flat.cpu().numpy(),
                     info.roi, (params.detector.spixels, params.detector.fpixels))


class Terminated(BaseException):
    """SIGTERM, turned into an exception (like KeyboardInterrupt for SIGINT) so that the
    rollback of half-written outputs runs before the process exits."""


SIGNAL_EXITS = {signal.SIGINT: (KeyboardInterrupt, "interrupted", 130),
                signal.SIGTERM: (Terminated, "terminated", 128 + signal.SIGTERM)}
"""Signal -> (exception it becomes, word for the message, exit status 128 + signal number)."""


def _raise_for(signum: int, _frame) -> None:
    raise SIGNAL_EXITS[signum][0]()


def _signal_message(err: BaseException, word: str) -> str:
    """The one stderr line for a run stopped by a signal: what became of the outputs."""
    if getattr(err, "outputs_written", False):
        return f"nbfunc: {word} after every output was written"
    streamed = getattr(err, "streamed", [])
    if streamed:
        return (f"nbfunc: {word}; no file output was changed, but {', '.join(streamed)} "
                "got part of its data")
    return f"nbfunc: {word}; no output was written"


BROKEN_PIPE_EXIT = 128 + signal.SIGPIPE
"""Exit status when stdout or stderr is a pipe whose reader has gone (``nbfunc ... | head``):
141, what a shell reports for the C program, which SIGPIPE kills at its next write."""


def _drop_closed_streams() -> None:
    """Point stdout and stderr, where their reader has gone, at /dev/null: the text still
    buffered for them is dropped instead of failing again in the interpreter's last flush."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                null = os.open(os.devnull, os.O_WRONLY)
                try:
                    os.dup2(null, stream.fileno())
                finally:
                    os.close(null)


def run(argv: list[str]) -> int:
    """Run the nanoBragg command line ``argv`` (no program name); return the exit status.

    SIGINT and SIGTERM stop the run with one line on stderr and status 130 or 143, after
    removing temporary files and restoring outputs already replaced; the previous signal
    handlers are restored on return. Handlers are installed only in the main thread, and not
    for a signal that is ignored (as SIGINT is for a job started with ``&`` by a script).

    A write to a stdout or stderr whose reader has gone (``nbfunc ... | head -1``) stops the
    run there, quietly, with status 141 (`BROKEN_PIPE_EXIT`), as SIGPIPE stops the C program.
    The outputs are never cut short by it: nbfunc prints the lines about them after writing
    them all, so with a buffered stdout (any pipe) the outputs are all written; an unbuffered
    stdout (``python -u``) that breaks while the run's summary is printed stops the run before
    anything is written.
    """
    handled = threading.current_thread() is threading.main_thread()
    previous = {}
    try:
        for signum in SIGNAL_EXITS if handled else ():
            if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. SIGINT of `nbfunc &`
                previous[signum] = signal.signal(signum, _raise_for)
        status = _run(argv)
        sys.stdout.flush()  # a reader that has gone shows here, not at the interpreter's exit
        return status
    except BrokenPipeError:
        _drop_closed_streams()
        return BROKEN_PIPE_EXIT
    except (KeyboardInterrupt, Terminated) as err:
        _, word, status = next(v for v in SIGNAL_EXITS.values() if isinstance(err, v[0]))
        with contextlib.suppress(OSError):
            sys.stdout.flush()
        print(_signal_message(err, word), file=sys.stderr)
        return status
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _run(argv: list[str]) -> int:
    """`run` without the signal handling."""
    from nbfunc.cli import outputs
    from nbfunc.cli.flags import HelpRequested, VersionRequested
    from nbfunc.compile import check_settings
    from nbfunc.io.errors import NbfuncInputError

    try:
        check_settings()
    except ValueError as err:
        return _fail(str(err))
    if not argv:
        print(HELP_HEADER + "Run nbfunc -h for every flag.")
        return _fail("no flags given; nanoBragg needs at least a cell (-cell or -mat) and "
                     "structure factors (-hkl or -default_F)")
    try:
        derived, message = _derive(argv)
    except HelpRequested:
        print(help_text())
        return 0
    except VersionRequested:
        print(version_text())
        return 0
    if message is not None:
        return _fail(message)
    params, info = derived
    f = info.flags
    try:
        outputs.check_writable(outputs.planned_outputs(f))
        outputs.check_formats(params, f)
    except NbfuncInputError as err:
        return _fail(str(err))
    if f.device != "cpu":
        params, message = _to_device(params, f.device)
        if message is not None:
            return _fail(message)
    for line in info.warnings:
        print(f"WARNING: {line}")
    outputs.print_summary(params, info)
    start = time.perf_counter()
    try:
        float_image = _render(params, info)
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise
        return _fail(f"out of memory while rendering ({str(err).splitlines()[0][:120]}); give a "
                     "smaller -chunk, a -roi, or a smaller detector")
    elapsed = time.perf_counter() - start
    stats = outputs.image_statistics(float_image, info.mask, info.header.pixel_size_mm * 1e-3,
                                     info.oversample)
    try:
        lines = outputs.write_all(float_image, stats, info, params)
    except NbfuncInputError as err:
        return _fail(str(err))
    print("\n".join(lines))
    print(f"rendered {stats['n']} pixels in {elapsed:.3f} s")
    return 0


def main() -> None:
    """Console-script entry point."""
    sys.exit(run(sys.argv[1:]))
