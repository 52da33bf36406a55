"""Compiled functions that torch.func transforms differentiate and batch as compiled functions.

JAX differentiates a jitted function by deriving new functions (its VJP, its JVP, its batched
form) and jitting those. `derived_call` does the same for a pure function of tensors under
``torch.func``: the call becomes one `_Call` (a ``torch.autograd.Function`` with
``setup_context``, ``backward``, ``jvp`` and ``vmap`` rules). Its forward runs the function
compiled. Each rule answers with another `_Call`, of a function derived from the eager one
with ``torch.func`` (``vjp``, ``jvp`` or ``vmap``), which again runs compiled. A transform
stack (``hessian = jacfwd(jacrev(f))``, ``vmap(jacfwd(f))``, ...) is peeled one level at a
time by torch.func, so every derived function is finally called with no transform active,
where torch.compile can run it. Derivatives of every order compose the same way, and each
derived function is compiled once (per static arguments and shapes) and then reused.

A `Derived` holds one function and its derived functions; a compiled function keeps one per
call signature (the non-tensor arguments, the tree structure). Run eagerly (``compile=False``)
the same route bounds memory: a transform keeps no graph of the call between its forward and
its backward, which recomputes it.
"""
from __future__ import annotations

import types
from typing import Callable

import torch
import torch.utils._pytree as pytree


def _is_float(x) -> bool:
    return isinstance(x, torch.Tensor) and torch.is_floating_point(x)


def _own_code(fn: Callable, name: str) -> Callable:
    """``fn`` with a code object of its own, so that torch.compile caches its graphs apart
    from those of other functions made from the same Python source (dynamo keeps one cache,
    with a recompile limit, per code object)."""
    code = fn.__code__.replace(co_name=name)
    copy = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


class Derived:
    """A pure function of tensors ``(*xs) -> tuple of tensors`` with its derived functions.

    Args:
        eager: the function; name: shown in compile errors; on_failure: called with the name
            and the error when a compile fails (the function then runs eagerly); compile:
            False runs it and its derived functions eagerly (`derived_call`).
    """

    def __init__(self, eager: Callable, name: str, on_failure: Callable[[str, Exception], None],
                 compile: bool = True):
        self.eager, self.name, self.on_failure, self.compile = eager, name, on_failure, compile
        self._run = None
        self._children: dict = {}

    def run(self, xs):
        """Call the function (compiled on first use), with no transform active.

        A compile that fails is reported to ``on_failure``, then this function runs eagerly."""
        if self._run is None:
            self._run = (torch.compile(_own_code(self.eager, f"nbfunc_{self.name}"), dynamic=False)
                         if self.compile else self.eager)
        if self._run is self.eager:
            return self.eager(*xs)
        try:
            return self._run(*xs)
        except Exception as err:  # reported, then eager for the rest of the process
            self._run = self.eager
            self.on_failure(self.name, err)
            return self.eager(*xs)

    def _child(self, key, make: Callable) -> "Derived":
        if key not in self._children:
            self._children[key] = Derived(make(), f"{key[0]}_{self.name}"[:200], self.on_failure,
                                          self.compile)
        return self._children[key]

    def _restricted(self, xs, float_in, float_out):
        """The function of the floating inputs ``float_in`` to the outputs ``float_out``."""
        def g(*fx):
            a = list(xs)
            for i, v in zip(float_in, fx):
                a[i] = v
            out = self.eager(*a)
            return tuple(out[j] for j in float_out)
        return g

    def vjp(self, n_in: int, float_in: tuple, float_out: tuple) -> "Derived":
        """``(*xs, *cotangents) -> gradients of the floating inputs``."""
        def make():
            def vjp_fn(*args):
                xs, gs = args[:n_in], args[n_in:]
                _, back = torch.func.vjp(self._restricted(xs, float_in, float_out),
                                         *[xs[i] for i in float_in])
                return tuple(back(tuple(gs)))
            return vjp_fn
        return self._child(("vjp", n_in, float_in, float_out), make)

    def jvp(self, n_in: int, float_in: tuple, float_out: tuple) -> "Derived":
        """``(*xs, *tangents of the floating inputs) -> tangents of the floating outputs``.

        Compiled, computed as the VJP of the VJP (``J t`` is the gradient of the linear map
        ``u -> J^T u`` in ``u``, with cotangent ``t``), not with forward-mode AD: inside
        compiled code forward AD makes storage-less zero tensors that inductor's CPU kernels
        read (a segmentation fault in torch 2.13). Eager, forward-mode AD."""
        def make():
            def forward_mode(*args):
                xs, ts = args[:n_in], args[n_in:]
                # fresh primals and tangents: under vmap either may be an expanded view,
                # which forward AD cannot make a dual tensor of
                return tuple(torch.func.jvp(self._restricted(xs, float_in, float_out),
                                            tuple(xs[i].clone() for i in float_in),
                                            tuple(t.clone() for t in ts))[1])

            def jvp_fn(*args):
                xs, ts = args[:n_in], args[n_in:]
                out, back = torch.func.vjp(self._restricted(xs, float_in, float_out),
                                           *[xs[i] for i in float_in])
                _, transpose = torch.func.vjp(lambda *u: tuple(back(u)),
                                              *[torch.zeros_like(o) for o in out])
                return tuple(transpose(tuple(ts)))
            return jvp_fn if self.compile else forward_mode
        return self._child(("jvp", n_in, float_in, float_out), make)

    def vmap(self, in_dims: tuple) -> "Derived":
        """The function batched over ``in_dims`` (None: not batched), outputs batched at 0."""
        return self._child(("vmap", in_dims),
                           lambda: torch.func.vmap(self.eager, in_dims=in_dims, out_dims=0))


def _zeros(like) -> torch.Tensor:
    shape, dtype, device = like
    return torch.zeros(shape, dtype=dtype, device=device)


class _Call(torch.autograd.Function):
    """``derived.run(xs)``, with every transform rule answered by a derived function."""

    @staticmethod
    def forward(derived, *xs):
        # forward-mode AD passes unperturbed tangents as zero tensors without storage, which
        # compiled code cannot read
        xs = tuple(torch.zeros(x.shape, dtype=x.dtype, device=x.device) if x._is_zerotensor() else x
                   for x in xs)
        # an input returned as it is must leave as a view (autograd.Function's rule)
        ids = {id(x) for x in xs}
        return tuple(o.view_as(o) if id(o) in ids else o for o in derived.run(xs))

    @staticmethod
    def setup_context(ctx, inputs, output):
        derived, *xs = inputs
        ctx.derived, ctx.n_in = derived, len(xs)
        ctx.float_in = tuple(i for i, x in enumerate(xs) if _is_float(x))
        ctx.float_out = tuple(j for j, o in enumerate(output) if _is_float(o))
        ctx.outputs = [(o.shape, o.dtype, o.device) for o in output]
        ctx.mark_non_differentiable(*[o for o in output if not _is_float(o)])
        ctx.save_for_backward(*xs)
        ctx.save_for_forward(*xs)

    @staticmethod
    def backward(ctx, *grads):
        xs = ctx.saved_tensors
        gs = [grads[j] if grads[j] is not None else _zeros(ctx.outputs[j]) for j in ctx.float_out]
        got = _Call.apply(ctx.derived.vjp(ctx.n_in, ctx.float_in, ctx.float_out), *xs, *gs)
        out = [None] * ctx.n_in
        for i, g in zip(ctx.float_in, got):
            out[i] = g
        return (None, *out)

    @staticmethod
    def jvp(ctx, _derived, *tangents):
        xs = ctx.saved_tensors
        ts = [tangents[i] if tangents[i] is not None else torch.zeros_like(xs[i]) for i in ctx.float_in]
        got = _Call.apply(ctx.derived.jvp(ctx.n_in, ctx.float_in, ctx.float_out), *xs, *ts)
        out = [None] * len(ctx.outputs)
        for j, t in zip(ctx.float_out, got):
            out[j] = t
        return tuple(out)

    @staticmethod
    def vmap(info, in_dims, derived, *xs):
        out = _Call.apply(derived.vmap(tuple(in_dims[1:])), *xs)
        return out, (0,) * len(out)


def derived_call(cache: dict, fn: Callable, name: str, args: tuple, kwargs: dict,
                 on_failure: Callable[[str, Exception], None], compile: bool = True):
    """``fn(*args, **kwargs)`` through `_Call`: torch.func transforms and autograd of the call
    run compiled derived functions.

    The tensors among ``args``/``kwargs`` (found by pytree) are the call's inputs; everything
    else (static values, None, the tree structure) selects the `Derived` in ``cache``.
    With ``compile=False`` the derived functions run eagerly: a transform then keeps no graph
    of the call between its forward and its backward (the VJP recomputes the call), so the
    memory of a chunked render is that of one chunk.
    Returns ``fn``'s result with the same structure (dicts with sorted keys).
    """
    flat, spec = pytree.tree_flatten((args, kwargs))
    positions = tuple(i for i, x in enumerate(flat) if isinstance(x, torch.Tensor))
    others = tuple((i, x) for i, x in enumerate(flat) if i not in positions)
    key = (spec, others)
    entry = cache.get(key)
    if entry is None:
        layout = {}

        def flat_fn(*tensors):
            leaves = list(flat_template)
            for i, t in zip(positions, tensors):
                leaves[i] = t
            a, k = pytree.tree_unflatten(leaves, spec)
            out, layout["out"] = flatten_output(fn(*a, **k))
            layout["none_at"] = [j for j, o in enumerate(out) if o is None]
            return tuple(o for o in out if o is not None)

        flat_template = [None if isinstance(x, torch.Tensor) else x for x in flat]
        entry = cache[key] = (Derived(flat_fn, f"{name}_{len(cache)}", on_failure, compile), layout)
    derived, layout = entry
    out = list(_Call.apply(derived, *[flat[i] for i in positions]))
    for j in layout["none_at"]:
        out.insert(j, None)
    return unflatten_output(out, layout["out"])


def flatten_output(out):
    """Leaves of a function result in a canonical order, and its layout (dict keys sorted: a
    compiled function may build its result dict in another key order than the eager one)."""
    if isinstance(out, dict):
        keys = sorted(out)
        return [out[k] for k in keys], ("dict", keys)
    leaves, spec = pytree.tree_flatten(out)
    return leaves, ("tree", spec)


def unflatten_output(leaves, layout):
    """The result of `flatten_output`'s ``layout`` with the given leaves."""
    kind, spec = layout
    return dict(zip(spec, leaves)) if kind == "dict" else pytree.tree_unflatten(leaves, spec)
