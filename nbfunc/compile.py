"""The one place where nbfunc applies ``torch.compile``.

`compiled(fn)` wraps a pure tensor function. The environment variable
``NANOBRAGG_DISABLE_COMPILE`` is read once, at import: ``1`` (or ``true``/``yes``) runs every
function eagerly, ``0`` (or unset, ``false``/``no``) compiles. Any other spelling is rejected.

Calls made inside a ``torch.func`` transform (vmap, jacfwd, jacrev, grad, hessian), and calls
whose tensor inputs require grad while autograd is recording, run the eager function: the
transform or autograd differentiates or batches the same pure code, so results are identical.
(Compiled graphs support neither double backward, which gradgradcheck and Hessians need, nor,
in torch 2.13, every backward of this kernel: inductor fails or returns wrong gradients for
some leaves.) Do not wrap nbfunc functions in ``torch.compile`` yourself
(``torch.compile(torch.func.grad(loss))``): dynamo stops at the pydantic tree, falls back to
eager and, in torch 2.13, then skips nbfunc's own compiled kernel for the rest of the process. A compile that fails is reported with a
warning that names the function and the error, and that function then runs eagerly; it is
never swallowed silently. ``NANOBRAGG_COMPILE_STRICT=1`` turns that warning into an error.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import torch
import torch.utils._pytree as pytree

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


class CompileError(RuntimeError):
    """torch.compile failed for a function while NANOBRAGG_COMPILE_STRICT=1."""


def in_functorch_transform() -> bool:
    """True while running inside vmap/grad/jacfwd/jacrev (a functorch interpreter is active)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _needs_grad(leaves) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves)


def compiled(fn: Callable, static_argnames: tuple[str, ...] = (), **compile_kwargs) -> Callable:
    """``fn`` compiled with torch.compile, unless compilation is disabled.

    Args:
        fn: a pure function of tensors; ``static_argnames`` are keyword arguments holding
            plain hashable Python values (loop counts, flags) that select a code path.
        compile_kwargs: passed to ``torch.compile`` (default ``dynamic=False``).
    Returns:
        a function with the same signature. ``wrapper.eager`` is the original function.
    """
    if COMPILE_DISABLED:
        fn.eager = fn
        return fn
    options = {"dynamic": False, **compile_kwargs}
    state = {"compiled": None, "failed": False}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if state["failed"] or in_functorch_transform():
            return fn(*args, **kwargs)
        if _needs_grad(pytree.tree_leaves((args, kwargs))):
            return fn(*args, **kwargs)
        try:
            if state["compiled"] is None:
                state["compiled"] = torch.compile(fn, **options)
            return state["compiled"](*args, **kwargs)
        except Exception as err:  # reported, then eager for the rest of the process
            if COMPILE_STRICT:
                raise CompileError(f"torch.compile failed for {fn.__qualname__}: {err}") from err
            state["failed"] = True
            warnings.warn(f"torch.compile failed for {fn.__qualname__} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); running it eagerly. "
                          "Set NANOBRAGG_DISABLE_COMPILE=1 to skip compilation.", RuntimeWarning,
                          stacklevel=2)
            return fn(*args, **kwargs)

    wrapper.eager = fn
    return wrapper
