"""The one place where nbfunc applies ``torch.compile``.

`compiled(fn)` wraps a pure tensor function. The environment variable
``NANOBRAGG_DISABLE_COMPILE`` is read once, at import: ``1`` (or ``true``/``yes``) runs every
function eagerly, ``0`` (or unset, ``false``/``no``) compiles. Any other spelling is rejected
by the first render (a ValueError naming the variable; the command line prints it as its
one-line error), not by the import.

Callers decide once per call whether to run compiled (`COMPILE_AFTER`: the render decides,
with the kernel's ``worth_compiling``). A call made inside a ``torch.func`` transform (grad, jacrev,
jacfwd, hessian, jvp, vmap, and their compositions) or whose inputs require a gradient goes
through `nbfunc.derived.derived_call`: autograd's and the transforms' rules call compiled
functions derived from the eager one (its VJP, its JVP, its batched form), so ``.backward()``,
derivatives of every order and batches run compiled code.

A user's ``torch.compile`` over a transform (``torch.compile(torch.func.grad(loss))``)
does not trace the render (`nbfunc.render._render` is excluded with ``torch.compiler.disable``):
it runs as nbfunc runs it, compiled by the functions here.

A compile that fails is reported with a warning that names the function and the error, and
that function then runs eagerly; it is never swallowed silently.
``NANOBRAGG_COMPILE_STRICT=1`` turns a failed compile into an error.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch
import torch.utils._pytree as pytree

from nbfunc.derived import derived_call

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _read_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={raw!r} is not understood; use 1 (on) or 0 (off)")


SETTING_ERRORS: list[str] = []
"""One line per environment flag whose value was not understood at import (`check_settings`)."""


def _flag_at_import(name: str, default: bool, if_unreadable: bool) -> bool:
    """`_read_flag`, with a value that is not understood recorded in `SETTING_ERRORS` (and
    ``if_unreadable`` used meanwhile) instead of raised, so that importing nbfunc never fails:
    `check_settings` raises it at the first render, and the command line prints it as its
    one-line error."""
    try:
        return _read_flag(name, default)
    except ValueError as err:
        SETTING_ERRORS.append(str(err))
        return if_unreadable


def check_settings() -> None:
    """Raise ValueError naming every environment flag that was not understood at import."""
    if SETTING_ERRORS:
        raise ValueError("; ".join(SETTING_ERRORS))


COMPILE_DISABLED = _flag_at_import("NANOBRAGG_DISABLE_COMPILE", False, True)
"""True when ``NANOBRAGG_DISABLE_COMPILE`` turned compilation off (read once at import)."""
COMPILE_STRICT = _flag_at_import("NANOBRAGG_COMPILE_STRICT", False, False)

COMPILE_AFTER = 50_000_000
"""Evaluations (pixel x path x orientation) after which a compiled function's callers switch
from its eager form to its compiled form (`compiled`'s ``worth_compiling``): a render is
compiled once the evaluations rendered eagerly in this process through the same function,
its own included, reach this number. Eager renders run about 6-10 M evaluations/s in float64
on two cores, so a user's first renders (and every small one) return without the 10-40 s
of a cold compile, and compiling starts when it has paid for itself. Set it to 0 to compile
every render."""

COMPILE_AFTER_TRANSFORMS = 200_000_000
"""`COMPILE_AFTER` for renders inside torch.func transforms (``grad``, ``jacfwd``,
``hessian``, ...), whose eager work is counted apart. The functions derived for a transform
(`nbfunc.derived`) take far longer to compile than a forward (a first gradient on bench_1024's
256x256 ROI: 90-115 s on two cores) while an eager gradient runs about 2 M evaluations/s, so
these compile after four times the work. Set it to 0 to compile every transformed render."""


def _keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks of up to 256 MiB for reuse instead of returning them to
    the kernel at once.

    A compiled backward allocates and frees some tens of MiB of per-evaluation arrays per
    chunk, and a forward-mode Jacobian of a batch of replicas some hundreds (the pull test's:
    75 MiB of partial sums, about 300 MiB in all). With glibc's start-up thresholds (128 KiB)
    every such array is fresh memory from the kernel, and each of its pages costs a page
    fault when first written: on bench_1024's gradient that was about 5000 faults and half of
    the time. glibc raises these thresholds by itself after it frees a large block, but only
    up to 32 MiB for allocations served by mmap and 64 MiB for the heap top it keeps. This
    serves blocks of up to 256 MiB from the heap and keeps a heap top of up to 512 MiB: with
    32 and 256 MiB, a pull-test call of 50 replicas (`benchmarks/pull_test.py`) mapped its
    partial sums afresh and had its heap trimmed, about 18000 page faults and 135 ms a call,
    against about 100 faults and 117 ms; with 64 MiB, `vmap` of 64 renders of 64x64 pixels
    (some 100 MiB of arrays a call) was trimmed and faulted in again every few calls (median
    25.6 ms, calls between 12 and 31 ms; 11.9 ms every call with 256 MiB). A process keeps at
    most 512 MiB more memory mapped than it uses. Skipped where the C library is not glibc,
    when ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` is set, and with
    ``NANOBRAGG_KEEP_FREED_MEMORY=0``.

    Returns:
        True when the thresholds were set.
    """
    if not _flag_at_import("NANOBRAGG_KEEP_FREED_MEMORY", True, False) or any(
            name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 -- present in glibc only
    except (OSError, AttributeError):  # not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 256 << 20)) and bool(mallopt(m_trim_threshold, 512 << 20))


KEEPS_FREED_MEMORY = _keep_freed_memory()
"""True when `_keep_freed_memory` set glibc's thresholds at import."""


class CompileError(RuntimeError):
    """torch.compile failed for a function while NANOBRAGG_COMPILE_STRICT=1."""


def in_functorch_transform() -> bool:
    """True while running inside vmap/grad/jacfwd/jacrev (a functorch interpreter is active)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _active_transforms() -> list:
    """The kinds (``torch._C._functorch.TransformType``) of the functorch levels now active."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return [level.key() for level in retrieve_all_functorch_interpreters()]


def single_vmap_level() -> bool:
    """True when exactly one functorch transform is active and it is vmap."""
    return _active_transforms() == [torch._C._functorch.TransformType.Vmap]


def forward_mode_active() -> bool:
    """True inside a forward-mode transform (``jvp``, ``jacfwd``, a Hessian's outer level)."""
    return torch._C._functorch.TransformType.Jvp in _active_transforms()


def innermost_tangent(tensors) -> bool | None:
    """Whether any of ``tensors`` carries a tangent of the innermost transform when that is
    forward mode (``jvp``, ``jacfwd``, under any ``vmap`` outside it); None when the
    innermost transform is another (a ``vmap`` inside ``jvp`` cannot read a tangent) or none."""
    top = torch._C._functorch.peek_interpreter_stack()
    if top is None or top.key() != torch._C._functorch.TransformType.Jvp:
        return None
    from torch.autograd.forward_ad import unpack_dual

    return any(unpack_dual(x).tangent is not None for x in tensors)


def second_order_active() -> bool:
    """True inside forward mode over reverse mode (a Hessian: ``jacfwd(jacrev(f))``)."""
    kinds, transform = _active_transforms(), torch._C._functorch.TransformType
    return transform.Jvp in kinds and transform.Grad in kinds


def _underlying_requires_grad(x: torch.Tensor) -> bool:
    functorch = torch._C._functorch
    while functorch.is_batchedtensor(x):
        x = functorch.get_unwrapped(x)
    return x.requires_grad


def _needs_grad(leaves) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves)


def only_batching(tensors) -> bool:
    """True inside one plain ``vmap`` whose inputs ``tensors`` carry no gradient (nothing will
    be differentiated)."""
    return (single_vmap_level()
            and not (torch.is_grad_enabled() and any(_underlying_requires_grad(x) for x in tensors)))


def report_failure(name: str, err: Exception) -> None:
    """A failed compile: a RuntimeWarning naming the function and the error (the caller then
    runs it eagerly), or `CompileError` with ``NANOBRAGG_COMPILE_STRICT=1``."""
    if COMPILE_STRICT:
        raise CompileError(f"torch.compile failed for {name}: {err}") from err
    warnings.warn(f"torch.compile failed for {name} ({type(err).__name__}: "
                  f"{str(err).splitlines()[0] if str(err) else ''}); running it eagerly. "
                  "Set NANOBRAGG_DISABLE_COMPILE=1 to skip compilation.", RuntimeWarning,
                  stacklevel=3)


def per_call_under_transforms(fn: Callable) -> Callable:
    """``fn``, an eager function, whose calls inside torch.func transforms go through
    `derived_call` with eager derived functions: the transform keeps no graph between a call's
    forward and its backward, so a render's memory under grad, jacfwd or hessian is set by
    one chunk (the backward recomputes the chunk), not by the whole image. Outside transforms
    ``fn`` runs as it is."""
    cache: dict = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not in_functorch_transform():
            return fn(*args, **kwargs)
        return derived_call(cache, fn, fn.__qualname__, args, kwargs, report_failure, compile=False)

    wrapper.eager = fn
    return wrapper


def compiled(fn: Callable, static_argnames: tuple[str, ...] = (), **compile_kwargs) -> Callable:
    """``fn`` compiled with torch.compile, unless compilation is disabled.

    Args:
        fn: a pure function of tensors; ``static_argnames`` are keyword arguments holding
            plain hashable Python values (loop counts, flags) that select a code path.
        compile_kwargs: passed to ``torch.compile`` (default ``dynamic=False``).
    Returns:
        a function with the same signature. ``wrapper.eager`` is the original function;
        ``wrapper.runs_compiled()`` says whether a call made now would run compiled code.
    """
    if COMPILE_DISABLED:
        fn.eager = fn
        fn.runs_compiled = lambda: False
        fn.worth_compiling = lambda evaluations: False
        return fn
    options = {"dynamic": False, **compile_kwargs}
    state = {"compiled": None, "failed": False, "derived": {}, "eager_work": {}}

    def worth_compiling(evaluations: int) -> bool:
        """Whether a call doing ``evaluations`` should run compiled: the eager work done so
        far with it reaches `COMPILE_AFTER` (`COMPILE_AFTER_TRANSFORMS` inside torch.func
        transforms, counted apart). A call answered no counts as eager work."""
        if state["failed"]:
            return False
        kind = "transformed" if in_functorch_transform() else "plain"
        after = COMPILE_AFTER_TRANSFORMS if kind == "transformed" else COMPILE_AFTER
        done = state["eager_work"].get(kind, 0)
        if done + evaluations >= after:
            state["eager_work"][kind] = max(done, after)  # and stays compiled
            return True
        state["eager_work"][kind] = done + evaluations
        return False

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if state["failed"]:
            return fn(*args, **kwargs)
        flat = pytree.tree_leaves((args, kwargs))
        if in_functorch_transform() or _needs_grad(flat):
            return derived_call(state["derived"], fn, fn.__qualname__, args, kwargs, report_failure)
        try:
            if state["compiled"] is None:
                state["compiled"] = torch.compile(fn, **options)
            return state["compiled"](*args, **kwargs)
        except Exception as err:  # reported, then eager for the rest of the process
            state["failed"] = True
            report_failure(fn.__qualname__, err)
            return fn(*args, **kwargs)

    wrapper.eager = fn
    wrapper.worth_compiling = worth_compiling
    wrapper.runs_compiled = lambda: not state["failed"]
    return wrapper
