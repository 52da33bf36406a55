"""The one place where nbfunc applies ``torch.compile``.

`compiled(fn)` wraps a pure tensor function. The environment variable
``NANOBRAGG_DISABLE_COMPILE`` is read once, at import: ``1`` (or ``true``/``yes``) runs every
function eagerly, ``0`` (or unset, ``false``/``no``) compiles. Any other spelling is rejected.

Callers decide once per call whether to run compiled (`COMPILE_AFTER`: the render decides,
with the kernel's ``worth_compiling``). Calls made inside a ``torch.func`` transform (jacfwd,
jacrev, grad, hessian, jvp, or vmap mixed with them) go through `nbfunc.derived.derived_call`:
the transform's rules call compiled functions derived from the eager one (its VJP, its JVP,
its batched form), so transforms of every order run compiled code. Inside a plain ``vmap``
(one vmap level, nothing requiring a gradient) the call goes through the custom operator ``nbfunc::vmapped_call``, whose batching rule runs
the compiled function once per batch member and stacks the results: everything around the
kernel stays batched, and the kernel itself runs compiled. torch.compile cannot run while a
functorch transform is active on the calling thread, so the members run on a helper thread
(the caller waits for it). Under ordinary autograd the compiled function's graph is part of
the caller's: first-order gradients go through its compiled backward. Compiled graphs cannot
be differentiated twice: in a backward that must itself be differentiable
(``create_graph=True``: grad-of-grad, gradgradcheck) an identity node on the outputs
(`_Switch`) re-runs the eager function and differentiates that, and a hook on the compiled
graph's autograd node drops what it passes (`_drop_when_recording`). During that re-run
`differentiating_twice()` is True, and code with first-order-only gradients (nbfunc's custom
operators) takes its plain autograd route; `first_order_gradients(fn)` gives eager functions
that use such code the same re-run.

Do not wrap nbfunc functions in ``torch.compile`` yourself
(``torch.compile(torch.func.grad(loss))``): nbfunc compiles the functions a transform derives
already, and dynamo, tracing nbfunc's render from outside, fails (in torch 2.13 an internal
assertion while tracing `nbfunc.derived._Call`'s backward).

A compile that fails is reported with a warning that names the function and the error, and
that function then runs eagerly; it is never swallowed silently.
``NANOBRAGG_COMPILE_STRICT=1`` turns a failed compile into an error.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import os
import threading
import warnings
from typing import Callable

import torch
import torch._functorch.config
import torch.utils._pytree as pytree

from nbfunc.derived import derived_call
from nbfunc.derived import flatten_output as _flatten_output
from nbfunc.derived import unflatten_output as _unflatten_output

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


COMPILE_DISABLED = _read_flag("NANOBRAGG_DISABLE_COMPILE", False)
"""True when ``NANOBRAGG_DISABLE_COMPILE`` turned compilation off (read once at import)."""
COMPILE_STRICT = _read_flag("NANOBRAGG_COMPILE_STRICT", False)

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
    """Ask glibc to keep freed blocks of up to 32 MiB for reuse instead of returning them to
    the kernel at once.

    A compiled backward allocates and frees some tens of MiB of per-evaluation arrays per
    chunk. With glibc's start-up thresholds (128 KiB) every such array is fresh memory from
    the kernel, and each of its pages costs a page fault when first written: on bench_1024's
    gradient that was about 5000 faults and half of the time. glibc raises these thresholds
    by itself after it frees a large block (up to 32 MiB for allocations served by mmap and
    64 MiB for the heap top it keeps); this sets those values from the start. A process
    keeps at most 64 MiB more memory mapped than it uses. Skipped where the C library is not
    glibc, when ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` is set, and with
    ``NANOBRAGG_KEEP_FREED_MEMORY=0``.

    Returns:
        True when the thresholds were set.
    """
    if not _read_flag("NANOBRAGG_KEEP_FREED_MEMORY", True) or any(
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
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 64 << 20))


KEEPS_FREED_MEMORY = _keep_freed_memory()
"""True when `_keep_freed_memory` set glibc's thresholds at import."""


class CompileError(RuntimeError):
    """torch.compile failed for a function while NANOBRAGG_COMPILE_STRICT=1."""


def in_functorch_transform() -> bool:
    """True while running inside vmap/grad/jacfwd/jacrev (a functorch interpreter is active)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def single_vmap_level() -> bool:
    """True when exactly one functorch transform is active and it is vmap."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    levels = retrieve_all_functorch_interpreters()
    return len(levels) == 1 and levels[0].key() == torch._C._functorch.TransformType.Vmap


def _underlying_requires_grad(x: torch.Tensor) -> bool:
    functorch = torch._C._functorch
    while functorch.is_batchedtensor(x):
        x = functorch.get_unwrapped(x)
    return x.requires_grad


_PENDING: dict[int, dict] = {}
_KEYS = itertools.count()
_HELPER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbfunc-vmap")


@torch.library.custom_op("nbfunc::vmapped_call", mutates_args=())
def _vmapped_call(key: int, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """A registered call (see `_vmap_members`) with no batched input: run it once."""
    return [t.clone() for t in _run_members(key, tensors, None, None)]


def _run_members(key: int, tensors, in_dims, batch_size):
    """Run the registered compiled call for every batch member on the helper thread.

    Returns the flat outputs, stacked along a new leading axis when ``batch_size`` is given.
    """
    entry = _PENDING[key]
    flat, positions, spec, call = entry["flat"], entry["positions"], entry["spec"], entry["call"]

    def member(b):
        leaves = list(flat)
        for i, t, d in zip(positions, tensors, in_dims or [None] * len(tensors)):
            leaves[i] = t if d is None else t.select(d, b)
        a, k = pytree.tree_unflatten(leaves, spec)
        out, entry["out_spec"] = _flatten_output(call(*a, **k))
        entry["none_at"] = [i for i, x in enumerate(out) if x is None]  # an operator returns tensors only
        return [x for x in out if x is not None]

    def run():
        with torch.no_grad():
            if batch_size is None:
                return member(None)
            results = [member(b) for b in range(batch_size)]
            return [torch.stack(column) for column in zip(*results)]

    return _HELPER.submit(run).result()


@_vmapped_call.register_vmap
def _vmapped_call_rule(info, in_dims, key, tensors):
    out = _run_members(key, tensors, in_dims[1], info.batch_size)
    return out, [0] * len(out)


def _vmap_members(call, flat, spec):
    """``call(*args, **kwargs)`` (flattened as ``flat``/``spec``) under one vmap level."""
    positions = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor)]
    key = next(_KEYS)
    entry = _PENDING[key] = {"flat": flat, "positions": positions, "spec": spec, "call": call}
    try:
        out = list(_vmapped_call(key, [flat[i] for i in positions]))
        for i in entry["none_at"]:
            out.insert(i, None)
        return _unflatten_output(out, entry["out_spec"])
    finally:
        del _PENDING[key]


def _needs_grad(leaves) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves)


def _tensors(values) -> list:
    return [x for x in values if isinstance(x, torch.Tensor)]


_RERUN = threading.local()


def differentiating_twice() -> bool:
    """True while `_Switch` re-runs a function in a backward that records a graph: code with
    first-order-only gradients (custom operators) must then take its plain autograd route."""
    return getattr(_RERUN, "active", False)


@contextlib.contextmanager
def _rerun():
    before = differentiating_twice()
    _RERUN.active = True
    try:
        yield
    finally:
        _RERUN.active = before


_COMPILED_NODE = "CompiledFunctionBackward"
"""Class name of the autograd node of a torch.compile'd graph."""


def _drop_when_recording(grad_inputs, grad_outputs):
    """Hook on a compiled graph's autograd node: in a backward that records a graph
    (``create_graph=True``) the node's gradients, which could not be differentiated again,
    are dropped (`_Switch` passes the eager function's instead)."""
    if torch.is_grad_enabled():
        return tuple(None for _ in grad_inputs)
    return None


class _Switch(torch.autograd.Function):
    """Identity on the differentiable outputs of a compiled call (``outputs`` of them, then
    the inputs that need a gradient). An ordinary backward passes the outputs' gradients on
    to the compiled graph. A backward that records a graph re-runs the eager function from
    those inputs, differentiates it with ``create_graph`` and returns its gradients to them
    directly (the compiled graph gets zeros, and `_drop_when_recording` drops its result)."""

    @staticmethod
    def forward(ctx, run, outputs, *tensors):
        ctx.run = run
        ctx.save_for_backward(*tensors[outputs:])
        return tuple(o.view_as(o) for o in tensors[:outputs])

    @staticmethod
    def backward(ctx, *grads):
        wanted = ctx.saved_tensors
        if not torch.is_grad_enabled():
            return (None, None) + grads + (None,) * len(wanted)
        eager, flat, positions, picked = ctx.run
        inputs = list(flat)
        # one differentiable alias per position, so that a tensor passed twice gets its two
        # partial gradients separately (as the compiled graph's per-position inputs do)
        wanted = [x.view_as(x) for x in wanted]
        for i, x in zip(positions, wanted):
            inputs[i] = x
        with torch.enable_grad(), _rerun():
            again = eager(*inputs)
        pairs = _differentiated([again[j] for j in picked], grads)
        got = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                  create_graph=True, allow_unused=True)
        return (None, None) + tuple(torch.zeros_like(g) for g in grads) + got


def _switched(fn: Callable, flat: list, spec, out: list) -> list:
    """``out``, the flat outputs of ``fn`` called with the flat arguments ``flat``/``spec``,
    with `_Switch` applied to those that require a gradient."""
    picked = [j for j, o in enumerate(out) if isinstance(o, torch.Tensor) and o.requires_grad]
    if not picked:
        return out
    positions = [i for i, x in enumerate(flat) if isinstance(x, torch.Tensor) and x.requires_grad]

    def eager(*leaves):
        a, k = pytree.tree_unflatten(list(leaves), spec)
        return _flatten_output(fn(*a, **k))[0]

    switched = _Switch.apply((eager, flat, positions, picked), len(picked),
                             *[out[j] for j in picked], *[flat[i] for i in positions])
    out = list(out)
    for j, x in zip(picked, switched):
        out[j] = x
    return out


def first_order_gradients(fn: Callable) -> Callable:
    """``fn``, an eager function whose autograd graph may hold operators with first-order
    gradients only, made safe for double backward: a backward that records a graph
    (``create_graph=True``) re-runs ``fn`` with `differentiating_twice` True, when ``fn`` must
    take its plain autograd route, and differentiates that. The operators' backward returns
    no gradient in such a backward. Calls without a gradient pass straight through."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))
        out = fn(*args, **kwargs)
        if not _needs_grad(flat):
            return out
        leaves, out_spec = _flatten_output(out)
        return _unflatten_output(_switched(fn, flat, spec, leaves), out_spec)

    return wrapper


def _differentiated(outputs, grads) -> list:
    """(output, incoming gradient) pairs of the outputs that carry a gradient."""
    return [(o, g) for o, g in zip(outputs, grads)
            if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]


def _report_failure(name: str, err: Exception) -> None:
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
        return derived_call(cache, fn, fn.__qualname__, args, kwargs, _report_failure, compile=False)

    wrapper.eager = fn
    return wrapper


def compiled(fn: Callable, static_argnames: tuple[str, ...] = (), grad_config: dict | None = None,
             **compile_kwargs) -> Callable:
    """``fn`` compiled with torch.compile, unless compilation is disabled.

    Args:
        fn: a pure function of tensors; ``static_argnames`` are keyword arguments holding
            plain hashable Python values (loop counts, flags) that select a code path.
        grad_config: ``torch._functorch.config`` settings for calls that record an autograd
            graph (they apply when the forward-backward pair is compiled).
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

    def vmap_fast_path(flat) -> bool:
        return (single_vmap_level()
                and not (torch.is_grad_enabled()
                         and any(_underlying_requires_grad(x) for x in _tensors(flat))))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if state["failed"]:
            return fn(*args, **kwargs)
        flat, spec = pytree.tree_flatten((args, kwargs))
        if in_functorch_transform() and not vmap_fast_path(flat):
            return derived_call(state["derived"], fn, fn.__qualname__, args, kwargs, _report_failure)
        try:
            if state["compiled"] is None:
                state["compiled"] = torch.compile(fn, **options)
            if in_functorch_transform():
                return _vmap_members(state["compiled"], flat, spec)
            if not _needs_grad(flat):
                return state["compiled"](*args, **kwargs)
            # no donated buffers: a backward with retain_graph=True may run the compiled
            # backward twice
            with torch._functorch.config.patch(donated_buffer=False, **(grad_config or {})):
                out, out_spec = _flatten_output(state["compiled"](*args, **kwargs))
            for node in {o.grad_fn for o in out if isinstance(o, torch.Tensor) and o.grad_fn is not None}:
                if type(node).__name__ == _COMPILED_NODE:
                    node.register_hook(_drop_when_recording)
            return _unflatten_output(_switched(fn, flat, spec, out), out_spec)
        except Exception as err:  # reported, then eager for the rest of the process
            state["failed"] = True
            _report_failure(fn.__qualname__, err)
            return fn(*args, **kwargs)

    wrapper.eager = fn
    wrapper.worth_compiling = worth_compiling
    wrapper.runs_compiled = lambda: not state["failed"]
    return wrapper
