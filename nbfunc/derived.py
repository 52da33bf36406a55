"""nbfunc's one gradient design: compiled functions that autograd and torch.func transforms
differentiate and batch as compiled functions.

JAX differentiates a jitted function by deriving new functions (its VJP, its JVP, its batched
form) and jitting those. `derived_call` does the same for a pure function of tensors under
``torch.func`` and ``torch.autograd``: the call becomes one `_Call` (a ``torch.autograd.Function`` with
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

A function may come with `Rules`: a faster way to compute its forward together with
*residuals* (tensors its gradient needs, saved by the transform) and its VJP from them. The
first derivatives (the VJP, and the JVP as the VJP's transpose) then run the rules; every
derivative of those is still derived from the function itself, so second and higher orders
stay exact whatever the rules compute. Rules that also give their VJP with the residuals'
tangent along some inputs in place of the residuals (`Rules.vjp_along`) make the JVP of their
VJP (a Hessian-vector product) the VJP's own derivative when only those inputs move
(`Derived._fast_hvp`).
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


def _jvp(fn: Callable, primals: tuple, tangents: tuple, compiled: bool) -> tuple:
    """The tangents of ``fn``'s outputs (a tuple) along ``tangents`` at ``primals``.

    ``compiled`` (the function runs inside compiled code): as the VJP of the VJP (``J t`` is
    the gradient of the linear map ``u -> J^T u`` in ``u``, with cotangent ``t``), not with
    forward-mode AD, which inside compiled code makes storage-less zero tensors that
    inductor's CPU kernels read (a segmentation fault in torch 2.13). Else forward-mode AD,
    on fresh primals and tangents: under vmap either may be an expanded view, which forward
    AD cannot make a dual tensor of."""
    if not compiled:
        return tuple(torch.func.jvp(fn, tuple(p.clone() for p in primals),
                                    tuple(t.clone() for t in tangents))[1])
    out, back = torch.func.vjp(fn, *primals)
    _, transpose = torch.func.vjp(lambda *u: tuple(back(u)), *[torch.zeros_like(o) for o in out])
    return tuple(transpose(tuple(tangents)))


class Rules:
    """A faster first derivative of a function of flat tensors (`Derived`).

    ``forward(xs) -> (outputs, residuals)``: the function's outputs (a tuple, as the function
    returns them) and a tuple of residual tensors; ``vjp(xs, residuals, cotangents) ->
    gradients``: the gradients of the floating inputs from the cotangents of the floating
    outputs, linear in the cotangents (a tuple in input order). Both run with no transform
    active (the VJP may itself use ``torch.func``); the VJP equals the function's to rounding.
    The forward runs as it is (it calls compiled functions itself where it wants them); the
    VJP, and its transpose, are compiled like any derived function. `derived_call` makes
    these from structured ones (`StructuredRules`).
    """

    def forward(self, xs):
        raise NotImplementedError

    def vjp(self, xs, residuals, cotangents):
        raise NotImplementedError

    def jvp_supported(self) -> bool:
        """Whether `jvp` answers; else the JVP is the transpose of `vjp` or, without
        `vjp_transposable`, derived from the function (`Derived._fast_jvp`)."""
        return False

    def batch_chunk(self, xs) -> int | None:
        """Members per call of `forward` when ``vmap`` batches these rules (`_BatchedRules`;
        ``xs`` batched as they come): None for the whole batch at once."""
        return None

    def vjp_transposable(self) -> bool:
        """Whether the transpose of `vjp` makes a good JVP: True when the residuals hold what
        the VJP needs; rules whose VJP makes it again from the inputs say False, and their
        JVP, where `jvp` does not answer, is derived from the function."""
        return True

    def jvp(self, xs, residuals, tangents):
        """The tangents of the floating outputs from ``tangents`` (one per floating input,
        zeros where it does not move), eagerly: the JVP that transposing `vjp` would give,
        written directly where that is cheaper (`Derived._fast_jvp`)."""
        raise NotImplementedError

    def vjp_along_supported(self, mask: tuple) -> bool:
        """Whether `vjp_along` answers for inputs with tangents where ``mask`` (one bool per
        input) is True."""
        return False

    def vjp_along(self, xs, residuals, tangents, cotangents):
        """``vjp(xs, d residuals, cotangents)``: the VJP with, in place of the residuals,
        their tangent along ``tangents`` (one per input, None where the input has none).
        With it, the derivative of the rules' VJP (a Hessian-vector product) is the VJP's own
        derivative instead of being derived from the function (`Derived._fast_hvp`); rules
        may contract the residuals' tangent with the cotangents as they make it, without
        storing it."""
        raise NotImplementedError


class Derived:
    """A pure function of tensors ``(*xs) -> tuple of tensors`` with its derived functions.

    Args:
        eager: the function; name: shown in compile errors; on_failure: called with the name
            and the error when a compile fails (the function then runs eagerly); compile:
            False runs it and its derived functions eagerly (`derived_call`); rules: `Rules`
            for its first derivatives, or None; fast: a function run (compiled) in place of
            ``eager`` that equals it (a first derivative computed by the parent's rules),
            while every derivative of this function is still derived from ``eager``.
    """

    def __init__(self, eager: Callable, name: str, on_failure: Callable[[str, Exception], None],
                 compile: bool = True, rules: Rules | None = None, fast: Callable | None = None):
        self.eager, self.name, self.on_failure, self.compile = eager, name, on_failure, compile
        self.rules, self.fast = rules, fast
        self.n_residuals = 0
        # (rules, inputs, residuals, kept gradients, cotangents' vmap dims from the outermost)
        # of the parent whose rules' VJP this runs
        self.vjp_of = None
        self._run = None
        self._children: dict = {}

    def forward(self, xs):
        """(outputs, residuals) of a call with no transform active: `run`, or the rules'
        forward (the residuals are then what the rules' VJP takes)."""
        if self.rules is None:
            return self.run(xs), ()
        out, residuals = self.rules.forward(xs)
        self.n_residuals = len(residuals)
        return tuple(out), tuple(residuals)

    def run(self, xs):
        """Call the function (``fast`` when given; compiled on first use), with no transform
        active.

        A compile that fails is reported to ``on_failure``, then this function runs eagerly."""
        body = self.fast or self.eager
        if self._run is None:
            self._run = (torch.compile(_own_code(body, f"nbfunc_{self.name}"), dynamic=False)
                         if self.compile else body)
        if self._run is body:
            return body(*xs)
        try:
            return self._run(*xs)
        except Exception as err:  # reported, then eager for the rest of the process
            self._run = body
            self.on_failure(self.name, err)
            return body(*xs)

    def _child(self, key, make: Callable, fast: Callable | None = None) -> "Derived":
        if key not in self._children:
            self._children[key] = Derived(make(), f"{key[0]}_{self.name}"[:200], self.on_failure,
                                          self.compile, fast=fast)
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

    def vjp(self, n_in: int, float_in: tuple, float_out: tuple, n_res: int,
            floating: tuple) -> "Derived":
        """``(*xs, *residuals, *cotangents) -> gradients of the inputs float_in`` (the floating
        inputs that need one; ``floating``: all floating inputs, whose gradients rules give):
        the rules' VJP when there are rules (``n_res`` residuals), derived from the function
        otherwise and for every derivative of this one (which ignores the residuals)."""
        def make():
            def vjp_fn(*args):
                xs, gs = args[:n_in], args[n_in + n_res:]
                _, back = torch.func.vjp(self._restricted(xs, float_in, float_out),
                                         *[xs[i] for i in float_in])
                return tuple(back(tuple(gs)))
            return vjp_fn
        kept = None
        if self.rules is not None:  # the rules give the gradients of every floating input
            kept = tuple(floating.index(i) for i in float_in)
        child = self._child(("vjp", n_in, float_in, float_out, n_res), make,
                            self._fast_vjp(n_in, n_res, kept))
        if self.rules is not None:
            child.vjp_of = (self.rules, n_in, n_res, kept, ())
        return child

    def _fast_vjp(self, n_in: int, n_res: int, kept: tuple | None) -> Callable | None:
        """The rules' VJP, keeping the gradients at positions ``kept`` of theirs (compiled,
        what only the others need is never computed)."""
        if self.rules is None:
            return None
        rules = self.rules

        def fast_vjp(*args):
            grads = rules.vjp(args[:n_in], args[n_in:n_in + n_res], args[n_in + n_res:])
            return tuple(grads[k] for k in kept)
        return fast_vjp

    def jvp(self, n_in: int, float_in: tuple, float_out: tuple, n_res: int = 0,
            out_meta: tuple = (), mask: tuple | None = None) -> "Derived":
        """``(*xs, *residuals, *tangents of the floating inputs) -> tangents of the floating
        outputs`` (``out_meta``: their shapes, dtypes and devices; ``mask``: per floating
        input, whether its tangent is other than zero, or None when unknown).

        Compiled, computed as the VJP of the VJP, eager with forward-mode AD (`_jvp`). With
        rules, the transpose of the rules' VJP (which is linear in its cotangents)."""
        def make():
            def jvp_fn(*args):
                xs, ts = args[:n_in], args[n_in + n_res:]
                return _jvp(self._restricted(xs, float_in, float_out),
                            tuple(xs[i] for i in float_in), tuple(ts), self.compile)
            return jvp_fn

        fast = (self._fast_jvp(n_in, n_res, out_meta, float_in)
                or self._fast_hvp(n_in, float_in, mask))
        return self._child(("jvp", n_in, float_in, float_out, n_res, out_meta, mask), make, fast)

    def _fast_hvp(self, n_in: int, float_in: tuple, mask: tuple | None) -> Callable | None:
        """The JVP of a rules' VJP (this function; `vjp_of`) when the rules give their VJP along
        the residuals' tangent for the inputs that have tangents (`Rules.vjp_along`).

        The VJP ``v(xs, residuals, gs)`` is bilinear in the residuals and the cotangents, so
        its JVP is ``v(xs, dres, gs) + v(xs, residuals, dgs)`` plus its derivative in the
        inputs with both held (small: the chain through the rules' inputs; `_jvp`). The
        first term is `Rules.vjp_along`, batched over the cotangents as this function is."""
        if self.vjp_of is None or mask is None:
            return None
        rules, n_x, n_res, kept, g_dims = self.vjp_of
        has = _per_input(n_in, float_in, mask)
        if not rules.vjp_along_supported(tuple(has[:n_x])):
            return None
        x_moving = tuple(i for i in float_in if i < n_x and has[i])
        g_moving = tuple(i for i in float_in if i >= n_x + n_res and has[i])
        position = {i: k for k, i in enumerate(float_in)}
        body, compile = self.fast, self.compile

        def along(xs, residuals, tangents, gs):
            grads = rules.vjp_along(xs, residuals, tangents, gs)
            return tuple(grads[k] for k in kept)
        for dims in g_dims:  # as `vmap` batched the VJP: over the cotangents only
            along = torch.func.vmap(along, in_dims=(None, None, None, dims), out_dims=0)

        def fast_hvp(*args):
            ins, ts = args[:n_in], args[n_in:]
            xs, residuals, gs = ins[:n_x], ins[n_x:n_x + n_res], ins[n_x + n_res:]
            x_tangents = tuple(ts[position[i]] if i in x_moving else None for i in range(n_x))
            out = None
            if x_moving:
                out = along(xs, residuals, x_tangents, gs)

                def held(*moving):
                    a = list(ins)
                    for i, v in zip(x_moving, moving):
                        a[i] = v
                    return tuple(body(*a))
                moved = _jvp(held, tuple(ins[i] for i in x_moving),
                             tuple(ts[position[i]] for i in x_moving), compile)
                out = [a + b for a, b in zip(out, moved)]
            if g_moving:
                g_tangents = [ts[position[i]] if i in g_moving else torch.zeros_like(ins[i])
                              for i in range(n_x + n_res, n_in)]
                by_g = body(*xs, *residuals, *g_tangents)
                out = list(by_g) if out is None else [a + b for a, b in zip(out, by_g)]
            if out is None:
                out = [torch.zeros_like(x) for x in body(*ins)]
            return tuple(out)
        return fast_hvp

    def _fast_jvp(self, n_in: int, n_res: int, out_meta: tuple, float_in: tuple) -> Callable | None:
        """The rules' JVP: eagerly their own (`Rules.jvp`) where they give one, else the
        transpose of their VJP (`torch.func.vjp` of the VJP, which is linear in the
        cotangents; compiled, inductor fuses it) where that is worth it
        (`Rules.vjp_transposable`), else None (derived from the function)."""
        rules = self.rules
        if rules is None:
            return None
        if not self.compile and rules.jvp_supported():
            return lambda *args: tuple(rules.jvp(args[:n_in], args[n_in:n_in + n_res],
                                                 args[n_in + n_res:]))
        if not rules.vjp_transposable():
            return None
        fast_vjp = self._fast_vjp(n_in, n_res, tuple(range(len(float_in))))

        def fast_jvp(*args):
            head, ts = args[:n_in + n_res], args[n_in + n_res:]
            zeros = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in out_meta]
            _, transpose = torch.func.vjp(lambda *u: fast_vjp(*head, *u), *zeros)
            return tuple(transpose(tuple(ts)))
        return fast_jvp

    def batched(self, in_dims: tuple) -> "Derived":
        """The function batched over ``in_dims`` with its rules batched too (`_BatchedRules`),
        for eager rules under ``vmap``: one call of the rules' forward for the whole batch."""
        key = ("batched", in_dims)
        if key not in self._children:
            self._children[key] = Derived(
                torch.func.vmap(self.eager, in_dims=in_dims, out_dims=0), f"batched_{self.name}",
                self.on_failure, compile=False, rules=_BatchedRules(self.rules, in_dims))
        return self._children[key]

    def vmap(self, in_dims: tuple) -> "Derived":
        """The function batched over ``in_dims`` (None: not batched), outputs batched at 0
        (``fast`` batched too). Not for a function with rules (`batched`, or `_Call` calls
        compiled rules member by member: each member's residuals are its own)."""
        fast = None if self.fast is None else torch.func.vmap(self.fast, in_dims=in_dims, out_dims=0)
        child = self._child(("vmap", in_dims),
                            lambda: torch.func.vmap(self.eager, in_dims=in_dims, out_dims=0), fast)
        # batched over the cotangents only (jacrev's basis): still bilinear in the residuals
        # and the cotangents, with the inputs and residuals of the parent's rules
        if self.vjp_of is not None:
            rules, n_x, n_res, kept, g_dims = self.vjp_of
            if all(d is None for d in in_dims[:n_x + n_res]):
                child.vjp_of = (rules, n_x, n_res, kept, g_dims + (tuple(in_dims[n_x + n_res:]),))
        return child


def _per_input(n_in: int, float_in: tuple, mask: tuple | None) -> list | None:
    """Per input, whether it moves (False at inputs that are not floating), from ``mask``, one
    bool per floating input ``float_in``; None when unknown."""
    if mask is None:
        return None
    moving = [False] * n_in
    for i, m in zip(float_in, mask):
        moving[i] = m
    return moving


def _zeros(like) -> torch.Tensor:
    shape, dtype, device = like
    return torch.zeros(shape, dtype=dtype, device=device)


class _Call(torch.autograd.Function):
    """``derived.forward(xs)``, with every transform rule answered by a derived function.

    Its outputs are the function's, then the residuals of its rules (non-differentiable;
    `derived_call` drops them)."""

    @staticmethod
    def forward(derived, *xs):
        # forward-mode AD passes unperturbed tangents as zero tensors without storage, which
        # compiled code cannot read
        xs = tuple(torch.zeros(x.shape, dtype=x.dtype, device=x.device) if x._is_zerotensor() else x
                   for x in xs)
        out, residuals = derived.forward(xs)
        # an input returned as it is must leave as a view (autograd.Function's rule)
        ids = {id(x) for x in xs}
        return tuple(o.view_as(o) if id(o) in ids else o for o in out + residuals)

    @staticmethod
    def setup_context(ctx, inputs, output):
        derived, *xs = inputs
        ctx.derived, ctx.n_in, ctx.n_res = derived, len(xs), derived.n_residuals
        out, residuals = output[:len(output) - ctx.n_res], output[len(output) - ctx.n_res:]
        ctx.float_in = tuple(i for i, x in enumerate(xs) if _is_float(x))
        ctx.float_out = tuple(j for j, o in enumerate(out) if _is_float(o))
        ctx.outputs = [(o.shape, o.dtype, o.device) for o in out]
        ctx.mark_non_differentiable(*[o for o in out if not _is_float(o)], *residuals)
        # no zeros made for outputs without a gradient (the residuals: some tens of MB)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*xs, *residuals)
        ctx.save_for_forward(*xs, *residuals)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        gs = [grads[j] if grads[j] is not None else _zeros(ctx.outputs[j]) for j in ctx.float_out]
        # only the gradients asked for: compiled, what only the others need is not computed
        need = tuple(i for i in ctx.float_in if ctx.needs_input_grad[i + 1])
        out = [None] * ctx.n_in
        if not need:
            return (None, *out)
        got = _Call.apply(ctx.derived.vjp(ctx.n_in, need, ctx.float_out, ctx.n_res, ctx.float_in),
                          *saved, *gs)
        for i, g in zip(need, got):
            out[i] = g
        return (None, *out)

    @staticmethod
    def jvp(ctx, _derived, *tangents):
        saved = ctx.saved_tensors
        xs = saved[:ctx.n_in]
        ts = [tangents[i] if tangents[i] is not None else torch.zeros_like(xs[i]) for i in ctx.float_in]
        meta = tuple(ctx.outputs[j] for j in ctx.float_out)
        mask = tuple(tangents[i] is not None for i in ctx.float_in)
        got = _Call.apply(ctx.derived.jvp(ctx.n_in, ctx.float_in, ctx.float_out, ctx.n_res, meta, mask),
                          *saved, *ts)
        out = [None] * (len(ctx.outputs) + ctx.n_res)
        for j, t in zip(ctx.float_out, got):
            out[j] = t
        return tuple(out)

    @staticmethod
    def vmap(info, in_dims, derived, *xs):
        if derived.rules is None:
            out = _Call.apply(derived.vmap(tuple(in_dims[1:])), *xs)
            return out, (0,) * len(out)
        if not derived.compile:  # eager rules batch as any torch code does
            child = derived.batched(tuple(in_dims[1:]))
            out = _Call.apply(child, *xs)
            derived.n_residuals = child.n_residuals
            return out, (0,) * len(out)
        # compiled rules compute one member's residuals: call them member by member
        members = [_Call.apply(derived, *[x if d is None else x.select(d, b)
                                          for x, d in zip(xs, in_dims[1:])])
                   for b in range(info.batch_size)]
        out = tuple(torch.stack(column) for column in zip(*members))
        return out, (0,) * len(out)


class _BatchedRules(Rules):
    """``rules`` of a function batched by ``vmap`` over ``in_dims`` (one per input, None: not
    batched); outputs and residuals batched at 0. The gradient of an input that is not
    batched is the sum of the members'. Eager (the rules' forward runs under ``vmap``)."""

    def __init__(self, rules: Rules, in_dims: tuple):
        self.rules, self.in_dims = rules, in_dims

    def forward(self, xs):
        n_out = []

        def member(*ys):
            out, residuals = self.rules.forward(ys)
            n_out.append(len(out))
            return tuple(out) + tuple(residuals)
        flat = torch.func.vmap(member, in_dims=self.in_dims, out_dims=0,
                               chunk_size=self.rules.batch_chunk(xs))(*xs)
        return flat[:n_out[0]], flat[n_out[0]:]

    def _gathered(self, xs, grads) -> tuple:
        floating = [i for i, x in enumerate(xs) if _is_float(x)]
        return tuple(g.sum(0) if self.in_dims[i] is None else g.movedim(0, self.in_dims[i])
                     for i, g in zip(floating, grads))

    def vjp(self, xs, residuals, cotangents):
        grads = torch.func.vmap(lambda ys, rs, gs: tuple(self.rules.vjp(ys, rs, gs)),
                                in_dims=(self.in_dims, 0, 0), out_dims=0)(
            tuple(xs), tuple(residuals), tuple(cotangents))
        return self._gathered(xs, grads)

    def vjp_along_supported(self, mask):
        return self.rules.vjp_along_supported(mask)

    def vjp_transposable(self) -> bool:
        return self.rules.vjp_transposable()

    def vjp_along(self, xs, residuals, tangents, cotangents):
        moving = tuple(i for i, t in enumerate(tangents) if t is not None)
        t_dims = tuple(self.in_dims[i] for i in moving)

        def member(ys, rs, ts, gs):
            full = [None] * len(ys)
            for i, t in zip(moving, ts):
                full[i] = t
            return tuple(self.rules.vjp_along(ys, rs, tuple(full), gs))
        grads = torch.func.vmap(member, in_dims=(self.in_dims, 0, t_dims, 0), out_dims=0)(
            tuple(xs), tuple(residuals), tuple(tangents[i] for i in moving), tuple(cotangents))
        return self._gathered(xs, grads)


class StructuredRules:
    """`Rules` written for ``fn(*args, **kwargs)`` (`derived_call`) with its own structures.

    ``forward(args, kwargs) -> (fn's result, residuals)``. The VJP comes in two parts:
    ``inputs(args, kwargs) -> tuple of tensors``, the quantities the hand-written VJP is
    written for, as a differentiable function of the call's floating tensors (`_FlatRules`
    chains through it with ``torch.func.vjp``); ``vjp(kwargs, inputs, residuals, cotangent)
    -> gradients of inputs`` (a tuple of the same length), with the cotangent in the
    structure of ``fn``'s result (None at non-floating outputs)."""

    def forward(self, args, kwargs):
        raise NotImplementedError

    def inputs(self, args, kwargs):
        raise NotImplementedError

    def vjp(self, kwargs, inputs, residuals, cotangent):
        raise NotImplementedError

    jvp = None
    """Optional ``jvp(args, kwargs, inputs, residuals, tangents) -> tangent of fn's result``
    (`Rules.jvp`, with the tangents of ``inputs`` and the result in ``fn``'s structure, None
    at non-floating outputs)."""

    def jvp_supported(self) -> bool:
        """`Rules.jvp_supported`: whether ``jvp`` is given and answers."""
        return self.jvp is not None

    def batch_chunk(self, args, kwargs) -> int | None:
        """`Rules.batch_chunk` with the call's ``(args, kwargs)``."""
        return None

    def vjp_transposable(self) -> bool:
        """`Rules.vjp_transposable`."""
        return True

    def vjp_along_supported(self, mask_args, mask_kwargs) -> bool:
        """`Rules.vjp_along_supported` with the mask in the structure of the call's
        ``(args, kwargs)`` (True where a tensor has a tangent, False at other tensors)."""
        return False

    def vjp_along(self, args, kwargs, inputs, residuals, tangents_args, tangents_kwargs, cotangent):
        """`Rules.vjp_along` as ``vjp`` gives it (gradients of ``inputs``), with the tangents in
        the structure of ``(args, kwargs)``."""
        raise NotImplementedError


def _kept_outputs(out, layout: dict) -> tuple:
    """The tensors of a result of ``fn`` (`flatten_output` order, Nones dropped), with its
    layout recorded in ``layout`` (`derived_call`)."""
    out, layout["out"] = flatten_output(out)
    layout["none_at"] = [j for j, o in enumerate(out) if o is None]
    return tuple(o for o in out if o is not None)


class _FlatRules(Rules):
    """`StructuredRules` of a call flattened by `derived_call`."""

    def __init__(self, rules: StructuredRules, rebuild: Callable, layout: dict):
        self.rules, self.rebuild, self.layout = rules, rebuild, layout

    def forward(self, xs):
        out, residuals = self.rules.forward(*self.rebuild(xs))
        kept = _kept_outputs(out, self.layout)
        self.layout["float_out"] = [j for j, o in enumerate(kept) if _is_float(o)]
        self.layout["n_kept"] = len(kept)
        return kept, residuals

    def _inputs(self, xs) -> tuple[Callable, list]:
        """The rules' inputs (`StructuredRules.inputs`) as a function of the floating ``xs``,
        and those inputs' positions."""
        float_in = [i for i, x in enumerate(xs) if _is_float(x)]

        def inputs(*fx):
            ys = list(xs)
            for i, v in zip(float_in, fx):
                ys[i] = v
            return tuple(self.rules.inputs(*self.rebuild(ys)))
        return inputs, float_in

    def _chained(self, xs, cotangents, grads_of: Callable):
        """The gradients of the floating ``xs`` from ``grads_of(values, cotangent)``, the
        gradients of the rules' inputs (``values``, as `StructuredRules.inputs` makes them)
        given the cotangent in the structure of the function's result."""
        kept = [None] * self.layout["n_kept"]
        for j, g in zip(self.layout["float_out"], cotangents):
            kept[j] = g
        for j in self.layout["none_at"]:
            kept.insert(j, None)
        inputs, float_in = self._inputs(xs)
        values, back = torch.func.vjp(inputs, *[xs[i] for i in float_in])
        grads = tuple(grads_of(values, unflatten_output(kept, self.layout["out"])))
        if len(grads) != len(values):
            raise TypeError(f"{type(self.rules).__name__} returned {len(grads)} gradients "
                            f"for {len(values)} inputs")
        return tuple(back(grads))

    def vjp(self, xs, residuals, cotangents):
        kwargs = self.rebuild(xs)[1]
        return self._chained(xs, cotangents,
                             lambda values, g: self.rules.vjp(kwargs, values, residuals, g))

    def jvp_supported(self) -> bool:
        return self.rules.jvp_supported()

    def batch_chunk(self, xs) -> int | None:
        return self.rules.batch_chunk(*self.rebuild(list(xs)))

    def vjp_transposable(self) -> bool:
        return self.rules.vjp_transposable()

    def jvp(self, xs, residuals, tangents):
        inputs, float_in = self._inputs(xs)
        # fresh primals and tangents: under vmap either may be an expanded view (`_jvp`)
        values, t_values = torch.func.jvp(inputs, tuple(xs[i].clone() for i in float_in),
                                          tuple(t.clone() for t in tangents))
        args, kwargs = self.rebuild(xs)
        out = flatten_output(self.rules.jvp(args, kwargs, values, residuals, t_values))[0]
        kept = [t for j, t in enumerate(out) if j not in self.layout["none_at"]]
        return tuple(kept[j] for j in self.layout["float_out"])

    def vjp_along_supported(self, mask):
        return self.rules.vjp_along_supported(*self.rebuild(list(mask)))

    def vjp_along(self, xs, residuals, tangents, cotangents):
        args, kwargs = self.rebuild(xs)
        t_args, t_kwargs = self.rebuild(list(tangents))
        return self._chained(xs, cotangents, lambda values, g: self.rules.vjp_along(
            args, kwargs, values, residuals, t_args, t_kwargs, g))


def derived_call(cache: dict, fn: Callable, name: str, args: tuple, kwargs: dict,
                 on_failure: Callable[[str, Exception], None], compile: bool = True,
                 rules: StructuredRules | None = None):
    """``fn(*args, **kwargs)`` through `_Call`: torch.func transforms and autograd of the call
    run compiled derived functions.

    The tensors among ``args``/``kwargs`` (found by pytree) are the call's inputs; everything
    else (static values, None, the tree structure) selects the `Derived` in ``cache``.
    With ``compile=False`` the derived functions run eagerly: a transform then keeps no graph
    of the call between its forward and its backward (the VJP recomputes the call), so the
    memory of a chunked render is that of one chunk. ``rules``: `StructuredRules` for the
    call's first derivatives (the same for every call that shares ``cache``).
    Returns ``fn``'s result with the same structure (dicts with sorted keys).
    """
    flat, spec = pytree.tree_flatten((args, kwargs))
    positions = tuple(i for i, x in enumerate(flat) if isinstance(x, torch.Tensor))
    others = tuple((i, x) for i, x in enumerate(flat) if i not in positions)
    key = (spec, others)
    entry = cache.get(key)
    if entry is None:
        # the keys exist before the first compile: dynamo guards on the keys of a dict that a
        # compiled function writes to (not on values it only writes), so a first call that
        # added them would be compiled again on the second call
        layout = {"out": None, "none_at": None, "float_out": None, "n_kept": None}
        flat_template = [None if isinstance(x, torch.Tensor) else x for x in flat]

        def rebuild(tensors):
            leaves = list(flat_template)
            for i, t in zip(positions, tensors):
                leaves[i] = t
            return pytree.tree_unflatten(leaves, spec)

        def flat_fn(*tensors):
            a, k = rebuild(tensors)
            return _kept_outputs(fn(*a, **k), layout)

        flat_rules = None if rules is None else _FlatRules(rules, rebuild, layout)
        entry = cache[key] = (Derived(flat_fn, f"{name}_{len(cache)}", on_failure, compile,
                                      rules=flat_rules), layout)
    derived, layout = entry
    out = list(_Call.apply(derived, *[flat[i] for i in positions]))
    out = out[:len(out) - derived.n_residuals]
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
